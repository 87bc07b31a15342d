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
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from llmprune.calibration.data import calibration_tokens, tokens_hash
from llmprune.calibration.engine import EngineConfig, prune_blocks
from llmprune.calibration.weights_only import prune_weights_only
from llmprune.errors import ConfigError
from llmprune.io.models import load_model, resolve_device
from llmprune.registry import get_solver
from llmprune.result import PruneResult
from llmprune.spec import ModuleSelection

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
    progress: bool = True,
    **solver_args: Any,
) -> PruneResult:
    """Prune ``model`` in place, block by block, and report what was done.

    ``model`` is a loaded causal LM or anything ``load_model`` accepts (Hub id, folder, ``.gguf``,
    ``"smollm2-135m"``). ``sparsity`` is a fraction (``0.5``) or an N:M pattern (``"2:4"``: keep 2 of
    every 4). ``dataset`` is any calibration source (see ``llmprune.calibration.data``); ``None`` uses
    the built-in public-domain text. Extra keyword arguments go to the solver (e.g. ``block_size=128``).
    With ``output_dir`` the pruned checkpoint is written there (atomically).
    """
    solver = get_solver(method)  # validates the name before any work
    solver.check_options(solver_args)
    selection = ModuleSelection.build(sparsity, targets, ignore, overrides)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model, tokenizer = load_model(str(model), dtype=dtype, device=device)
    compute = resolve_device(device) if device not in (None, "auto") else next(model.parameters()).device
    torch.manual_seed(seed)
    start = time.perf_counter()
    data_free = not solver.needs and not true_sequential  # e.g. magnitude: no forward pass at all
    result = PruneResult(method=method, sparsity=str(selection.default), options=dict(solver_args), seed=seed)
    if not data_free:
        max_len = getattr(model.config, "max_position_embeddings", None)
        if max_len and max_seq_length > max_len:
            raise ConfigError(
                f"max_seq_length {max_seq_length} exceeds the model's {max_len} positions: lower it."
            )
        input_ids = calibration_tokens(
            dataset, tokenizer, num_calibration_samples, max_seq_length, seed, model=model
        )
        result.calibration_hash = tokens_hash(input_ids)
        result.num_calibration_samples, result.max_seq_length = map(int, input_ids.shape)
    cfg = EngineConfig(
        solver=solver,
        selection=selection,
        options=dict(solver_args),
        true_sequential=true_sequential,
        batch_size=batch_size,
        device=compute,
        progress=progress,
        seed=seed,
    )
    if data_free:
        prune_weights_only(model, cfg, result)
    elif not selection.default.is_dense or selection.overrides:
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

        save_pruned(model, tokenizer, output_dir, result=result)
    return result
