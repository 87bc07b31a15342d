"""Checkpoints after every block, so a killed run continues where it stopped and ends bit-identical.

One folder per run::

    state.json                        format, settings fingerprint, next_block: replaced atomically, LAST
    block-00003.safetensors           block 3 after pruning, every tensor under its model name
    block-00003.masks.safetensors     its keep-masks (8 per byte)
    block-00003.json                  its module and block reports
    hidden-00004/s000016.pt           block 4's inputs (pruned block 3's outputs), one file per batch,
                                      named by its first sample
    rng-00004.pt                      torch RNG states at that point

Why this shape: every file of block ``i`` is complete (written to a temporary name, fsynced, renamed)
before ``state.json`` says ``next_block = i + 1``, so a kill at any instant leaves either the old state
(block ``i``'s files are ignored and rewritten) or the new one. Only the latest block boundary's hidden
states are kept. Whole blocks rather than masks: SparseGPT also changes the kept weights, and in
streaming mode a block file *is* the output shard, so nothing is written twice. The activations of a
batch are named by the global index of its first sample and re-cut on reading, so a resumed run may
use a different number of processes (whose shares cut the batches elsewhere).

A settings fingerprint (method, options, selection, seed, calibration tokens, model config
and embeddings, dtype, device type, llmprune version) refuses a resume that would mix two runs. The
number of processes is not in it, nor the batch size (except with fused block recovery or experts):
results do not depend on them.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.capture import BlockInputs, DiskList
from llmprune.calibration.data import tokens_hash
from llmprune.calibration.distributed import Comm
from llmprune.calibration.modules import find_blocks
from llmprune.errors import ConfigError, ModelLoadError
from llmprune.io.atomic import atomic_write, fsync_dir, fsync_file, link_or_copy, temp_path
from llmprune.io.fingerprint import tensors_digest
from llmprune.io.masks import load_keep_masks, save_keep_masks
from llmprune.io.safetensors import save_tensors
from llmprune.result import BlockReport, ModuleReport, PruneResult
from llmprune.version import __version__

log = logging.getLogger(__name__)

FORMAT = "llmprune.progress.v1"


def default_checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """``<parent>/.<name>.llmprune-progress``: beside ``output_dir``, not inside it, because the final
    save replaces ``output_dir`` as a whole and refuses folders holding anything but a checkpoint."""
    out = Path(output_dir).expanduser()
    return out.parent / f".{out.name}.llmprune-progress"


def resolve_checkpoint_dir(
    checkpoint_dir: str | os.PathLike | None, output_dir: str | os.PathLike | None, resume: bool
) -> Path | None:
    """Where progress goes: ``checkpoint_dir``, else (when resuming) beside ``output_dir``, else nowhere."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir).expanduser()
    if not resume:
        return None
    if output_dir is None:
        raise ConfigError(
            "resume=True needs checkpoint_dir=… (or output_dir=…, beside which progress is kept)."
        )
    return default_checkpoint_dir(output_dir)


def _tensor_hash(t: Tensor) -> str:
    """sha256 of at most ~1M evenly spaced elements: tells two checkpoints apart in milliseconds."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // (1 << 20))].cpu().contiguous()
    return hashlib.sha256(sample.view(torch.uint8).numpy().tobytes()).hexdigest()


def run_fingerprint(
    cfg,
    model: nn.Module,
    input_ids: Tensor,
    num_blocks: int,
    device: torch.device,
    block_weights: list[str] | None = None,
) -> dict[str, Any]:
    """Everything that changes the pruned weights. ``cfg`` is the engine's ``EngineConfig``.

    ``block_weights`` identifies the weights as loaded: one digest per decoder block (computed here for a
    model in memory), or one digest of the checkpoint files for a streamed model (given by the caller).
    """
    if block_weights is None:
        blocks = find_blocks(model)[1]
        on_meta = any(p.device.type == "meta" for b in blocks for p in b.parameters())
        block_weights = [] if on_meta else [tensors_digest(b.named_parameters()) for b in blocks]

    sel = cfg.selection
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    embeddings = model.get_input_embeddings().weight
    fp = {
        "llmprune": __version__,
        "method": cfg.solver.name,
        "options": cfg.options,
        "allocation": [cfg.allocation, dataclasses.asdict(cfg.allocation_options)],
        "sparsity": str(sel.default),
        "targets": list(sel.targets),
        "ignore": list(sel.ignore),
        "overrides": {k: str(v) for k, v in sel.overrides.items()},
        "true_sequential": cfg.true_sequential,
        "batch_size": cfg.batch_size if _batching_matters(cfg, config) else "any",
        "seed": cfg.seed,
        "calibration_hash": tokens_hash(input_ids),
        "calibration_shape": list(input_ids.shape),
        "model_config_hash": hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode()
        ).hexdigest(),
        "embeddings_hash": _tensor_hash(embeddings),
        "num_blocks": num_blocks,
        "block_weights": block_weights,
        "dtype": str(embeddings.dtype),
        "device": device.type,
    }
    normal = json.dumps(fp, sort_keys=True, default=str)
    return json.loads(normal)  # JSON-normal form: compares equal to what a reload gives


def _batching_matters(cfg, config: dict[str, Any]) -> bool:
    """Statistics are summed per sample in a fixed order, so the batch size changes no bit of the result,
    and a run may resume with another one. Two exceptions keep it in the fingerprint: fused block recovery
    (one training step per calibration batch) and mixture-of-experts models (tokens routed to an expert
    cannot be told apart per sample, so their sums follow the batching)."""
    experts = any("expert" in k and isinstance(v, int) and v > 1 for k, v in config.items())
    return getattr(cfg, "block_recovery", None) is not None or experts


def block_tensors(block: nn.Module, name: str) -> dict[str, Tensor]:
    """A block's parameters and persistent buffers under their model names, each storage once."""
    out: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for key, t in block.state_dict().items():
        t = t.detach()
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if where in seen:  # the very same tensor under two names (tied inside the block)
            continue
        seen.add(where)
        out[f"{name}.{key}"] = t
    return out


class Progress:
    """The checkpoint folder of one run: what is done, and the means to continue after it.

    ``resumable=False`` keeps only the block weight files (streaming without ``resume``: the output
    shards have to be written somewhere as blocks finish) and skips activations and state.
    """

    def __init__(
        self, folder: Path, comm: Comm, fingerprint: dict[str, Any], *, resumable: bool = True
    ) -> None:
        self.folder = Path(folder)
        self.comm = comm
        self.fingerprint = fingerprint
        self.resumable = resumable
        self.next_block = 0

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        comm: Comm,
        fingerprint: dict[str, Any],
        *,
        resume: bool,
        resumable: bool = True,
    ) -> Progress:
        """Continue the run recorded in ``folder`` (``resume=True``) or start a new one there."""
        prog = cls(Path(folder).expanduser(), comm, fingerprint, resumable=resumable)
        state_path = prog.folder / "state.json"
        if resumable and state_path.is_file():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            done = f"{state.get('next_block')}/{state.get('fingerprint', {}).get('num_blocks')} blocks done"
            if not resume:
                raise ConfigError(
                    f"{prog.folder} holds the progress of an earlier run ({done}). Fix: pass resume=True "
                    "(--resume) to continue it, or remove the folder (or choose another checkpoint_dir) to "
                    "start over."
                )
            saved = state.get("fingerprint", {})
            _check_fingerprint(prog.folder, saved, fingerprint, int(state["next_block"]))
            prog.next_block = int(state["next_block"])
            log.info("resuming from %s: %s", prog.folder, done)
        elif resume:
            log.info("no progress in %s yet: starting from the first block", prog.folder)
        comm.check_same("checkpoint state", str(prog.next_block))
        if comm.is_main:
            prog.folder.mkdir(parents=True, exist_ok=True)
        comm.barrier()
        return prog

    def block_file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def keep_masks_file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.masks.safetensors"

    def _hidden_dir(self, index: int) -> Path:
        return self.folder / f"hidden-{index:05d}"

    # ------------------------------------------------------------ writing

    def save_block(
        self,
        index: int,
        block: nn.Module,
        name: str,
        inputs: BlockInputs | None,
        result: PruneResult,
        num_blocks: int,
    ) -> None:
        """Record pruned block ``index`` (named ``name``): weights and keep-masks always; the next
        block's inputs, the reports and the state too when resumable."""
        prefix = f"{name}."
        if self.comm.is_main:
            tensors = block_tensors(block, name)
            atomic_write(self.block_file(index), lambda p: save_tensors(p, tensors), durable=self.resumable)
            masks = {n: m for n, m in result.keep_masks.items() if n.startswith(prefix)}
            if masks:
                atomic_write(
                    self.keep_masks_file(index), lambda p: save_keep_masks(masks, p), durable=self.resumable
                )
        if not self.resumable:
            return
        nxt = index + 1
        if inputs is not None and nxt < num_blocks:
            folder = self._hidden_dir(nxt)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(len(inputs)):
                target = folder / f"s{inputs.starts[k]:06d}.pt"
                if isinstance(inputs.hidden, DiskList):  # already a file: link it, no copy
                    tmp = temp_path(target)
                    link_or_copy(inputs.hidden.path(k), tmp)
                    fsync_file(tmp)
                    os.replace(tmp, target)
                else:
                    atomic_write(target, lambda p, t=inputs.hidden[k]: torch.save(t.detach().cpu(), p))
        self.comm.barrier()  # every rank's activations are on disk before the state names them
        if self.comm.is_main:
            reports = {
                "modules": [asdict(r) for n, r in result.modules.items() if n.startswith(prefix)],
                "block": asdict(result.blocks[-1]),
            }
            atomic_write(
                self.folder / f"block-{index:05d}.json",
                lambda p: p.write_text(json.dumps(reports), encoding="utf-8"),
            )
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            atomic_write(self.folder / f"rng-{nxt:05d}.pt", lambda p: torch.save(rng, p))
            state = {"format": FORMAT, "next_block": nxt, "fingerprint": self.fingerprint}
            atomic_write(
                self.folder / "state.json",
                lambda p: p.write_text(json.dumps(state, indent=1), encoding="utf-8"),
            )
            fsync_dir(self.folder)
        self.next_block = nxt
        self.comm.barrier()
        if self.comm.is_main:  # the previous boundary is no longer needed
            shutil.rmtree(self._hidden_dir(index), ignore_errors=True)
            (self.folder / f"rng-{index:05d}.pt").unlink(missing_ok=True)

    # ------------------------------------------------------------ reading

    def restore(
        self,
        name_of: Callable[[int], str],
        blocks: list[nn.Module],
        inputs: BlockInputs | None,
        result: PruneResult,
        *,
        in_memory: bool,
    ) -> None:
        """Bring back blocks ``0 … next_block-1`` (reports; with ``in_memory`` also weights and keep-masks,
        which streaming leaves on disk), then the next block's inputs and the RNG state."""
        from safetensors import safe_open

        for j in range(self.next_block):
            try:
                reports = json.loads((self.folder / f"block-{j:05d}.json").read_text(encoding="utf-8"))
            except FileNotFoundError as exc:
                raise ModelLoadError(
                    f"checkpoint {self.folder} is incomplete ({exc}): remove it to start over."
                ) from exc
            for r in reports["modules"]:
                result.modules[r["name"]] = ModuleReport(**{**r, "shape": tuple(r["shape"])})
            result.blocks.append(BlockReport(**reports["block"]))
            if not in_memory:
                continue
            if self.keep_masks_file(j).is_file():
                result.keep_masks.update(load_keep_masks(self.keep_masks_file(j)))
            prefix = name_of(j) + "."
            with safe_open(str(self.block_file(j)), framework="pt") as fh:
                state = {k[len(prefix) :]: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            _missing, unexpected = blocks[j].load_state_dict(state, strict=False)
            if unexpected:
                raise ModelLoadError(f"checkpoint block {j} has tensors the model lacks: {unexpected[:3]}")
        if inputs is not None and self.next_block < len(blocks):
            saved = _SavedHidden(self._hidden_dir(self.next_block))
            for k in range(len(inputs)):
                hidden = inputs.hidden[k]
                inputs.hidden[k] = saved.samples(inputs.starts[k], hidden.shape[0]).to(hidden.device)
        rng_path = self.folder / f"rng-{self.next_block:05d}.pt"
        if rng_path.is_file():
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def discard(self) -> None:
        """Remove the folder (after the result is safely saved)."""
        self.comm.barrier()
        if self.comm.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


class _SavedHidden:
    """A block boundary's saved activations, read back by sample range: the run that wrote them may
    have cut its batches at other places (another number of processes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.starts = sorted(int(p.stem[1:]) for p in folder.glob("s*.pt"))
        self._cache: dict[int, Tensor] = {}

    def _file(self, start: int) -> Tensor:
        if start not in self._cache:
            self._cache = {start: torch.load(self.folder / f"s{start:06d}.pt", weights_only=True)}
        return self._cache[start]

    def samples(self, first: int, count: int) -> Tensor:
        """Samples ``[first, first + count)`` as one (count, L, d) tensor."""
        parts, at = [], first
        while at < first + count:
            i = bisect.bisect_right(self.starts, at) - 1
            if i < 0:
                raise ModelLoadError(f"checkpoint {self.folder} lacks sample {at}: remove it to start over.")
            saved = self._file(self.starts[i])
            offset = at - self.starts[i]
            if offset >= saved.shape[0]:
                raise ModelLoadError(f"checkpoint {self.folder} lacks sample {at}: remove it to start over.")
            take = saved[offset : offset + first + count - at]
            parts.append(take)
            at += take.shape[0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def discard_progress(folder: str | os.PathLike | None, comm: Comm | None = None) -> None:
    """Remove a run's checkpoint folder once its result is saved (rank 0 only; a no-op for None).

    Only a folder holding recorded progress (``state.json``) is removed: a run that recorded none, e.g.
    magnitude pruning, leaves whatever the path holds alone.
    """
    if folder is None:
        return
    from llmprune.calibration.distributed import current_comm

    comm = comm or current_comm()
    comm.barrier()
    path = Path(folder).expanduser()
    if comm.is_main and (path / "state.json").is_file():
        shutil.rmtree(path, ignore_errors=True)


def _check_fingerprint(folder: Path, saved: dict[str, Any], now: dict[str, Any], done: int = 0) -> None:
    """Refuse other settings or other weights. The blocks already done are restored from ``folder``, so
    only the weights of the blocks still to prune must match the original run's."""
    diffs = [
        f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now"
        for k in sorted(set(saved) | set(now))
        if k != "block_weights" and saved.get(k) != now.get(k)
    ]
    before, after = saved.get("block_weights") or [], now.get("block_weights") or []
    per_block = len(before) == len(after) == saved.get("num_blocks")
    if (before[done:] != after[done:]) if per_block else before != after:
        changed = [i for i in range(done, len(after)) if per_block and before[i] != after[i]]
        where = f"block {changed[0]}" if changed else "the checkpoint files"
        diffs.append(f"block_weights: {where} holds other weights than when the run started")
    if diffs:
        raise ConfigError(
            f"cannot resume from {folder}: it was made with other settings ({'; '.join(diffs)}). Fix: rerun "
            "with "
            "the same settings, or remove the folder (or choose another checkpoint_dir) to start over."
        )
