"""The Python API: the same names as the CLI flags and the recipe keys.

>>> import llmprune
>>> model, tok = llmprune.load_model("smollm2-135m")                     # doctest: +SKIP
>>> result = llmprune.prune(model, tok, method="wanda", sparsity="2:4",
...                         num_calibration_samples=32, max_seq_length=512)  # doctest: +SKIP
>>> round(result.overall_sparsity, 3)                                       # doctest: +SKIP
0.5
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from llmprune import preflight
from llmprune.calibration.data import tokens_hash
from llmprune.calibration.distributed import current_comm
from llmprune.calibration.engine import prune_blocks
from llmprune.calibration.modules import find_blocks
from llmprune.calibration.resume import Progress, discard_progress, run_fingerprint
from llmprune.calibration.settings import calibration_ids, engine_config, is_model_path
from llmprune.calibration.weights_only import prune_weights_only
from llmprune.errors import ConfigError
from llmprune.io.atomic import temp_path
from llmprune.io.fingerprint import files_digest
from llmprune.io.models import load_model, resolve_device, resolve_dtype
from llmprune.io.save import check_output_dir, save_pruned, save_streamed
from llmprune.recovery.blockwise import BlockReconstructor, BlockwiseOptions
from llmprune.result import PruneResult
from llmprune.structured.pipeline import prune_structured

log = logging.getLogger(__name__)


def prune(
    model,
    tokenizer=None,
    *,
    method: str = "wanda",
    sparsity: float | str = 0.5,
    dataset: Any = None,
    num_calibration_samples: int | None = None,
    max_seq_length: int | None = None,
    seed: int = 0,
    targets: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    overrides: Mapping[str, float | str] | None = None,
    true_sequential: bool = False,
    allocation: str = "uniform",
    batch_size: int = 8,
    device: str | None = "auto",
    dtype: str | None = "float32",
    output_dir: str | None = None,
    overwrite: bool = False,
    streaming: bool = False,
    max_memory: int | str | None = None,
    offload_dir: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    recipe: dict | None = None,
    run_info: dict | None = None,
    structure: str = "unstructured",
    recover: str | None = None,
    recover_options: Mapping[str, Any] | None = None,
    **solver_args: Any,
) -> PruneResult:
    """Prune ``model`` in place, block by block, and report what was done.

    ``model`` is a loaded causal LM or anything ``load_model`` accepts (Hub id, folder, ``.gguf``,
    ``"smollm2-135m"``). ``sparsity`` is a fraction (``0.5``) or an N:M pattern (``"2:4"``: keep 2 of
    every 4). ``dataset`` is any calibration source (see ``llmprune.calibration.data``); ``None`` uses
    the built-in public-domain text. Extra keyword arguments go to the solver (e.g. ``block_size=128``).
    ``allocation`` (``uniform``, ``owl``, ``error``, ``depth``) spreads an unstructured ``sparsity``
    unevenly over the layers, keeping the mean; its options share the keywords (``owl_lambda=0.08``).
    With ``output_dir`` the pruned checkpoint is written there (atomically), with ``recipe`` and
    ``run_info`` as provenance (the CLI records its resolved recipe and command); an earlier llmprune
    output there is replaced only with ``overwrite=True``, and any other non-empty folder is refused.

    Sizes default to the model and the machine: ``max_seq_length`` is the smaller of 2048 and the
    model's positions, ``num_calibration_samples`` 128 on a GPU and 32 on CPU; a token tensor brings its
    own rows and width (asking for fewer cuts it, and says so). Every setting is checked before the
    model loads (``llmprune.preflight``), and selections that match no module before calibration.

    For models larger than memory:

    * ``streaming=True`` never loads the model whole: ``model`` is a folder or Hub id of safetensors
      weights, each decoder block is read, pruned and written to ``output_dir`` (required) in turn;
    * ``max_memory`` (``"8GB"``, ``"512MiB"``, bytes) caps the calibration activations kept in memory;
      above it they go to ``offload_dir`` (default: a temporary folder);
    * ``checkpoint_dir`` records progress after every block and ``resume=True`` continues a killed run
      from it, bit-identically (default folder: beside ``output_dir``). Progress is removed once
      ``output_dir`` is written; without ``output_dir`` it stays until you have saved the model
      (``llmprune.calibration.resume.discard_progress`` removes it).

    Under ``torchrun`` the processes share the calibration and the solves (same result as one process);
    rank 0 reads the calibration data and writes ``output_dir``.

    >>> llmprune.prune("./llama-70b", method="sparsegpt", sparsity="2:4", streaming=True,
    ...                output_dir="./llama-70b-2of4", max_memory="16GB", resume=True)  # doctest: +SKIP

    ``recover`` (``"perp"`` or ``"lift"``) fuses block-wise reconstruction into the pass: right after a
    block is pruned, its recovery parameters are trained so that it reproduces the dense block's attention
    and MLP outputs (recorded by the calibration forward), and the next block is fed the recovered
    block's outputs. ``recover_options``: ``steps`` (per block), ``max_seconds`` (recovery time over all
    blocks), ``lr``, ``seed``… and the method's options (``r``, ``rank``…); see
    ``llmprune.recovery.blockwise``. Every pruned weight stays exactly zero.

    ``structure`` other than ``"unstructured"`` (``depth``, ``width``, ``heads``, ``auto``) removes
    ``sparsity`` of the decoder-block parameters as whole structures and returns a
    ``StructuredResult`` whose ``.model`` is the new, smaller model (see ``llmprune.structured``).
    """
    if structure != "unstructured":
        return _prune_structured(model, tokenizer, locals(), solver_args)
    cfg = engine_config(
        model,
        method=method,
        sparsity=sparsity,
        targets=targets,
        ignore=ignore,
        overrides=overrides,
        true_sequential=true_sequential,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        dataset=dataset,
        output_dir=output_dir,
        streaming=streaming,
        max_memory=max_memory,
        offload_dir=offload_dir,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        options=solver_args,
        allocation=allocation,
    )
    fused = _fused_recovery(recover, recover_options, seed)  # checked before loading, like the rest
    preflight.before_loading(
        model,
        output_dir=output_dir,
        overwrite=overwrite,
        dataset=dataset,
        device=device,
        solver=cfg.solver,
        options=cfg.options,  # the solver's own (allocation options were split off and checked)
        max_seq_length=max_seq_length,
    )
    comm = current_comm()
    if fused is not None and comm.world > 1:
        raise ConfigError(
            "recover= trains each block on all calibration batches, which torchrun splits between processes: "
            "prune with torchrun, then run `llmprune recover` in one process (or drop recover)."
        )
    source = folder = None
    if streaming:  # the model stays on disk: a skeleton in memory, its blocks read one at a time
        from llmprune.calibration.streaming import open_streamed

        cfg.device = resolve_device(device)
        model, tokenizer, source, folder = open_streamed(
            model, tokenizer, resolve_dtype(dtype, cfg.device), trust_remote_code
        )
        if comm.is_main:
            check_output_dir(Path(output_dir).expanduser(), model, overwrite)
    else:
        if is_model_path(model):
            model, tokenizer = load_model(
                str(model), dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        in_place = next(model.parameters()).device
        cfg.device = resolve_device(device) if device not in (None, "auto") else in_place
    torch.manual_seed(seed)
    start = time.perf_counter()
    selection = cfg.selection
    preflight.after_loading(model, selection)
    if fused is not None:
        cfg.block_recovery = BlockReconstructor(fused, len(find_blocks(model)[1]))
    # e.g. magnitude: no forward pass at all (unless block-wise recovery needs the dense outputs)
    data_free = not cfg.solver.needs and not true_sequential and fused is None
    result = PruneResult(method=method, sparsity=str(selection.default), options=dict(solver_args), seed=seed)
    checkpoint = None  # where a streamed run records its pruned blocks
    try:
        if data_free:
            if cfg.checkpoint_dir is not None:
                log.info("%s reads only the weights and takes seconds: no progress is recorded", method)
            if streaming:  # the pruned blocks still have to be written somewhere as they finish
                checkpoint = _open_checkpoint(None, False, output_dir, comm, {})
            prune_weights_only(model, cfg, result, source=source, checkpoint=checkpoint)
        else:
            input_ids = calibration_ids(
                model, dataset, tokenizer, num_calibration_samples, max_seq_length, seed, comm
            )
            result.calibration_hash = tokens_hash(input_ids)
            result.num_calibration_samples, result.max_seq_length = map(int, input_ids.shape)
            if streaming:
                weights = [files_digest(sorted(Path(folder).glob("*.safetensors")))]
                fingerprint = run_fingerprint(cfg, model, input_ids, len(source.blocks), cfg.device, weights)
                checkpoint = _open_checkpoint(cfg.checkpoint_dir, cfg.resume, output_dir, comm, fingerprint)
            if streaming or not selection.default.is_dense or selection.overrides:
                prune_blocks(model, input_ids, cfg, result, source=source, checkpoint=checkpoint)
        result.seconds = time.perf_counter() - start
        if cfg.block_recovery is not None:
            result.recovery = cfg.block_recovery.report()
        result.dense_weights = _unselected_weights(model, result)
        log.info(
            "%s %s: %.2f%% of the block Linears' weights zero (%d pruned) in %.1fs",
            method,
            result.sparsity,
            100 * result.overall_sparsity,
            len(result.modules),
            result.seconds,
        )
        if output_dir is not None and comm.is_main:
            if streaming:
                num = len(source.blocks)
                save_streamed(
                    model,
                    tokenizer,
                    output_dir,
                    result=result,
                    block_files=[checkpoint.block_file(i) for i in range(num)],
                    keep_mask_files=[checkpoint.keep_masks_file(i) for i in range(num)],
                    source_folder=folder,
                    recipe=recipe,
                    run_info=run_info,
                )
            else:
                save_pruned(
                    model, tokenizer, output_dir, result=result, recipe=recipe, run_info=run_info,
                    overwrite=overwrite,
                )  # fmt: skip
    except BaseException:
        if streaming and checkpoint is not None and not checkpoint.resumable and comm.is_main:
            shutil.rmtree(checkpoint.folder, ignore_errors=True)  # nothing to resume from: no half model left
        raise
    if output_dir is not None:
        if checkpoint is not None:
            checkpoint.discard()
        else:
            discard_progress(cfg.checkpoint_dir, comm)
    elif cfg.checkpoint_dir is not None and comm.is_main:
        log.debug(
            "progress kept in %s until the model is saved (discard_progress removes it)", cfg.checkpoint_dir
        )
    return result


def _fused_recovery(
    recover: str | None, options: Mapping[str, Any] | None, seed: int
) -> BlockwiseOptions | None:
    """``recover=``/``recover_options=`` of ``prune()``, validated (method, options, steps, lr…), or None."""
    if recover is None:
        if options:
            raise ConfigError("recover_options is set but recover is not: add recover='perp' (or 'lift').")
        return None
    return BlockwiseOptions.from_kwargs(recover, options, seed)


def _open_checkpoint(
    checkpoint_dir: str | None, resume: bool, output_dir: str | os.PathLike, comm, fingerprint: dict[str, Any]
) -> Progress:
    """Where a streamed run's pruned blocks go as they finish: ``checkpoint_dir`` (resumable), else a
    temporary folder beside ``output_dir`` that the final save hard-links from and then removes."""
    if checkpoint_dir is not None:
        return Progress.open(checkpoint_dir, comm, fingerprint, resume=resume)
    work = temp_path(Path(output_dir).expanduser(), "work-")
    return Progress.open(work, comm, fingerprint, resume=False, resumable=False)


def _unselected_weights(model, result: PruneResult) -> int:
    """Weights of the decoder-block Linears the run did not prune (ignored, not targeted, dense)."""
    from llmprune.calibration.modules import WeightView

    return sum(
        WeightView(model.get_submodule(n)).shape[0] * WeightView(model.get_submodule(n)).shape[1]
        for n in preflight.prunable_names(model)
        if n not in result.modules
    )


def _prune_structured(model, tokenizer, args: dict[str, Any], options: dict[str, Any]):
    """``prune(..., structure=...)``: shrink the model (llmprune.structured), save it if asked."""
    from llmprune.structured.save import save_structured

    preflight.before_loading(
        model,
        output_dir=args["output_dir"],
        overwrite=args["overwrite"],
        dataset=args["dataset"],
        device=args["device"],
        max_seq_length=args["max_seq_length"],
    )
    if is_model_path(model):
        model, tokenizer = load_model(str(model), dtype=args["dtype"], device=args["device"])
    keys = ("structure", "method", "sparsity", "dataset", "num_calibration_samples", "max_seq_length")
    settings = {k: args[k] for k in (*keys, "seed", "batch_size", "progress")}
    result = prune_structured(model, tokenizer, **settings, **options)
    if args["output_dir"] is not None:
        out, recipe, info = args["output_dir"], args["recipe"], args["run_info"]
        save_structured(result, tokenizer, out, recipe=recipe, run_info=info, overwrite=args["overwrite"])
    return result
