"""LIFT (Liu et al., ICML 2025, arXiv 2506.00772): train only the *principal weights* of each pruned Linear.

Principal weights are the top-K entries by ``|W_r|``, where ``W_r`` is the rank-r approximation of the
weight (SVD). On a pruned model the choice is restricted to kept entries, or training would un-prune
weights. K defaults to ``(m + n)·rank`` (the parameter count of a rank-r LoRA), about 5 % of a matrix.

The optimiser keeps AdamW moments for the K selected entries only (``2·K`` floats per matrix, not
``m·n``) as ``(index, value)`` pairs, and in a session the gradient too: a hook keeps the K selected
entries of each weight's gradient as soon as backward has made it and frees the full one, so the
gradients of all the model's Linears are never alive at once (425 MB on SmolLM2). The copy that puts
the weights back after a failure holds only the entries ever selected, not every weight.
Every ``update_interval`` steps the selection is recomputed from the
current weights; moments are carried for entries in both the old and the new selection, new entries
start at zero. Weight decay is decoupled and really applied to the selected entries (the reference
writes it into an indexed copy, so it does nothing). Norms, biases, embeddings and lm_head stay frozen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune.errors import ConfigError, did_you_mean
from llmprune.recovery import masking
from llmprune.recovery.train import GradFlags, TrainSettings

log = logging.getLogger(__name__)

SVD_MODES = ("auto", "exact", "lowrank")
_EXACT_MAX_DIM = 1024  # "auto": full SVD up to this min(m, n), randomised svd_lowrank above


@dataclass
class LiftOptions:
    """LIFT's knobs (``recover(method="lift", **options)``)."""

    rank: int = 16  # rank of the approximation W_r
    budget_rank: int | None = None  # K = (m + n)·budget_rank; None = rank
    density: float | None = None  # instead: K = density · (number of kept entries)
    update_interval: int = 50  # steps between selection refreshes
    svd: str = "auto"
    niter: int = 2  # power iterations of svd_lowrank

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LIFT rank must be >= 1, got {self.rank}.")
        if self.budget_rank is not None and self.budget_rank < 1:
            raise ConfigError(f"budget_rank must be >= 1, got {self.budget_rank}.")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}.")
        if self.update_interval < 1:
            raise ConfigError(f"update_interval must be >= 1, got {self.update_interval}.")
        if self.svd not in SVD_MODES:
            raise ConfigError(
                f"unknown svd {self.svd!r}{did_you_mean(self.svd, SVD_MODES)}: use {SVD_MODES}."
            )

    def budget(self, shape: tuple[int, int], kept: int) -> int:
        if self.density is not None:
            k = math.ceil(self.density * kept)
        else:
            k = (shape[0] + shape[1]) * (self.budget_rank or self.rank)
        return max(1, min(k, kept))


def low_rank(weight: Tensor, rank: int, svd: str = "auto", niter: int = 2) -> Tensor:
    """Rank-``rank`` approximation of a 2-D weight, in fp32: ``U_r diag(S_r) V_rᵀ``."""
    w = weight.detach().float()
    rank = min(rank, *w.shape)
    if svd == "exact" or (svd == "auto" and min(w.shape) <= _EXACT_MAX_DIM):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (m, p), (p,), (p, n)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    u, s, v = torch.svd_lowrank(w, q=min(2 * rank, *w.shape), niter=niter)  # (m, q), (q,), (n, q)
    return (u[:, :rank] * s[:rank]) @ v[:, :rank].t()


def principal_indices(
    weight: Tensor, keep: Tensor | None, rank: int, k: int, svd: str = "auto", niter: int = 2
) -> Tensor:
    """Sorted flat indices (int64, into ``weight.view(-1)``) of the top-``k`` kept entries by ``|W_r|``.

    Works in whatever layout ``weight`` has: the low-rank approximation commutes with transposition.
    """
    score = low_rank(weight, rank, svd, niter).abs()  # (m, n)
    if keep is not None:
        score = score.masked_fill(~keep, -1.0)  # |W_r| >= 0, so pruned entries rank last
        k = min(k, int(keep.sum()))
    return torch.topk(score.reshape(-1), k, sorted=False).indices.sort().values


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over a chosen set of entries of each parameter; state ``(exp_avg, exp_avg_sq)`` of length K.

    >>> opt = SparseAdamW([(linear.weight, idx)], lr=1e-4)  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[tuple[nn.Parameter, Tensor]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        pairs = list(params)
        super().__init__(
            [p for p, _ in pairs], {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        for p, index in pairs:
            if not p.is_contiguous():
                raise ConfigError("SparseAdamW needs contiguous parameters (it updates p.view(-1) in place).")
            self.set_indices(p, index)

    @torch.no_grad()
    def set_indices(self, p: nn.Parameter, index: Tensor) -> None:
        """Select the entries to train; moments of entries already selected are carried over."""
        index = index.to(device=p.device, dtype=torch.long).unique(sorted=True)
        state = self.state[p]
        exp_avg = torch.zeros(index.numel(), dtype=torch.float32, device=p.device)
        exp_avg_sq = torch.zeros_like(exp_avg)
        old = state.get("index")
        if old is not None and old.numel():
            pos = torch.searchsorted(old, index).clamp_(max=old.numel() - 1)
            hit = old[pos] == index
            exp_avg[hit] = state["exp_avg"][pos[hit]]
            exp_avg_sq[hit] = state["exp_avg_sq"][pos[hit]]
        state.update(index=index, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        state.setdefault("step", 0)

    def compact_gradients(self) -> list:
        """From now on keep only the selected entries of each gradient (summed over micro-batches) and
        drop the full ``p.grad`` as soon as backward has written it. Returns the hook handles."""
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                handles.append(p.register_post_accumulate_grad_hook(self._compact))
        return handles

    @torch.no_grad()
    def _compact(self, p: nn.Parameter) -> None:
        state = self.state[p]
        picked = p.grad.reshape(-1).index_select(0, state["index"]).float()
        state["grad"] = picked if state.get("grad") is None else state["grad"].add_(picked)
        p.grad = None

    def _grad(self, p: nn.Parameter) -> Tensor | None:
        """The selected entries of ``p``'s gradient (K,), compacted or taken from ``p.grad``."""
        state = self.state[p]
        if state.get("grad") is not None:
            return state["grad"]
        return None if p.grad is None else p.grad.reshape(-1).index_select(0, state["index"]).float()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for state in self.state.values():
            state["grad"] = None

    def state_numel(self, p: nn.Parameter) -> int:
        """Floats of optimiser state held for ``p``: ``2·K``."""
        state = self.state[p]
        return state["exp_avg"].numel() + state["exp_avg_sq"].numel()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the selected gradient entries (the others are never used)."""
        grads = [x for g in self.param_groups for p in g["params"] if (x := self._grad(p)) is not None]
        if not grads:
            return 0.0
        total = float(torch.linalg.vector_norm(torch.cat(grads)))
        if total > max_norm:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.mul_(max_norm / (total + 1e-6))
                    if self.state[p].get("grad") is not None:
                        self.state[p]["grad"].mul_(max_norm / (total + 1e-6))
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                grad = self._grad(p)  # (K,)
                if grad is None:
                    continue
                state = self.state[p]
                index = state["index"]
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias1 = 1.0 - beta1 ** state["step"]
                bias2 = 1.0 - beta2 ** state["step"]
                denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
                flat = p.view(-1)
                values = flat.index_select(0, index).float()  # (K,)
                if wd:
                    values.mul_(1.0 - lr * wd)  # decoupled decay, on the real weights
                values.addcdiv_(exp_avg, denom, value=-lr / bias1)
                flat.index_copy_(0, index, values.to(p.dtype))
                state["grad"] = None
        return loss


class LiftSession:
    """Attach (select principal weights) → train with :class:`SparseAdamW` → ``finish()``."""

    def __init__(self, model: nn.Module, targets: dict[str, tuple[nn.Module, Tensor]], options: LiftOptions):
        self.model, self.targets, self.options = model, targets, options
        self._grad_flags = GradFlags(model)
        self._keep: dict[int, Tensor] = {}  # id(weight) -> keep in weight layout
        self.indices: dict[str, Tensor] = {}  # name -> current selection
        self._names: dict[int, str] = {}
        self.optimizer_: SparseAdamW | None = None
        self.refreshes = 0
        self._originals: dict[int, tuple[nn.Parameter, Tensor, Tensor]] = {}  # id -> (weight, index, values)
        self._hooks: list = []

    def attach(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name, (module, keep) in self.targets.items():
            weight = module.weight
            weight.requires_grad_(True)
            self._keep[id(weight)] = masking.to_weight_layout(module, keep)
            self._names[id(weight)] = name
            self.indices[name] = self._select(weight)

    @torch.no_grad()
    def _remember(self, weight: nn.Parameter, index: Tensor) -> None:
        """Keep (on CPU) the values of entries selected for the first time: only selected entries are
        ever trained, so these are all that a failed run has to put back."""
        _, seen, values = self._originals.get(
            id(weight), (weight, index[:0], weight.new_empty(0, device="cpu"))
        )
        new = index[~torch.isin(index, seen.to(index.device))]
        if new.numel():
            seen = torch.cat([seen, new.cpu()])
            values = torch.cat([values, weight.detach().reshape(-1).index_select(0, new).cpu()])
        self._originals[id(weight)] = (weight, seen.cpu(), values)

    def _select(self, weight: nn.Parameter) -> Tensor:
        keep = self._keep[id(weight)]
        k = self.options.budget(tuple(weight.shape), int(keep.sum()))
        index = principal_indices(weight, keep, self.options.rank, k, self.options.svd, self.options.niter)
        self._remember(weight, index)
        return index

    def parameters(self, scope: nn.Module | None = None) -> list[nn.Parameter]:
        """The trained weights (all of them, or those inside ``scope``)."""
        weights = [m.weight for m, _ in self.targets.values()]
        if scope is None:
            return weights
        inside = {id(p) for p in scope.parameters()}
        return [w for w in weights if id(w) in inside]

    def optimizer(self, params: list[nn.Parameter], settings: TrainSettings) -> SparseAdamW:
        if settings.optim != "adamw":
            raise ConfigError(
                f"LIFT uses its own sparse AdamW; optim={settings.optim!r} does not apply: use optim='adamw'."
            )
        pairs = [(p, self.indices[self._names[id(p)]]) for p in params]
        self.optimizer_ = SparseAdamW(pairs, lr=settings.lr, weight_decay=settings.weight_decay)
        self._hooks = self.optimizer_.compact_gradients()
        return self.optimizer_

    def after_step(self, step: int) -> None:
        if (step + 1) % self.options.update_interval == 0 and self.optimizer_ is not None:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-select principal weights from the current weights (moments carried where selected before)."""
        opt = self.optimizer_
        for group in opt.param_groups:
            for p in group["params"]:
                index = self._select(p)
                self.indices[self._names[id(p)]] = index
                opt.set_indices(p, index)
        self.refreshes += 1

    def trainable_count(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @torch.no_grad()
    def finish(self, merge: bool = True) -> None:
        """Restore ``requires_grad``; ``merge=False`` (a failed or diverged run) also puts the weights back
        as they were before training, as PERP does by dropping its adapters."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if not merge:
            for weight, index, values in self._originals.values():
                weight.view(-1).index_copy_(
                    0, index.to(weight.device), values.to(weight.device, weight.dtype)
                )
        self._originals = {}
        self._grad_flags.restore()
