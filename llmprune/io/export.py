"""``export``: rewrite a saved model in another format (dense, compressed, GGUF), keeping its provenance.

The source is anything ``load_model`` reads (a dense or compressed folder, a GGUF file or folder, a Hub
id, the embedded default); the recipe, run details and metrics saved beside it are carried over, and
``sparsity.json``, the keep-masks and the model card are rebuilt from the weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from llmprune.io.models import load_model
from llmprune.io.output_dir import check_output_dir
from llmprune.io.save import save_pruned
from llmprune.io.weights import check_format

log = logging.getLogger(__name__)

#: run_info.json entries that describe the pruning run itself, carried over to the export
_CARRIED = (
    "command",
    "license",
    "base_model",
    "datasets",
    "seed",
    "calibration_hash",
    "num_calibration_samples",
    "max_seq_length",
    "source_model",
)
_DTYPE_NAMES = {"float32", "bfloat16", "float16"}


def _source_dtype(source: Path) -> str:
    """The dtype the source is stored in (``config.json``), so an export neither grows nor rounds it."""
    config = source / "config.json" if source.is_dir() else None
    if config is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        dtype = data.get("dtype") or data.get("torch_dtype")
        if dtype in _DTYPE_NAMES:
            return dtype
    return "float32"


def _provenance(source: Path) -> tuple[Any, dict[str, Any], Any]:
    """(recipe, run_info entries, metrics) saved beside the source by llmprune, if any."""
    if not source.is_dir():
        return None, {}, None
    recipe_path, info_path = source / "recipe.yaml", source / "run_info.json"
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    carried = {k: info[k] for k in _CARRIED if info.get(k) is not None}
    return recipe, carried, info.get("metrics")


def export(
    source: str | Path,
    output_dir: str | Path,
    *,
    format: str = "compressed",
    gguf_type: str = "f16",
    overwrite: bool = False,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``source`` to ``output_dir`` as ``format`` (``dense``, ``compressed`` or ``gguf``).

    ``dtype`` defaults to the source's own (from its ``config.json``, else float32), so a compressed
    or dense export is bit-identical to the source. Writes are atomic; the source is never modified.

    >>> export("out/wanda-50", "out/wanda-50-compressed", format="compressed")  # doctest: +SKIP
    PosixPath('out/wanda-50-compressed')
    >>> export("out/wanda-50", "out/wanda-50-gguf", format="gguf", gguf_type="q8_0")  # doctest: +SKIP
    PosixPath('out/wanda-50-gguf')
    """
    check_format(format, gguf_type)
    src = Path(str(source)).expanduser()
    check_output_dir(output_dir, overwrite=overwrite, inputs=[src], flag="output_dir")
    out = Path(output_dir).expanduser()
    recipe, run_info, metrics = _provenance(src)
    model, tok = load_model(
        str(source), dtype=dtype or _source_dtype(src), device="cpu", trust_remote_code=trust_remote_code
    )
    check_format(format, gguf_type, model)
    run_info["exported_from"] = str(source)
    return save_pruned(
        model,
        tok,
        out,
        recipe=recipe,
        run_info=run_info,
        metrics=metrics,
        format=format,
        gguf_type=gguf_type,
        overwrite=overwrite,
    )
