"""``custom_dataset`` loader for llmprune_mc: the JSONL path is relative to this file, not to the cwd."""

from __future__ import annotations

import os

import datasets

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_llmprune_mc(**kwargs) -> datasets.DatasetDict:
    """lm-eval passes its metadata as keyword arguments; the local JSON builder needs no network."""
    return datasets.load_dataset("json", data_files={"test": os.path.join(_HERE, "llmprune_mc.jsonl")})
