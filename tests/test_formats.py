"""Export formats: llmprune's compressed sparse layout (lossless) and GGUF (read back by transformers)."""

from __future__ import annotations

import json
import math
import os
from itertools import combinations
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_model
from safetensors import safe_open
from safetensors.torch import save_file
from test_hub import hub  # noqa: F401 - the fixture: a loopback stand-in for the Hub
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import llmprune
from llmprune.cli import main
from llmprune.errors import ConfigError
from llmprune.io import compressed
from llmprune.io.compressed import CompressedFormatError, encode_nm, read_compressed, write_compressed
from llmprune.io.gguf_export import neox_qkv_to_blocks, permute_qk
from llmprune.io.hub import push_to_hub
from llmprune.io.inspect import inspect_checkpoint
from llmprune.io.save import save_pruned

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name


def pruned_model(arch: str, pattern: str = "0.5"):
    """A tiny model whose decoder-block matrices are magnitude-pruned (50 % per matrix, or N:M rows)."""
    if arch == "gpt2":  # transformers' GGUF loader sizes wpe from context_length as n_ctx (1024)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0)
        ).eval()
    else:
        model = make_model(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2 or not any(k in name for k in (".layers.", ".h.")):
                continue
            if pattern == "2:4":  # keep the 2 largest |w| of every 4 consecutive elements of a row
                groups = param.reshape(-1, 4)
                drop = groups.abs().argsort(-1)[:, :2]
                groups.scatter_(-1, drop, 0.0)
            else:
                cut = param.abs().flatten().kthvalue(param.numel() // 2).values
                param.masked_fill_(param.abs() <= cut, 0.0)
    return model


# ---------------------------------------------------------------- the encodings, by hand


def test_nm_encoding_matches_hand_decoded_example():
    # groups of 4: [0, 1.5, 0, -2] keeps {1, 3}; [3, 0, 0, .5] keeps {0, 3}; [0, 0, 7, 0] holds one
    # value, so the lowest zero (position 0) is stored too: {0, 2}. Lexicographic ranks among the 6
    # subsets {01, 02, 03, 12, 13, 23}: 4, 2, 1 -> 3-bit fields 100 010 001 -> bytes 0x88 0x80.
    w = torch.tensor([[0, 1.5, 0, -2, 3, 0, 0, 0.5, 0, 0, 7, 0]])
    values, ranks = encode_nm(w, 2, 4)
    assert values.tolist() == [1.5, -2, 3, 0.5, 0, 7]
    assert ranks.tolist() == [0x88, 0x80]
    entry = {"encoding": "nm", "shape": [1, 12], "n": 2, "m": 4}
    back = compressed.decode("w", entry, {"w:values": values, "w:nm_subsets": ranks})
    assert torch.equal(back, w)


def test_bitmask_encoding_matches_hand_decoded_example():
    # row 0 keeps position 1 (0b01000000), row 1 keeps 1, 3, 4, 7 (0b01011001); rows this uneven make
    # N:M store 4 values in every group of 8, so the mask (2 bytes + 5 values) is smallest
    w = torch.tensor([[0, 1.5, 0, 0, 0, 0, 0, 0], [0, 1.5, 0, -2, 3, 0, 0, 0.5]])
    entry, parts = compressed.encode("w", w)
    assert entry == {"encoding": "bitmask", "shape": [2, 8]}
    assert parts["w:keep"].tolist() == [0x40, 0x59]
    assert parts["w:values"].tolist() == [1.5, 1.5, -2, 3, 0.5]
    assert torch.equal(compressed.decode("w", entry, parts), w)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (1, 8), (4, 8), (7, 8)])
def test_nm_ranks_are_lexicographic_subset_indices(n, m):
    """Every subset of n out of m positions encodes to its index in itertools.combinations' order."""
    subsets = list(combinations(range(m), n))
    w = torch.zeros(len(subsets), m)
    for row, kept in enumerate(subsets):
        w[row, list(kept)] = torch.arange(1.0, n + 1)
    values, packed = encode_nm(w, n, m)
    width = max(1, math.ceil(math.log2(len(subsets))))
    assert compressed.unpack_codes(packed, len(subsets), width).tolist() == list(range(len(subsets)))
    assert values.tolist() == list(range(1, n + 1)) * len(subsets)


def test_every_encoding_is_bit_identical_including_signed_zero_and_nan(tmp_path):
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 32, generator=gen)
    sparse = dense.masked_fill(dense.abs() < 0.8, 0.0)
    sparse[0, 0], sparse[1, 1] = -0.0, float("nan")
    two_four = dense.reshape(-1, 4).scatter(-1, torch.tensor([[0, 2]]).expand(128, 2), 0.0).reshape(16, 32)
    two_four[3, 1] = -0.0  # a stored -0.0 inside an N:M group
    tensors = {
        "dense": dense,
        "sparse": sparse,
        "sparse_bf16": sparse.bfloat16(),
        "two_four": two_four,
        "two_four_f16": two_four.half(),
        "empty_rows": torch.zeros(4, 8),
        "ints": torch.arange(6),
        "norm": torch.ones(32),
    }
    index = write_compressed(tensors, tmp_path / "w.safetensors")
    assert {k: v["encoding"] for k, v in index.items()} == {
        "dense": "dense",
        "sparse": "bitmask",
        "sparse_bf16": "bitmask",
        "two_four": "nm",
        "two_four_f16": "nm",
        "empty_rows": "bitmask",
        "ints": "dense",
        "norm": "dense",
    }
    assert_bit_identical(tensors, read_compressed(tmp_path / "w.safetensors"))


# ---------------------------------------------------------------- models: dense and compressed


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_lossless_formats_reload_bit_identical(arch, fmt, tmp_path, tiny_tokenizer, one_thread):
    model = pruned_model(arch, "2:4" if arch == "qwen2" else "0.5")
    save_pruned(model, tiny_tokenizer, tmp_path / "out", format=fmt)
    back, tok = llmprune.load_model(str(tmp_path / "out"), device="cpu")
    assert_bit_identical(model.state_dict(), back.state_dict())
    assert torch.equal(model(IDS).logits, back(IDS).logits)
    assert tok(SAMPLE_TEXT[:80])["input_ids"] == tiny_tokenizer(SAMPLE_TEXT[:80])["input_ids"]
    assert "sparsity" not in (tmp_path / "out" / "config.json").read_text()


def test_compressed_is_smaller_and_inspect_reads_it(tmp_path, tiny_tokenizer):
    model = pruned_model("llama")
    save_pruned(model, tiny_tokenizer, tmp_path / "dense")
    save_pruned(model, tiny_tokenizer, tmp_path / "comp", format="compressed")
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    comp_bytes = (tmp_path / "comp" / compressed.WEIGHTS_NAME).stat().st_size
    assert comp_bytes < 0.85 * dense_bytes  # tiny model: embeddings (dense) are a large share
    a, b = inspect_checkpoint(tmp_path / "dense"), inspect_checkpoint(tmp_path / "comp")
    assert a["modules"] == b["modules"] and len(a["modules"]) == 15  # 14 block matrices + lm_head
    card = (tmp_path / "comp" / "README.md").read_text()
    assert "llmprune.load_model" in card and "llmprune-compressed" in card


def test_plain_from_pretrained_refuses_the_compressed_folder(tmp_path, tiny_tokenizer):
    save_pruned(pruned_model("llama"), tiny_tokenizer, tmp_path / "c", format="compressed")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def _compressed_folder(tmp_path, tokenizer) -> Path:
    save_pruned(pruned_model("llama"), tokenizer, tmp_path / "c", format="compressed")
    return tmp_path / "c"


def _one_line_load_error(folder: Path) -> str:
    with pytest.raises(CompressedFormatError) as info:
        llmprune.load_model(str(folder), device="cpu")
    message = str(info.value)
    assert "\n" not in message and "re-export" in message
    return message


def test_truncated_file_is_a_one_line_error(tmp_path, tiny_tokenizer):
    path = _compressed_folder(tmp_path, tiny_tokenizer) / compressed.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert "truncated" in _one_line_load_error(path.parent)


def test_flipped_byte_is_a_one_line_error(tmp_path, tiny_tokenizer):
    path = _compressed_folder(tmp_path, tiny_tokenizer) / compressed.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last stored tensor
    path.write_bytes(bytes(data))
    assert "checksum" in _one_line_load_error(path.parent)


def test_edited_index_is_a_one_line_error(tmp_path, tiny_tokenizer):
    path = _compressed_folder(tmp_path, tiny_tokenizer) / compressed.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    index = json.loads(meta["index"])
    name = next(n for n, e in index.items() if e["encoding"] == "bitmask")
    index[name]["shape"] = index[name]["shape"][::-1]  # same element count, wrong layout
    meta["index"] = json.dumps(index, sort_keys=True, separators=(",", ":"))
    save_file(tensors, str(path), metadata=meta)
    assert "index fails its checksum" in _one_line_load_error(path.parent)


def test_newer_version_names_the_fix(tmp_path):
    path = tmp_path / "w.safetensors"
    write_compressed({"a": torch.ones(2, 2)}, path)
    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**meta, "version": "2"})
    with pytest.raises(CompressedFormatError, match="upgrade llmprune"):
        read_compressed(path)


# ---------------------------------------------------------------- GGUF


def test_permute_qk_pairs_rotate_half_partners():
    """Row 2j of a head is row j, row 2j+1 is row j + head_dim/2 (GGML rotates adjacent pairs)."""
    w = torch.arange(16.0).reshape(16, 1)  # 2 heads of head_dim 8
    assert permute_qk(w, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize(
    "gguf_type,atol,wtol", [("f16", 2e-3, 1e-3), ("bf16", 1e-2, 8e-3), ("q8_0", 3e-2, 1e-2)]
)
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_gguf_loads_in_transformers_with_close_logits(
    arch, gguf_type, atol, wtol, tmp_path, tiny_tokenizer, one_thread
):
    model = pruned_model(arch)
    out = save_pruned(model, tiny_tokenizer, tmp_path / "g", format="gguf", gguf_type=gguf_type)
    (gguf_file,) = [p.name for p in out.iterdir() if p.suffix == ".gguf"]
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32).eval()
    with torch.no_grad():
        ref, got = model(IDS).logits, back(IDS).logits
    assert (got - ref).abs().max() < atol
    # tensor by tensor (a q/k row order that the loader does not undo shows here, not in tiny logits)
    theirs = back.state_dict()
    for name, ours in model.state_dict().items():
        if name.endswith(".attn.bias"):  # GPT-2's causal-mask buffer
            continue
        assert (theirs[name] - ours).abs().max() <= wtol * ours.abs().max(), name
        assert bool(theirs[name][ours == 0].eq(0).all()), name  # pruned weights stay exact zeros
    tok = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file)
    text = SAMPLE_TEXT[:120]
    assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert tok.eos_token == "<eos>"
    loaded, _ = llmprune.load_model(str(out), device="cpu")  # a GGUF folder loads through llmprune too
    assert type(loaded).__name__ == type(back).__name__


def test_gguf_gpt_neox_tensors_read_back_in_llama_cpp_layout(tmp_path, tiny_tokenizer):
    """transformers cannot read gptneox GGUFs, so read the file with gguf's reader and undo the layout."""
    import gguf

    model = pruned_model("gpt_neox")
    out = save_pruned(model, tiny_tokenizer, tmp_path / "g", format="gguf", gguf_type="f16")
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    tensors = {
        t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors
    }
    expected = {  # every name llama.cpp's gptneox graph looks for, in block 0
        f"blk.0.{n}" for n in ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
    }
    assert expected <= tensors.keys() and "token_embd.weight" in tensors and "output.weight" in tensors
    qkv = tensors["blk.0.attn_qkv.weight"]  # (3 * 32, 32): all q rows, then all k, then all v
    per_head = qkv.reshape(3, 4, 8, 32).transpose(0, 1).reshape(96, 32)  # back to [q_h; k_h; v_h] per head
    source = model.gpt_neox.layers[0].attention.query_key_value.weight
    assert torch.allclose(per_head, source, atol=1e-3)
    assert torch.equal(neox_qkv_to_blocks(source, 4)[:8], source.reshape(4, 3, 8, 32)[0, 0])
    fields = {f.name: f for f in reader.fields.values()}
    assert "gptneox.rope.dimension_count" in fields and "gptneox.use_parallel_residual" in fields


def test_gguf_refuses_opt_before_writing(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="llama.cpp has no OPT"):
        save_pruned(make_model("opt"), tiny_tokenizer, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- export command


def test_export_round_trip_and_overwrite_rule(tmp_path, tiny_tokenizer, capsys):
    model = pruned_model("llama")
    src = save_pruned(model, tiny_tokenizer, tmp_path / "src", recipe={"prune": {"method": "magnitude"}})
    assert main(["export", str(src), "--format", "compressed", "--output_dir", str(tmp_path / "c")]) == 0
    assert (
        main(["export", str(tmp_path / "c"), "--format", "dense", "--output_dir", str(tmp_path / "d")]) == 0
    )
    back, _ = llmprune.load_model(str(tmp_path / "d"), device="cpu")
    assert_bit_identical(model.state_dict(), back.state_dict())
    assert json.loads((tmp_path / "c" / "sparsity.json").read_text())["method"] == "magnitude"

    before = sorted(os.listdir(tmp_path / "c"))
    code = main(["export", str(src), "--format", "gguf", "--output_dir", str(tmp_path / "c")])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "c")) == before  # untouched
    args = [
        "export",
        str(src),
        "--format",
        "gguf",
        "--gguf_type",
        "q8_0",
        "--output_dir",
        str(tmp_path / "c"),
    ]
    assert main([*args, "--overwrite"]) == 0
    assert any(p.suffix == ".gguf" for p in (tmp_path / "c").iterdir())
    assert not (tmp_path / "c" / compressed.WEIGHTS_NAME).exists()


def test_prune_save_format_needs_output_dir_before_loading(capsys):
    assert main(["prune", "--model", "/nonexistent/model", "--save_format", "compressed"]) == 2
    assert "--output_dir" in capsys.readouterr().err


def test_the_example_in_docs_format_md(tmp_path):
    """docs/format.md decodes this file by hand; the bytes it quotes must be the ones written."""
    tensors = {
        "proj.weight": torch.tensor(
            [
                [0, 1, 0, 2, 3, 0, 0, 4],
                [5, 6, 0, 0, 0, 0, 7, 8],
                [0, 0, 8, 9, 0, 1, 2, 0],
                [-1, 0, 1, 0, 0, 3, 0, 4],
            ],
            dtype=torch.bfloat16,
        ),
        "sparse.weight": torch.tensor(
            [[0, 1.5, 0, 0, 0, 0, 0, 0], [0, 1.5, 0, -2, 3, 0, 0, 0.5]], dtype=torch.bfloat16
        ),
        "norm.weight": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
    }
    write_compressed(tensors, tmp_path / "example.safetensors")
    with safe_open(str(tmp_path / "example.safetensors"), framework="pt") as handle:
        raw = {
            k: bytes(handle.get_tensor(k).reshape(-1).view(torch.uint8).tolist()).hex(" ")
            for k in handle.keys()  # noqa: SIM118
        }
        index = handle.metadata()["index"]
    assert index == (
        '{"norm.weight":{"encoding":"dense","shape":[2]},"proj.weight":{"encoding":"nm","m":4,"n":2,'
        '"shape":[4,8]},"sparse.weight":{"encoding":"bitmask","shape":[2,8]}}'
    )
    assert raw["proj.weight:nm_subsets"] == "88 5a cc"
    assert raw["sparse.weight:keep"] == "40 59"
    assert raw["sparse.weight:values"] == "c0 3f c0 3f 00 c0 40 40 00 3f"
    assert raw["proj.weight:values"].startswith("80 3f 00 40 40 40 80 40 a0 40")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "format.md").read_text()
    assert all(value in doc for value in raw.values())


def test_push_uploads_a_gguf_folder_with_a_card_that_says_how_to_load_it(hub, tmp_path, tiny_tokenizer):  # noqa: F811
    out = save_pruned(pruned_model("llama"), tiny_tokenizer, tmp_path / "g", format="gguf")
    push_to_hub(out, "me/tiny-gguf", token="hf_local_test_token", endpoint=hub.url)
    files = hub.commits[0]["files"]
    (name,) = [n for n in files if n.endswith(".gguf")]
    assert files[name] == (out / name).read_bytes()
    card = files["README.md"].decode()
    assert f'gguf_file="{name}"' in card and "- gguf" in card  # usage and the Hub tag


def test_prune_refuses_gguf_for_opt_right_after_loading(tmp_path, tiny_tokenizer, capsys):
    src = save_pruned(make_model("opt"), tiny_tokenizer, tmp_path / "opt")
    out = tmp_path / "out"
    args = ["prune", "--model", str(src), "--save_format", "gguf", "--output_dir", str(out), "--skip_eval"]
    assert main(args) == 2
    assert "no OPT architecture" in capsys.readouterr().err and not out.exists()


def test_gguf_carries_the_chat_template(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    out = save_pruned(pruned_model("qwen2"), tok, tmp_path / "g", format="gguf", gguf_type="q8_0")
    back = AutoTokenizer.from_pretrained(out, gguf_file=next(out.glob("*.gguf")).name)
    assert back.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(messages, tokenize=False) == "<user>hi"
