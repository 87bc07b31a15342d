"""Block-wise reconstruction: train one decoder block's recovery parameters towards the dense block.

Per block, the recovery parameters (PERP's MaskLoRA, norms and biases, or LIFT's principal weights;
every pruned weight stays exactly zero) are trained so that the pruned block reproduces, on the same
inputs, the dense block's two sub-block outputs: the **attention output** (the output of the attention
module's last Linear, ``o_proj``/``out_proj``/``c_proj``/``dense``) and the **MLP output** (the block's
last Linear, ``down_proj``/``fc2``/…). The loss is the sum of their relative squared errors
``‖y − y_dense‖² / ‖y_dense‖²``, so attention and MLP weigh the same whatever their scales (arXiv
2510.14444 finds separate attention/MLP targets nearly Pareto-optimal). Both are read from one forward
of the pruned block, so the MLP also learns to correct what is left of the attention's error.

Two callers share :class:`BlockReconstructor`:

* the pruning engine (``prune(..., recover="perp")``, fused): the targets are recorded by
  :class:`SubBlockTaps` during the calibration forward the engine already runs on the dense block, the
  block is recovered right after its Linears are pruned, and the engine then propagates the *recovered*
  block's outputs to the next block (sequential error correction, as in SparseGPT's engine). Memory: one
  block, its calibration activations and two more activation sets (the targets);
* ``recover(mode="reconstruct")`` after pruning (``reconstruct.py``), with targets from a dense copy.

For a model without zeros to keep (e.g. a structurally shrunk one) pass ``keep_masks=None``: every Linear
of the block is then trained with an all-true mask, and the targets may come from a teacher block of
another width, as long as its attention and MLP outputs have the student's shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import first_output, prunable_linears
from llmprune.calibration.rows import row_chunks
from llmprune.errors import ConfigError, did_you_mean
from llmprune.recovery import masking
from llmprune.recovery.lift import LiftOptions, LiftSession
from llmprune.recovery.perp import PerpOptions, PerpSession
from llmprune.recovery.train import TrainSettings, run

log = logging.getLogger(__name__)

SESSIONS: dict[str, tuple[type, type]] = {
    "perp": (PerpOptions, PerpSession),
    "lift": (LiftOptions, LiftSession),
}
#: optimiser steps per block when no budget is given (steps of 4 x 512 tokens). Chosen on the validation
#: part: Wanda 50 %, fused, 4 vs 8 steps: 71.75 vs 70.83 (pruned 75.43), 8 costing twice the recovery
#: time (84 vs 162 s) for 1.3 %, under the 2 % a costlier setting must win by. The peak learning rate per
#: method: see docs/benchmarks.md, "Block-wise reconstruction" (chosen on the validation part).
DEFAULT_STEPS = 4
#: tokens per step when ``micro_batch`` is not given: the 4 x 512 DEFAULT_STEPS and the rates were chosen
#: at. A step is a micro-batch of the calibration batch, so prune's ``batch_size`` (a memory and speed
#: setting of the pass) does not change what a recovery step costs: at its default of 8 windows a step
#: of the whole batch cost twice the time for no better a result (Wanda 50 %, validation part, 72.47 vs
#: 71.75; docs/benchmarks.md, "Eighth round").
DEFAULT_STEP_TOKENS = 2048
#: perp 3e-3 over 1e-3: Wanda 50 %, fused, 300 s, validation ppl 71.34 vs 73.93 (pruned 75.43, dense 39.23).
#: lift 3e-3: Wanda 50 %, fused, 4 steps per block, validation ppl 3e-4/1e-3/3e-3/1e-2 -> 74.99/73.32/
#: 73.26/74.04 (the lowest; 1e-3 within 0.1 %, so in effect one rate for both methods).
DEFAULT_LR = {"perp": 3e-3, "lift": 3e-3}
#: the TrainSettings that apply per block (a step is one batch of the block's inputs)
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainSettings)}
TRAIN_KEYS -= {"batch_size", "gradient_accumulation_steps"}


def micro_batch_problem(value: Any, mode: str = "reconstruct") -> str | None:
    """What is wrong with a ``micro_batch`` setting (None = nothing): one check for ``prune``'s fused
    recovery, ``recover()``, the recipe and the CLI, before any model is loaded."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a whole number of windows >= 1 (or None), got {value!r}."
    if mode != "reconstruct":
        return "applies to mode 'reconstruct' (windows per block-wise step); retrain's step is batch_size."
    return None


def sub_block_modules(block: nn.Module) -> dict[str, str]:
    """``{"attention": path, "mlp": path}``: the Linears (paths inside ``block``) whose outputs are the
    attention and MLP outputs.

    The attention module is the block's child whose class or name says attention; its last Linear (in
    definition order) writes the attention output. The block's last Linear outside it writes the MLP
    output. A block with neither is matched on its own output (``{"block": ""}``).
    """
    linears = list(prunable_linears(block))
    attention = next(
        (
            name
            for name, m in block.named_children()
            if any(n.startswith(name + ".") for n in linears)  # not e.g. post_attention_layernorm
            and any(word in f"{type(m).__name__} {name}".lower() for word in ("attention", "attn"))
        ),
        None,
    )
    taps: dict[str, str] = {}
    if attention is not None:
        inside = [n for n in linears if n.startswith(attention + ".")]
        outside = [n for n in linears if not n.startswith(attention + ".")]
        if inside:
            taps["attention"] = inside[-1]
        if outside:
            taps["mlp"] = outside[-1]
    return taps or {"block": ""}


class SubBlockTaps:
    """Forward hooks on the sub-block output modules: they record dense targets, or hold live outputs.

    ``record()``: every forward appends its outputs (detached) to ``targets[name]``, one entry per batch.
    ``live()``: each forward leaves its outputs (with their graph) in ``outputs``, for the loss.
    Modules are looked up by path when a context opens, so a Linear wrapped by an adapter since (PERP's
    MaskLoRA) is tapped at its wrapper, whose output is what the block uses.
    """

    def __init__(self, block: nn.Module, paths: Mapping[str, str]) -> None:
        self.block, self.paths = block, dict(paths)
        self.targets: dict[str, list[Tensor]] = {name: [] for name in self.paths}
        self.outputs: dict[str, Tensor] = {}

    @contextlib.contextmanager
    def _hooked(self, record: bool) -> Iterator[None]:
        def hook_for(name: str):
            def hook(_module, _inputs, output):
                if record:
                    self.targets[name].append(first_output(output).detach())
                else:
                    self.outputs[name] = first_output(output)

            return hook

        handles = [
            self.block.get_submodule(path).register_forward_hook(hook_for(name))
            for name, path in self.paths.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def record(self):
        return self._hooked(record=True)

    def live(self):
        return self._hooked(record=False)

    def remove(self) -> None:
        """Drop the recorded targets (hooks live only inside ``record()``/``live()``)."""
        self.targets = {name: [] for name in self.paths}
        self.outputs = {}


def relative_error(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """``Σ_taps ‖y − t‖² / ‖t‖²`` in fp32 (a zero target counts its plain squared error)."""
    total = torch.zeros((), dtype=torch.float32)
    for name, target in targets.items():
        y, t = outputs[name].float(), target.float()
        den = t.pow(2).sum().clamp_min(1e-12)
        total = total.to(y.device) + (y - t).pow(2).sum() / den
    return total


@dataclass
class BlockwiseOptions:
    """What to train and how long, checked before any model is loaded (``check_options``)."""

    method: str = "perp"
    steps: int | None = None  # optimiser steps per block; None = DEFAULT_STEPS
    max_seconds: float | None = None  # budget over all blocks (recovery time only), shared evenly
    lr: float | None = None  # None = DEFAULT_LR[method]
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optim: str = "adamw"
    seed: int = 0
    micro_batch: int | None = None  # windows per step; None = DEFAULT_STEP_TOKENS worth, at least one
    method_options: dict[str, Any] = field(default_factory=dict)  # PerpOptions / LiftOptions keywords

    def __post_init__(self) -> None:
        problem = micro_batch_problem(self.micro_batch)
        if problem:
            raise ConfigError(f"micro_batch {problem}")
        if self.method not in SESSIONS:
            raise ConfigError(
                f"unknown recovery method {self.method!r}{did_you_mean(self.method, SESSIONS)}: use "
                f"{', '.join(SESSIONS)}."
            )
        opt_cls = SESSIONS[self.method][0]
        allowed = [f.name for f in dataclasses.fields(opt_cls)]
        unknown = [k for k in self.method_options if k not in allowed]
        if unknown:
            raise ConfigError(
                f"unknown {self.method} option {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; "
                f"{self.method} accepts: {', '.join(allowed)}."
            )
        self.session_options()  # the method's own checks (rank >= 1, …)
        self.train_settings()  # steps >= 1, lr > 0, …

    @classmethod
    def from_kwargs(cls, method: str, options: Mapping[str, Any] | None, seed: int = 0) -> BlockwiseOptions:
        """``recover="perp", recover_options={"steps": 8, "lr": 1e-3, "r": 8}`` → options (validated):
        ``recover()``'s training keywords go to training, the rest to the method."""
        options = dict(options or {})
        train = {k: options.pop(k) for k in list(options) if k in TRAIN_KEYS}
        for key in ("batch_size", "gradient_accumulation_steps", "mode", "distill"):
            if key in options:
                raise ConfigError(
                    f"recover option {key!r} does not apply to block-wise reconstruction inside prune: a "
                    "step is a few calibration windows of one block (set micro_batch, windows per step)."
                )
        train.setdefault("seed", seed)
        micro_batch = options.pop("micro_batch", None)
        return cls(method=method, method_options=options, micro_batch=micro_batch, **train)

    def rows_per_step(self, batch: int, length: int) -> int:
        """Windows per optimiser step for calibration batches of ``batch`` windows of ``length`` tokens."""
        wanted = self.micro_batch if self.micro_batch is not None else DEFAULT_STEP_TOKENS // max(1, length)
        return max(1, min(batch, wanted))

    def session_options(self):
        opts = dict(self.method_options)
        if self.method == "perp":
            opts["lm_head"] = False  # outside the blocks: never trained block by block
        return SESSIONS[self.method][0](**opts)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(
            steps=DEFAULT_STEPS if self.steps is None else self.steps,
            max_seconds=self.max_seconds,
            lr=DEFAULT_LR[self.method] if self.lr is None else self.lr,
            warmup_ratio=self.warmup_ratio,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            optim=self.optim,
            seed=self.seed,
        )


class BlockReconstructor:
    """Recovers blocks one at a time; the engine calls ``tap`` before the dense forward of a block and
    ``recover`` once the block is pruned. Keeps one record per block and the time spent."""

    def __init__(self, options: BlockwiseOptions, num_blocks: int) -> None:
        self.options, self.num_blocks = options, num_blocks
        self.settings = options.train_settings()
        self.method_options = options.session_options()
        self.blocks: list[dict[str, Any]] = []
        self.seconds = 0.0

    def tap(self, block: nn.Module) -> SubBlockTaps:
        return SubBlockTaps(block, sub_block_modules(block))

    def _budget(self, index: int) -> float | None:
        if self.settings.max_seconds is None:
            return None
        left = max(1, self.num_blocks - index)
        return max(1e-3, (self.settings.max_seconds - self.seconds) / left)

    def recover(
        self,
        index: int,
        name: str,
        block: nn.Module,
        call: Callable[[int, slice], Any],
        num_batches: int,
        taps: SubBlockTaps,
        keep_masks: Mapping[str, Tensor] | None,
    ) -> dict[str, Any]:
        """Train ``block`` (its Linears named ``f"{name}.{rel}"`` in ``keep_masks``) so that
        ``call(b, rows)``, a forward of the block on windows ``rows`` of batch ``b``, reproduces
        ``taps.targets[…][b][rows]``. A step is one such micro-batch (``rows_per_step``). Zeros are kept
        exactly."""
        start = time.perf_counter()
        device = next(block.parameters()).device
        targets = _block_targets(block, name, keep_masks, device)
        first = next(iter(taps.targets.values()))
        shapes = [tuple(first[b].shape) for b in range(num_batches)]
        per_step = self.options.rows_per_step(max(s[0] for s in shapes), shapes[0][1])
        steps_of = [(b, rows) for b, s in enumerate(shapes) for rows in row_chunks(s[0], per_step)]
        record: dict[str, Any] = {
            "block": name,
            "taps": list(taps.paths.values()),
            "windows_per_step": per_step,
        }
        was_training = block.training
        block.eval()
        session_cls = SESSIONS[self.options.method][1]
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            torch.manual_seed(self.settings.seed + index)  # adapters' initialisation, per block
            session = session_cls(block, targets, self.method_options)
            try:
                session.attach()
                params = session.parameters()
                record["trainable"] = session.trainable_count()
                gen = torch.Generator().manual_seed(self.settings.seed + index)

                def order():
                    while True:
                        yield from (steps_of[j] for j in torch.randperm(len(steps_of), generator=gen))

                def loss_fn(step: tuple[int, slice]) -> Tensor:
                    b, rows = step
                    with taps.live():
                        call(b, rows)
                    outputs, taps.outputs = taps.outputs, {}
                    return relative_error(outputs, {k: v[b][rows] for k, v in taps.targets.items()})

                loop = run(
                    loss_fn,
                    order(),
                    session.optimizer(params, self.settings),
                    self.settings,
                    max_seconds=self._budget(index),
                    on_step=session.after_step,
                    desc=f"({index + 1}/{self.num_blocks}) reconstructing",
                )
            except BaseException:
                session.finish(merge=False)
                block.train(was_training)
                raise
            session.finish()
        block.train(was_training)
        masking.assert_preserved(targets)
        masking.enforce(targets)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        record.update(steps=loop.steps_done, losses=loop.losses, seconds=seconds)
        self.blocks.append(record)
        return record

    def report(self) -> dict[str, Any]:
        """What the result carries, in the keys of ``RecoveryResult.to_dict()``: settings, totals and
        one record per block (taps, trainable parameters, steps, losses, seconds)."""
        return {
            "method": self.options.method,
            "mode": "reconstruct",
            "fused": True,
            "trainable_params": sum(b["trainable"] for b in self.blocks),
            "steps_done": sum(b["steps"] for b in self.blocks),
            "seconds": self.seconds,
            "options": {
                **{k: v for k, v in dataclasses.asdict(self.settings).items() if k in TRAIN_KEYS},
                **dataclasses.asdict(self.method_options),
                "micro_batch": self.options.micro_batch,
                "distill": 0.0,
            },
            "details": {"blocks": self.blocks},
        }


def _block_targets(
    block: nn.Module, name: str, keep_masks: Mapping[str, Tensor] | None, device: torch.device
) -> dict[str, tuple[nn.Module, Tensor]]:
    """``{relative name: (Linear, keep (out, in) on device)}``: the pruned Linears of the block, or every
    Linear with an all-true mask when there are no zeros to keep (``keep_masks=None``)."""
    out: dict[str, tuple[nn.Module, Tensor]] = {}
    for rel, module in prunable_linears(block).items():
        shape = tuple(masking.weight_2d(module).shape)
        if keep_masks is None:
            out[rel] = (module, torch.ones(shape, dtype=torch.bool, device=device))
            continue
        keep = keep_masks.get(f"{name}.{rel}")
        if keep is not None and not bool(keep.all()):
            out[rel] = (module, keep.to(device=device, dtype=torch.bool))
    return out
