"""Mixed precision for recovery: bfloat16 matmuls under ``torch.autocast``, float32 master weights.

Why: on a CPU with native bfloat16 (AVX512-BF16, AMX) a bf16 GEMM runs about twice as fast as fp32
(1024 × 576 × 1536 on the project's Zen 4 machine: 4.8 ms against 10.5 ms), and the activations kept
for backward take half the memory. Under autocast only the matmuls run in bf16; the weights, the
optimiser state, the trained adapters and the merge stay float32, so every pruned weight is still
exactly ``+0.0`` afterwards and every kept weight is what float32 arithmetic makes of it. Without
native bf16, autocast on a CPU would emulate it and be slower: ``"auto"`` then stays float32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from llmprune.errors import ConfigError, did_you_mean

PRECISIONS = ("auto", "bfloat16", "float32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}{did_you_mean(str(precision), PRECISIONS)}: use "
            f"{', '.join(PRECISIONS)}."
        )


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (not emulated) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bfloat16"`` or ``"float32"``: what ``precision`` means on ``device``."""
    check_precision(precision)
    if precision == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device) -> Any:
    """The context the forward passes run in: bf16 autocast, or nothing for float32."""
    if resolve_precision(precision, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
