"""Model-card lines for a structurally pruned checkpoint (a leaf: reads plain dicts only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def structure_lines(structure: Mapping[str, Any], speed: Mapping[str, Any] | None) -> list[str]:
    """What was removed, the new shape, and the measured speed-up (when ``llmprune bench`` ran)."""
    counts = structure.get("counts", {})
    params = structure.get("block_params", {})
    total = structure.get("total_params", {})
    lines = [
        "## Structure removed",
        "",
        f"This model is **smaller**, not masked: {structure.get('block_params_removed', 0):.1%} of the "
        f"decoder-block parameters were removed as whole structures (`{structure.get('structure')}`, "
        f"method `{structure.get('method')}`): {counts.get('blocks', 0)} decoder blocks, then "
        f"{counts.get('channels', 0)} MLP channels and {counts.get('kv_groups', 0)} key-value head groups "
        "(each with its query heads) in every remaining block. It loads with plain transformers, no "
        "remote code, and runs faster on every runtime with the kernels it already has.",
        "",
        "| | dense | this model |",
        "|---|---|---|",
        f"| decoder-block parameters | {params.get('dense', 0):,} | {params.get('pruned', 0):,} |",
        f"| all parameters | {total.get('dense', 0):,} | {total.get('pruned', 0):,} |",
    ]
    for key, value in (structure.get("config") or {}).items():
        lines.append(f"| `{key}` | | {value} |")
    lines += ["", "Exactly which blocks, channels and heads were removed: `structure.json`.", ""]
    if speed and speed.get("speedup"):
        up, st = speed["speedup"], speed.get("settings", {})
        lines += [
            f"Measured speed-up over the dense model on the machine that pruned it "
            f"(`llmprune bench`, models timed alternately in one process, {st.get('threads', '?')} threads): "
            f"prefill ({st.get('prefill')}) **{up['prefill']:.2f}×**, decode ({st.get('decode')}) "
            f"**{up['decode']:.2f}×**.",
            "",
        ]
    return lines
