"""The token windows recovery trains on when the user does not choose them.

Its own windows, not the calibration's: pruning calibrates on long windows (2048 tokens by default),
and four of those per step leave a 10-minute CPU budget a handful of steps; recovery's figures were
measured on 64 windows of 256 tokens (docs/benchmarks.md, "Recovery"). They are drawn from the same text
with another seed, so recovery does not distil on exactly the windows SparseGPT, iCBS and ALPS fitted
the kept weights to. That was measured neutral, not better: 192 fresh windows against the pruning's 64,
10 minutes each, iCBS 50 % validation perplexity 59.07 vs 59.40 and SparseGPT 50 % 61.97 vs 61.70 (the
fresh runs paid an 80 s longer teacher pass); it costs nothing and keeps the two stages independent.

How many: 64 for a run counted in steps. A time-budgeted distillation gets as many as the dense
model's targets can be computed for in a fifth of its budget (:func:`teacher_budget`; up to
:data:`MAX_WINDOWS`, at least :data:`NUM_WINDOWS`), about one pass over fresh windows instead of a dozen
over the same 64: 384–668 windows at 10 minutes on both cores (the count follows the machine's
speed), 4–5 points more of the gap closed for PERP and 5 for LIFT.

Their text is the user's (``--recover_dataset``, else their calibration ``--dataset``), else
:data:`DEFAULT_TEXT`, the built-in ``"recovery"`` corpus: the calibration text plus *Moby-Dick* and
Shakespeare's plays. Recovery trains weights, so what it reads decides what it restores: 10 minutes of
PERP closed 40–70 % of the gap on held-out novels with it, against 27–62 % with the calibration text
alone, and no less on news and technical text that neither holds (chosen on the validation novel;
docs/benchmarks.md, "Recovery", sixth round).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llmprune.calibration.data import calibration_tokens
from llmprune.preflight import max_positions, window_length

#: training windows drawn for a step-counted recovery (the teacher pass costs one forward per window: 39 s
#: here on one core). 192 windows of the recovery corpus were 1.0-1.3 % better on the validation part at
#: 10 minutes, under the 2 % a costlier setting must win by when the pass is paid on top (a 115 s teacher
#: pass; docs/benchmarks.md, sixth round); a time budget pays it from itself (TEACHER_SHARE below)
NUM_WINDOWS = 64
#: tokens per training window (capped by the model's positions). Windows of the evaluation's 512 tokens, at
#: the same tokens per step (32 x 512, batch 2), were no better on the validation part (seventh round)
WINDOW_LENGTH = 256
#: a time-budgeted distillation (``max_seconds``, top-k targets, windows not set by the user) draws up to
#: MAX_WINDOWS windows and computes the dense model's targets on as many as TEACHER_SHARE of the budget
#: buys (at least NUM_WINDOWS): about one pass over fresh windows instead of a dozen over 64. Chosen on
#: the validation part at 10 minutes, both cores (docs/benchmarks.md, "Ninth round"): SparseGPT 50 %
#: closed 47 / 51 / 52 % of the gap with 64 / 192 / 384 windows (teacher pass 20 / 62 / 123 s, i.e. a
#: fifth of the budget at 384), iCBS 50 % 44 / 49 % and Wanda 50 % 53 / 57 % with 64 / 384; a share, not a
#: count, so another machine or budget gets its own count
TEACHER_SHARE = 0.2
MAX_WINDOWS = 1024
#: the methods that rule was measured for. LIFT, SparseGPT 50 %, 10 minutes, both cores: 54.7 % of the
#: validation gap with the pool (668 windows) against 49.8 % with 64 (docs/benchmarks.md, "Tenth round");
#: full fine-tuning keeps NUM_WINDOWS until it is measured
POOLED_METHODS = ("perp", "lift")
#: recovery draws with the calibration seed plus this, so its windows are not the pruning's
SEED_OFFSET = 1
#: the built-in corpus recovery trains on when neither a recovery nor a calibration text is given
DEFAULT_TEXT = "recovery"


def teacher_budget(
    method: str, num_samples: int | None, max_seconds: float | None, distils: bool
) -> float | None:
    """Seconds the teacher pass may take when the windows are left to llmprune in a time-budgeted
    distillation by one of :data:`POOLED_METHODS` (then draw :data:`MAX_WINDOWS`); None: draw the
    windows asked for (default :data:`NUM_WINDOWS`), all of them used."""
    if method not in POOLED_METHODS or num_samples is not None or max_seconds is None or not distils:
        return None
    return TEACHER_SHARE * max_seconds


def window_count(num_samples: int | None, teacher_seconds: float | None) -> int:
    """Windows to draw: the user's count, else the pool of a timed teacher pass, else NUM_WINDOWS."""
    if num_samples is not None:
        return num_samples
    return NUM_WINDOWS if teacher_seconds is None else MAX_WINDOWS


def window_settings(
    source: Any,
    num_samples: int | None,
    seq_len: int | None,
    seed: int | None,
    calibration_seed: int,
    teacher_seconds: float | None = None,
) -> dict[str, Any]:
    """``calibration_tokens`` arguments of the recovery windows: what the user set, else the defaults
    above (``seq_len`` None stays None: it is capped per model by :func:`recovery_windows`); with a
    ``teacher_budget`` the pool of :data:`MAX_WINDOWS` the teacher pass takes its windows from."""
    return {
        "source": DEFAULT_TEXT if source is None else source,
        "num_samples": window_count(num_samples, teacher_seconds),
        "seq_len": seq_len,
        "seed": calibration_seed + SEED_OFFSET if seed is None else seed,
    }


def recovery_windows(
    source: Any, tokenizer, model, num_samples: int, seq_len: int | None, seed: int
) -> Tensor:
    """``(num_samples, seq_len)`` training windows; ``seq_len`` None: :data:`WINDOW_LENGTH`, or the
    model's positions if fewer (an explicit length above them is refused, as for calibration); ``source``
    None: :data:`DEFAULT_TEXT`."""
    source = DEFAULT_TEXT if source is None else source
    if seq_len is None:
        seq_len = min(WINDOW_LENGTH, max_positions(model.config) or WINDOW_LENGTH)
    seq_len = window_length(seq_len, model.config, "--max_seq_length (recovery)")
    return calibration_tokens(source, tokenizer, num_samples, seq_len, seed, model=model)
