"""The built-in held-out text is split once: defaults are chosen on one part, tables report the other."""

from __future__ import annotations

from llmprune.calibration.data import load_texts


def test_validation_and_test_parts_are_disjoint_and_make_the_whole():
    validation, test = load_texts("validation", split="test"), load_texts("test", split="test")
    assert validation and test
    assert not set(validation) & set(test)
    assert sorted(validation + test) == sorted(load_texts("evaluation", split="test"))
    # no paragraph of one part appears in the other (a windowed split could leak across its boundary)
    paragraphs = {p for t in validation for p in t.split("\n\n") if len(p) > 200}
    assert not any(p in paragraphs for t in test for p in t.split("\n\n") if len(p) > 200)
