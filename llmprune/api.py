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
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from llmprune.calibration.data import tokens_hash
from llmprune.calibration.distributed import current_comm
from llmprune.calibration.engine import prune_blocks
from llmprune.calibration.resume import discard_progress
from llmprune.calibration.settings import calibration_ids, engine_config, is_model_path
from llmprune.calibration.weights_only import prune_weights_only
from llmprune.io.models import load_model, resolve_device
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
    num_calibration_samples: int = 128,
    max_seq_length: int = 2048,
    seed: int = 0,
    targets: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    overrides: Mapping[str, float | str] | None = None,
    true_sequential: bool = False,
    batch_size: int = 8,
    device: str | None = "auto",
    dtype: str | None = "float32",
    output_dir: str | None = None,
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
    **solver_args: Any,
) -> PruneResult:
    """Prune ``model`` in place, block by block, and report what was done.

    ``model`` is a loaded causal LM or anything ``load_model`` accepts (Hub id, folder, ``.gguf``,
    ``"smollm2-135m"``). ``sparsity`` is a fraction (``0.5``) or an N:M pattern (``"2:4"``: keep 2 of
    every 4). ``dataset`` is any calibration source (see ``llmprune.calibration.data``); ``None`` uses
    the built-in public-domain text. Extra keyword arguments go to the solver (e.g. ``block_size=128``).
    With ``output_dir`` the pruned checkpoint is written there (atomically), with ``recipe`` and
    ``run_info`` as provenance (the CLI records its resolved recipe and command).

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
    )
    if streaming:
        from llmprune.calibration.streaming import stream_blocks

        return stream_blocks(
            model,
            tokenizer,
            cfg,
            output_dir=output_dir,
            dataset=dataset,
            num_calibration_samples=num_calibration_samples,
            max_seq_length=max_seq_length,
            device=device,
            dtype=dtype,
            recipe=recipe,
            run_info=run_info,
            trust_remote_code=trust_remote_code,
        )
    if is_model_path(model):
        model, tokenizer = load_model(
            str(model), dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
    cfg.device = resolve_device(device) if device not in (None, "auto") else next(model.parameters()).device
    comm = current_comm()
    torch.manual_seed(seed)
    start = time.perf_counter()
    selection = cfg.selection
    data_free = not cfg.solver.needs and not true_sequential  # e.g. magnitude: no forward pass at all
    result = PruneResult(method=method, sparsity=str(selection.default), options=dict(solver_args), seed=seed)
    if data_free:
        if cfg.checkpoint_dir is not None:
            log.info("%s reads only the weights and takes seconds: no progress is recorded", method)
        prune_weights_only(model, cfg, result)
    else:
        input_ids = calibration_ids(
            model, dataset, tokenizer, num_calibration_samples, max_seq_length, seed, comm
        )
        result.calibration_hash = tokens_hash(input_ids)
        result.num_calibration_samples, result.max_seq_length = map(int, input_ids.shape)
        if not selection.default.is_dense or selection.overrides:
            prune_blocks(model, input_ids, cfg, result)
    result.seconds = time.perf_counter() - start
    log.info(
        "%s %s: %.2f%% of %d block Linears pruned in %.1fs",
        method,
        result.sparsity,
        100 * result.overall_sparsity,
        len(result.modules),
        result.seconds,
    )
    if output_dir is not None:
        from llmprune.io.save import save_pruned

        if comm.is_main:
            save_pruned(model, tokenizer, output_dir, result=result, recipe=recipe, run_info=run_info)
        discard_progress(cfg.checkpoint_dir, comm)
    elif cfg.checkpoint_dir is not None and comm.is_main:
        log.debug(
            "progress kept in %s until the model is saved (discard_progress removes it)", cfg.checkpoint_dir
        )
    return result


def _prune_structured(model, tokenizer, args: dict[str, Any], options: dict[str, Any]):
    """``prune(..., structure=...)``: shrink the model (llmprune.structured), save it if asked."""
    from llmprune.structured.save import save_structured

    if is_model_path(model):
        model, tokenizer = load_model(str(model), dtype=args["dtype"], device=args["device"])
    keys = ("structure", "method", "sparsity", "dataset", "num_calibration_samples", "max_seq_length")
    settings = {k: args[k] for k in (*keys, "seed", "batch_size", "progress")}
    result = prune_structured(model, tokenizer, **settings, **options)
    if args["output_dir"] is not None:
        out, recipe, info = args["output_dir"], args["recipe"], args["run_info"]
        save_structured(result, tokenizer, out, recipe=recipe, run_info=info)
    return result
