"""``recover()``: retrain a pruned model briefly without losing a single zero."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.errors import ConfigError, did_you_mean
from llmprune.preflight import check_teacher, check_typed
from llmprune.recovery import blockwise, masking
from llmprune.recovery.checkpointing import checkpointed_blocks
from llmprune.recovery.full import FULL_LR, FullOptions, FullSession
from llmprune.recovery.heap import reuse_freed_memory
from llmprune.recovery.hidden import BlockOutputs, hidden_error, tapped_blocks
from llmprune.recovery.lift import LiftOptions, LiftSession
from llmprune.recovery.losses import retraining_loss
from llmprune.recovery.perp import PerpOptions, PerpSession
from llmprune.recovery.precision import autocast, resolve_precision
from llmprune.recovery.reconstruct import reconstruct
from llmprune.recovery.teacher import TopKTargets, topk_targets
from llmprune.recovery.train import LoopResult, TrainSettings, index_batches, run

log = logging.getLogger(__name__)

METHODS: dict[str, tuple[type, type]] = {
    "perp": (PerpOptions, PerpSession),
    "lift": (LiftOptions, LiftSession),
    "full": (FullOptions, FullSession),
}
MODES = ("retrain", "reconstruct")
#: first swept on SmolLM2-135M, 50 % magnitude, 10 CPU minutes, 4 x 256-token windows per step
#: (held-out ppl 381.7 pruned, 28.9 dense): perp 1e-3/3e-3/1e-2 -> 81.5/71.8/87.8;
#: lift 1e-4/1e-3/3e-3 -> 189.8/89.5/77.1. Short recoveries want higher rates than the papers' long runs.
#: perp's 3e-3 was then chosen on the validation part (docs/benchmarks.md, "Recovery", fourth round) and
#: re-checked there on the default recovery text (seventh round: 1e-3 worse on iCBS and SparseGPT 50 %).
DEFAULT_LR = {"perp": 3e-3, "lift": 3e-3, "full": FULL_LR}
#: teacher probabilities kept per position when distilling from a dense model (None = a live teacher)
DEFAULT_TEACHER_TOP_K = 64


def method_options(method: str) -> dict[str, Any]:
    """``{option: default}`` of a method: the keywords ``recover(method=..., **options)`` accepts."""
    if method not in METHODS:
        raise ConfigError(
            f"unknown recovery method {method!r}{did_you_mean(method, METHODS)}: use {', '.join(METHODS)}."
        )
    return {f.name: f.default for f in dataclasses.fields(METHODS[method][0])}


def distill_problem(distill: float | None, mode: str) -> str | None:
    """What is wrong with a ``distill`` value for ``mode`` (None = nothing). One check for ``recover()``,
    the recipe and the CLI, which each name the setting their own way before it."""
    if distill is not None and not 0.0 <= distill <= 1.0:
        return f"must be in [0, 1] (0 = LM loss, 1 = KL to the dense model), got {distill}."
    if distill and mode != "retrain":
        return "applies to mode 'retrain' only; set it to 0 for reconstruct (which matches the dense blocks)."
    return None


@dataclass
class RecoveryResult:
    """What recovery did, for logs, model cards and benchmarks."""

    method: str
    mode: str
    trainable_params: int
    total_params: int
    trainable_fraction: float
    steps_done: int
    seconds: float
    tokens_seen: int
    losses: list[float] = field(default_factory=list)
    first_loss: float | None = None
    last_loss: float | None = None
    sparsity: float = 0.0  # exact zeros over the pruned Linears, identical before and after
    peak_memory_mib: float | None = None  # CUDA peak allocated, else the process's peak RSS
    options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform.startswith("linux"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return None


def recover(
    model: nn.Module,
    *,
    input_ids: Tensor,
    method: str = "perp",
    keep_masks: dict[str, Tensor] | None = None,
    steps: int | None = None,
    max_seconds: float | None = None,
    lr: float | None = None,
    batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    optim: str = "adamw",
    seed: int = 0,
    mode: str = "retrain",
    dense_model: nn.Module | None = None,
    distill: float | None = None,
    teacher_top_k: int | None = DEFAULT_TEACHER_TOP_K,
    teacher_targets: TopKTargets | None = None,
    hidden_distill: float = 0.0,
    hidden_stride: int = 3,
    precision: str = "auto",
    gradient_checkpointing: bool = True,
    micro_batch: int | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    **options: Any,
) -> RecoveryResult:
    """Recover a pruned model in place with PERP or LIFT; every pruned weight stays exactly 0.

    ``input_ids`` are ``(N, L)`` training windows (``calibration_tokens``). ``keep_masks`` (``{name: (out, in)
    bool}``, True = kept) default to the exact zeros of the block Linears. ``mode="reconstruct"`` needs
    ``dense_model`` (a dense copy; see :mod:`llmprune.recovery.reconstruct`) and trains block by block
    towards the dense blocks' attention and MLP outputs: there ``steps`` counts per block (default
    ``blockwise.DEFAULT_STEPS``), ``max_seconds`` is shared by all blocks, and ``lr`` defaults to
    ``blockwise.DEFAULT_LR``. ``steps`` defaults to 100 in retrain mode. ``distill`` in [0, 1] mixes
    knowledge distillation into retraining: loss = (1 − distill)·LM loss + distill·KL(dense ‖ pruned) over
    the next-token distributions, with ``dense_model`` as the teacher; ``None`` = 1 when a ``dense_model``
    is given, else 0 (distillation recovered more in every measured case: docs/benchmarks.md). The model
    comes back as plain Linear weights (adapters merged), in its original train/eval mode. Dropout is off
    while training.
    ``teacher_top_k=k`` (default 64) distils from the dense model's top-k probabilities (the rest of the
    mass as one bucket), computed once before training instead of a teacher forward per step. ``None``
    keeps the live teacher. ``teacher_targets`` passes such targets computed earlier
    (:func:`llmprune.recovery.teacher.topk_targets` on the same ``input_ids``, e.g. before pruning), so
    no dense copy needs to be in memory at all. Either way the teacher pass (``TopKTargets.seconds``) is
    paid from ``max_seconds``.
    ``hidden_distill=w`` (retrain, with a teacher) adds ``w ×`` the relative error of the outputs of
    every ``hidden_stride``-th decoder block (counted down from the last) against the dense model's
    (:mod:`llmprune.recovery.hidden`); the dense outputs are kept by the teacher pass (bfloat16).
    ``precision`` (retrain): ``"auto"`` runs the forward passes under bfloat16 autocast where the device
    has native bf16 (float32 master weights and merge: :mod:`llmprune.recovery.precision`), else
    float32. ``gradient_checkpointing`` (retrain): recompute each decoder block's activations in
    backward instead of keeping them all (:mod:`llmprune.recovery.checkpointing`).
    ``micro_batch`` (reconstruct): windows per block-wise step, at most ``batch_size`` (the default).
    ``callback(step, model)`` runs after every optimiser step.

    >>> result = recover(model, input_ids=calibration_tokens(None, tok, 64, 256), steps=200)  # doctest: +SKIP
    >>> result.trainable_fraction, result.last_loss  # doctest: +SKIP
    """
    allowed = method_options(method)  # validates the name
    opt_cls, session_cls = METHODS[method]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(
            f"unknown {method} option {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; {method} accepts: "
            f"{', '.join(allowed)}."
        )
    if mode not in MODES:
        raise ConfigError(
            f"unknown recovery mode {mode!r}{did_you_mean(mode, MODES)}: use retrain or reconstruct."
        )
    if mode == "reconstruct" and method not in blockwise.DEFAULT_LR:
        raise ConfigError(
            f"method {method!r} trains the whole model and has no block-wise form: use mode='retrain' "
            f"with it, or mode='reconstruct' with {' or '.join(blockwise.DEFAULT_LR)}."
        )
    problem = blockwise.micro_batch_problem(micro_batch, mode)
    if problem:
        raise ConfigError(f"micro_batch {problem}")
    if mode == "reconstruct" and dense_model is None:
        raise ConfigError(
            "mode='reconstruct' needs dense_model=<a dense copy of the model> to take targets from."
        )
    if distill is None:
        has_teacher = dense_model is not None or teacher_targets is not None
        distill = 1.0 if has_teacher and mode == "retrain" else 0.0
    problem = distill_problem(distill, mode)
    if problem:
        raise ConfigError(f"distill {problem}")
    if teacher_targets is not None and not torch.equal(teacher_targets.input_ids, input_ids):
        raise ConfigError(
            "teacher_targets were computed on other windows than input_ids: pass the same windows."
        )
    if distill > 0 and dense_model is None and teacher_targets is None:
        raise ConfigError(
            f"distill={distill} needs dense_model=<the dense model before pruning> as the teacher "
            "(or distill=0)."
        )
    hidden_blocks = _hidden_blocks(model, hidden_distill, hidden_stride, mode, dense_model, teacher_targets)
    device = next(model.parameters()).device
    compute_dtype = resolve_precision(precision, device)  # checked before any work
    if dense_model is not None:
        check_teacher(getattr(model, "config", None), getattr(dense_model, "config", None), "dense_model")
    if mode == "reconstruct":
        default_steps, default_lr = blockwise.DEFAULT_STEPS, blockwise.DEFAULT_LR[method]
    else:
        default_steps, default_lr = 100, DEFAULT_LR[method]
    settings = TrainSettings(
        steps=default_steps if steps is None else steps,
        max_seconds=max_seconds,
        lr=default_lr if lr is None else lr,
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        optim=optim,
        seed=seed,
    )
    check_typed(allowed, options, f"recovery method {method!r}", "option")
    method_opts = opt_cls(**options)
    targets = masking.resolve_targets(model, keep_masks)
    if not targets and method != "full":
        log.warning("no pruned Linear found in the decoder blocks: only norms/biases can be recovered")
    bad = list(masking.violations(targets))
    if bad:
        raise ConfigError(
            f"the keep masks mark weights as pruned that are not zero (e.g. {bad[0][0]}: {bad[0][1]}): "
            "prune the model first (write the zeros), or pass the masks that match it."
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teacher = (teacher_targets or dense_model) if distill > 0 or hidden_blocks else None
    if teacher_top_k is not None and isinstance(teacher, nn.Module):
        teacher = _teacher_pass(
            teacher, input_ids, teacher_top_k, settings.batch_size, precision, hidden_blocks
        )
        log.info("teacher top-%d targets of %d windows in %.1f s", teacher.k, len(input_ids), teacher.seconds)
    if isinstance(teacher, TopKTargets):
        _pay_teacher_pass(settings, teacher.seconds)
    total_params = sum(p.numel() for p in model.parameters())
    sparsity_before = masking.sparsity(targets)
    was_training = model.training
    model.eval()  # no dropout: short runs on few windows, and deterministic
    if mode == "reconstruct":  # one session per block (blockwise.py), none over the whole model
        fields = {k: v for k, v in dataclasses.asdict(settings).items() if k in blockwise.TRAIN_KEYS}
        reconstructor = blockwise.BlockReconstructor(
            blockwise.BlockwiseOptions(
                method=method,
                method_options=options,
                micro_batch=micro_batch or settings.batch_size,
                **fields,
            ),  # by default a step is recover()'s batch, as in the end-to-end modes
            len(masking.decoder_blocks(model)),
        )
        try:
            loop, per_block = reconstruct(
                model, dense_model, reconstructor, input_ids, settings.batch_size,
                {name: keep for name, (_, keep) in targets.items()},
            )  # fmt: skip
        finally:
            model.train(was_training)
        session, details = None, {"blocks": per_block}
        trainable = sum(b["trainable"] for b in per_block)
    else:
        session = session_cls(model, targets, method_opts)
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            reuse_freed_memory(device.type == "cpu"),
        ):
            torch.manual_seed(seed)
            try:
                session.attach()
                trainable = session.trainable_count()
                log.info(
                    "%s (%s): training %d of %d parameters (%.4f %%)",
                    method, mode, trainable, total_params, 100 * trainable / total_params,
                )  # fmt: skip

                def on_step(step: int) -> None:
                    session.after_step(step)
                    if callback is not None:
                        callback(step, model)

                with checkpointed_blocks(model, gradient_checkpointing):
                    loop = _retrain(
                        model, session, input_ids, settings, on_step, teacher, distill, precision,
                        hidden_blocks, hidden_distill,
                    )  # fmt: skip
                details = {}
            except BaseException:
                session.finish(merge=False)  # PERP drops its adapters, LIFT puts its weights back
                model.train(was_training)
                raise
            session.finish()
            model.train(was_training)
    masking.assert_preserved(targets)  # the merge itself must keep the zeros; this is a bug check
    masking.enforce(targets)  # canonical +0.0 at every pruned entry
    if isinstance(session, LiftSession):
        details["refreshes"] = session.refreshes
    if isinstance(teacher, TopKTargets):
        details["teacher_top_k"] = teacher.k
        details["teacher_seconds"] = teacher.seconds
    tokens = loop.steps_done * settings.gradient_accumulation_steps * min(batch_size, len(input_ids))
    return RecoveryResult(
        method=method,
        mode=mode,
        trainable_params=trainable,
        total_params=total_params,
        trainable_fraction=trainable / total_params,
        steps_done=loop.steps_done,
        seconds=loop.seconds,
        tokens_seen=tokens * input_ids.shape[1],
        losses=loop.losses,
        first_loss=loop.losses[0] if loop.losses else None,
        last_loss=loop.losses[-1] if loop.losses else None,
        sparsity=sparsity_before,
        peak_memory_mib=_peak_memory_mib(device),
        options={
            **dataclasses.asdict(settings),
            **dataclasses.asdict(method_opts),
            "method": method,
            "mode": mode,
            "distill": distill,
            "precision": compute_dtype if mode == "retrain" else "float32",
            "gradient_checkpointing": gradient_checkpointing and mode == "retrain",
            "teacher_top_k": teacher.k if isinstance(teacher, TopKTargets) else None,
            "hidden_distill": hidden_distill,
            "hidden_blocks": list(hidden_blocks),
            "windows": int(input_ids.shape[0]),
            "window_length": int(input_ids.shape[1]),
        },
        details=details,
    )


#: recover()'s keywords on how training runs, with their defaults: ``--option`` keys of every method
RUN_OPTIONS: dict[str, Any] = {
    key: inspect.signature(recover).parameters[key].default
    for key in (
        "precision",
        "gradient_checkpointing",
        "teacher_top_k",
        "hidden_distill",
        "hidden_stride",
        "micro_batch",
    )
}


def distils_from_topk(recover_kwargs: dict[str, Any]) -> bool:
    """Whether ``recover(**recover_kwargs)`` with a dense model at hand trains on precomputed top-k
    targets (retrain, distillation on, ``teacher_top_k`` not None): what ``dense_targets`` computes."""
    k = recover_kwargs.get("teacher_top_k", DEFAULT_TEACHER_TOP_K)
    mode = recover_kwargs.get("mode") or "retrain"
    return k is not None and recover_kwargs.get("distill") != 0 and mode == "retrain"


def dense_targets(
    model: nn.Module,
    input_ids: Tensor,
    recover_kwargs: dict[str, Any],
    *,
    max_seconds: float | None = None,
    min_windows: int = 0,
) -> TopKTargets | None:
    """The dense ``model``'s top-k targets for a later ``recover(**recover_kwargs)``: computed before
    pruning (``llmprune prune --recover``), so no dense copy is kept, or from a loaded dense checkpoint
    that can then be freed (``llmprune recover --dense_model``); None when those settings want a live
    teacher (``teacher_top_k=None``) or no distillation (``distill=0``). ``max_seconds``/``min_windows``:
    stop early, on the first windows (``recovery.windows.teacher_budget``; train on
    ``targets.input_ids`` then)."""
    if not distils_from_topk(recover_kwargs):
        return None
    k = recover_kwargs.get("teacher_top_k", DEFAULT_TEACHER_TOP_K)
    batch_size = recover_kwargs.get("batch_size") or TrainSettings.batch_size
    precision = recover_kwargs.get("precision", RUN_OPTIONS["precision"])
    weight = recover_kwargs.get("hidden_distill", RUN_OPTIONS["hidden_distill"])
    stride = recover_kwargs.get("hidden_stride", RUN_OPTIONS["hidden_stride"])
    blocks = _hidden_blocks(model, weight, stride, "retrain", model, None)
    return _teacher_pass(model, input_ids, k, batch_size, precision, blocks, max_seconds, min_windows)


def _teacher_pass(
    teacher: nn.Module,
    input_ids: Tensor,
    k: int,
    batch_size: int,
    precision: str,
    hidden_blocks: tuple[int, ...] = (),
    max_seconds: float | None = None,
    min_windows: int = 0,
) -> TopKTargets:
    """The dense model's top-k targets (and block outputs), computed in the precision training uses."""
    with autocast(precision, next(teacher.parameters()).device):
        return topk_targets(
            teacher, input_ids, k, batch_size, hidden_blocks, max_seconds=max_seconds, min_windows=min_windows
        )


def _hidden_blocks(
    model: nn.Module,
    weight: float,
    stride: int,
    mode: str,
    dense_model: nn.Module | None,
    teacher_targets: TopKTargets | None,
) -> tuple[int, ...]:
    """The decoder blocks whose outputs ``hidden_distill`` matches, or a one-line error before any work."""
    if not weight:
        return ()
    if weight < 0:
        raise ConfigError(f"hidden_distill must be >= 0 (0 = off), got {weight}.")
    if mode != "retrain":
        raise ConfigError(
            "hidden_distill applies to mode 'retrain' (reconstruct already matches every block)."
        )
    if dense_model is None and teacher_targets is None:
        raise ConfigError(
            f"hidden_distill={weight} needs dense_model=<the dense model> (or hidden_distill=0)."
        )
    blocks = tapped_blocks(len(masking.decoder_blocks(model)), stride)
    if teacher_targets is not None and teacher_targets.hidden_blocks != blocks:  # they win over dense_model
        raise ConfigError(
            f"teacher_targets hold the outputs of blocks {list(teacher_targets.hidden_blocks)}, "
            f"hidden_stride={stride} wants {list(blocks)}: compute them with the same hidden settings."
        )
    return blocks


def _pay_teacher_pass(settings: TrainSettings, seconds: float) -> None:
    """The time budget covers the teacher pass that made the targets (here or before pruning): the
    training loop gets what is left of ``max_seconds``."""
    if settings.max_seconds is None:
        return
    left = settings.max_seconds - seconds
    if left <= 0:
        log.warning(
            "the teacher pass took %.0f s of the %.0f s budget: one training step only", seconds,
            settings.max_seconds,
        )  # fmt: skip
    settings.max_seconds = max(left, 1e-3)


def _retrain(
    model: nn.Module,
    session,
    input_ids: Tensor,
    settings: TrainSettings,
    on_step,
    teacher: nn.Module | TopKTargets | None = None,
    distill: float = 0.0,
    precision: str = "float32",
    hidden_blocks: tuple[int, ...] = (),
    hidden_distill: float = 0.0,
) -> LoopResult:
    """Causal-LM loss on the token windows, mixed with distillation from ``teacher`` when ``distill > 0``.

    Why distil: the pruned model should behave like the dense one, not like the retraining text. The
    teacher's full next-token distribution is a far richer target than the one observed token, and it
    keeps short retraining on narrow text from drifting the model towards that text's style.
    """
    device = next(model.parameters()).device
    batches = index_batches(input_ids, settings.batch_size, settings.seed)
    live = isinstance(teacher, nn.Module)
    student_taps = BlockOutputs(model, hidden_blocks)
    if live:
        teacher.eval()
        teacher_device = next(teacher.parameters()).device
        teacher_taps = BlockOutputs(teacher, hidden_blocks)

    def loss_fn(rows: Tensor) -> Tensor:
        batch = input_ids[rows].to(device)
        target = hidden_target = None
        if live:
            with torch.no_grad(), autocast(precision, teacher_device), teacher_taps.recording():
                target = teacher(input_ids=batch.to(teacher_device), use_cache=False).logits.to(device)
            hidden_target = teacher_taps.stacked() if hidden_blocks else None
        elif teacher is not None:
            target, hidden_target = teacher.rows(rows), teacher.hidden_rows(rows)
        # a fresh autocast context per step: autocast caches the bf16 copies of trained leaves (LoRA's A
        # and B) until its outermost context exits, and one context around the loop would train stale copies
        with autocast(precision, device), student_taps.recording():
            logits = model(input_ids=batch, use_cache=False).logits
        loss = retraining_loss(logits, batch, target, distill)
        if hidden_blocks:
            loss = loss + hidden_distill * hidden_error(student_taps.outputs, hidden_target)
        student_taps.outputs = []
        return loss

    params = session.parameters()
    if not params:
        raise ConfigError("nothing to train: the model has no pruned Linear, norm or bias to recover.")
    desc = type(session).__name__.removesuffix("Session").upper()
    return run(loss_fn, batches, session.optimizer(params, settings), settings, on_step=on_step, desc=desc)
