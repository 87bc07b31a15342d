"""GGUF export: one file that llama.cpp and transformers' GGUF loader both read.

Written with the ``gguf`` package's ``GGUFWriter``; tensor names come from its ``TensorNameMap`` for
the architecture, so the names follow llama.cpp's tables rather than a copy of them. What llama.cpp
expects beyond the names is done here, each step a pure tensor function:

* Llama and Mistral (llama.cpp's ``llama`` arch): the rows of ``q_proj``/``k_proj`` are reordered from
  Hugging Face's rotate-half layout to GGML's interleaved RoPE pairs (``permute_qk``); loaders undo it.
* GPT-2: Conv1D weights are stored ``(in, out)``; GGUF wants ``(out, in)``, so they are transposed.
* GPT-NeoX: the fused ``query_key_value`` interleaves ``[q, k, v]`` per head; llama.cpp wants all
  queries, then all keys, then all values (``neox_qkv_to_blocks``).

1-D tensors (norms, biases) stay F32, as in llama.cpp; matrices are F16, BF16 or Q8_0 (``gguf_type``).
A Q8_0 matrix whose rows are not a multiple of 32 falls back to F16, and the fallback is returned.
The tokenizer (byte-level BPE or SentencePiece-style BPE) and the chat template go into the metadata.
OPT has no llama.cpp architecture, so exporting it is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from llmprune.errors import ConfigError

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
#: Hugging Face model_type -> llama.cpp architecture name (gguf.MODEL_ARCH_NAMES values)
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    "gpt_neox": "gptneox",
}
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
_Q8_BLOCK = 32


# ---------------------------------------------------------------- tensor layouts


def permute_qk(weight: Tensor, num_heads: int) -> Tensor:
    """Rotate-half rows -> interleaved pairs, per head. weight: (num_heads * head_dim, ...).

    Within a head, Hugging Face rotates element i with i + head_dim/2; GGML rotates 2j with 2j + 1.
    Row 2j of the result is row j of the input, row 2j + 1 is row j + head_dim/2.
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    halves = weight.reshape(num_heads, 2, head_dim // 2, *rest)  # (H, half, j, ...)
    return halves.transpose(1, 2).reshape(weight.shape)  # (H, j, half, ...)


def neox_qkv_to_blocks(weight: Tensor, num_heads: int) -> Tensor:
    """GPT-NeoX fused QKV, per head ``[q_h; k_h; v_h]`` -> ``[q_0..q_H; k_0..k_H; v_0..v_H]`` (rows)."""
    rest = weight.shape[1:]
    per_head = weight.reshape(num_heads, 3, weight.shape[0] // (3 * num_heads), *rest)  # (H, 3, d, ...)
    return per_head.transpose(0, 1).reshape(weight.shape)  # (3, H, d, ...)


# ---------------------------------------------------------------- config and tokenizer


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = params.get("rope_type", "default") if isinstance(params, Mapping) else "default"
    legacy = getattr(config, "rope_scaling", None)
    if scaling not in (None, "default") or (
        isinstance(legacy, Mapping) and legacy.get("rope_type") not in (None, "default")
    ):
        raise ConfigError(
            f"the model uses RoPE scaling {scaling or legacy!r}, which this GGUF export does not write: "
            "export it as --format dense or compressed."
        )
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    return float(theta if theta is not None else _get(config, "rope_theta", default=10000.0))


def architecture_of(config: Any) -> str:
    """llama.cpp's architecture name for a Hugging Face config, or a ConfigError naming the fix."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        extra = " (llama.cpp has no OPT architecture)" if model_type == "opt" else ""
        raise ConfigError(
            f"GGUF export does not support model_type {model_type!r}{extra}; supported: {known}. "
            "Fix: export with --format dense or --format compressed."
        )
    return ARCHITECTURES[model_type]


def _write_hparams(writer: Any, config: Any, name: str) -> None:
    model_type = config.model_type
    hidden = _get(config, "hidden_size", "n_embd")
    heads = _get(config, "num_attention_heads", "n_head")
    writer.add_name(name)
    writer.add_block_count(_get(config, "num_hidden_layers", "n_layer"))
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(_get(config, "max_position_embeddings", "n_positions", "n_ctx"))
    if model_type == "gpt2":
        writer.add_feed_forward_length(_get(config, "n_inner", default=4 * hidden))
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_freq_base(_rope_theta(config))
    if model_type == "gpt_neox":
        head_dim = hidden // heads
        params = getattr(config, "rope_parameters", None) or {}
        pct = params.get("partial_rotary_factor") if isinstance(params, Mapping) else None
        pct = pct if pct is not None else _get(config, "rotary_pct", "partial_rotary_factor", default=1.0)
        writer.add_rope_dimension_count(int(head_dim * pct))
        writer.add_parallel_residual(bool(_get(config, "use_parallel_residual", default=True)))
        writer.add_layer_norm_eps(config.layer_norm_eps)
        return
    writer.add_head_count_kv(_get(config, "num_key_value_heads", default=heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _get(config, "head_dim", default=hidden // heads)
    if model_type != "qwen2":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


#: pre-tokenizer regexes llama.cpp names, recognised in tokenizer.json (checked in order)
_PRE_PATTERNS = (
    ("qwen2", "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"),
    ("llama-bpe", "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"),
)


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """What llama.cpp's ``tokenizer.ggml.*`` keys need, read from a fast tokenizer's ``tokenizer.json``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast tokenizer (tokenizer.json): load it with use_fast=True.")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(
            f"GGUF export writes BPE tokenizers only, this one is {model.get('type')!r}: export with "
            "--format dense or compressed."
        )
    vocab = dict(backend.get_vocab(with_added_tokens=True))
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConfigError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embeddings."
        )
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
        spec.get("decoder")
    )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED until a token fills the slot
    for token, index in vocab.items():
        tokens[index] = token
        if index in added:
            types[index] = 3 if added[index].get("special") else 4  # CONTROL, USER_DEFINED
        elif not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[index] = 6  # BYTE
        else:
            types[index] = 1  # NORMAL
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = 2
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre_json = json.dumps(spec.get("pre_tokenizer"))
    pre = next((name for name, pattern in _PRE_PATTERNS if json.dumps(pattern)[1:-1] in pre_json), None)
    if pre is None:
        pre = "smollm" if '"individual_digits": true' in pre_json else "gpt2" if byte_level else "default"
    template = getattr(tokenizer, "chat_template", None)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {
        "model": "gpt2" if byte_level else "llama",
        "pre": pre if byte_level else None,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "scores": None if byte_level else [-float(i) for i in range(vocab_size)],
        "ids": {k: v for k, v in ids.items() if v is not None},
        "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
        "chat_template": template if isinstance(template, str) else None,
    }


def _write_tokenizer(writer: Any, fields: Mapping[str, Any]) -> None:
    writer.add_tokenizer_model(fields["model"])
    if fields["pre"]:
        writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["scores"] is not None:
        writer.add_token_scores(fields["scores"])
    if fields["merges"]:
        writer.add_token_merges(fields["merges"])
    ids = fields["ids"]
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if key in ids:
            add(ids[key])
    writer.add_add_bos_token(fields["add_bos"])
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


# ---------------------------------------------------------------- tensors


def gguf_tensors(config: Any, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """GGUF name -> tensor in llama.cpp's layout (fp32), for a state dict without tied copies."""
    import gguf

    arch_name = architecture_of(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    blocks = _get(config, "num_hidden_layers", "n_layer")
    names = gguf.get_tensor_name_map(arch, blocks)
    heads = _get(config, "num_attention_heads", "n_head")
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    out: dict[str, Tensor] = {}
    for hf_name, tensor in tensors.items():
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(
                f"tensor {hf_name!r} has no name in llama.cpp's {arch_name} tables (gguf "
                f"{getattr(gguf, '__version__', '')}): export with --format dense or compressed."
            )
        data = tensor.detach().cpu().float()
        if config.model_type == "gpt2" and _CONV1D.search(hf_name):
            data = data.t()  # Conv1D (in, out) -> (out, in)
        elif arch_name == "llama" and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", hf_name):
            data = permute_qk(data, heads if ".q_proj." in hf_name else kv_heads)
        elif arch_name == "gptneox" and ".query_key_value." in hf_name:
            data = neox_qkv_to_blocks(data, heads)
        out[target] = data.contiguous()
    return out


def _encode(data: Tensor, gguf_type: str) -> tuple[np.ndarray, Any, bool]:
    """(array, GGML type, fell back) for one tensor: 1-D stays F32, matrices get ``gguf_type``."""
    import gguf

    qtypes = gguf.GGMLQuantizationType
    array = data.numpy()
    if data.dim() < 2 or gguf_type == "f32":
        return array.astype(np.float32), qtypes.F32, False
    if gguf_type == "q8_0" and data.shape[-1] % _Q8_BLOCK == 0:
        return gguf.quants.quantize(array, qtypes.Q8_0), qtypes.Q8_0, False
    if gguf_type == "bf16":
        return gguf.quants.quantize(array, qtypes.BF16), qtypes.BF16, False
    return array.astype(np.float16), qtypes.F16, gguf_type == "q8_0"


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType values


def write_gguf(
    path: str | Path,
    config: Any,
    tensors: Mapping[str, Tensor],
    tokenizer: Any,
    *,
    gguf_type: str = "f16",
    name: str | None = None,
) -> dict[str, Any]:
    """Write one GGUF file; return what was written (architecture, type, tensors left at F16).

    ``tensors`` is the model's state dict without tied copies (an untied ``lm_head`` is written as
    ``output.weight``; a tied one is left out and loaders reuse ``token_embd``).

    >>> write_gguf("out/m.gguf", model.config, model.state_dict(), tok, gguf_type="q8_0")  # doctest: +SKIP
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown gguf_type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}.")
    if tokenizer is None:
        raise ConfigError("GGUF export needs the tokenizer: llama.cpp reads it from the file.")
    arch_name = architecture_of(config)
    fields = tokenizer_fields(tokenizer, config.vocab_size)  # before any tensor work: fail early
    converted = gguf_tensors(config, tensors)
    # not the bare model type: transformers reads general.name == "mistral" as "build MistralForCausalLM",
    # whose tensor map gguf-py lacks; llama.cpp runs Mistral as llama, and so does this file
    display = (
        name or Path(str(getattr(config, "_name_or_path", "") or "")).name or f"{config.model_type}-llmprune"
    )
    writer = gguf.GGUFWriter(str(path), arch_name)
    _write_hparams(writer, config, display)
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, fields)
    fallbacks = []
    for tensor_name, data in converted.items():
        array, qtype, fell_back = _encode(data, gguf_type)
        if fell_back:
            fallbacks.append(tensor_name)
        writer.add_tensor(tensor_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    written = {
        "architecture": arch_name,
        "gguf_type": gguf_type,
        "tensors": len(converted),
        "f16_fallbacks": fallbacks,
    }
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if window:  # llama.cpp's llama architecture attends to the whole context
        written["dropped"] = f"sliding_window={window}: attention covers the whole context"
    return written
