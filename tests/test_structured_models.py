"""Structured pruning on tiny models of every architecture: surgery, equivalence, reload, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, make_model

import llmprune
from llmprune.calibration.modules import WeightView, find_blocks
from llmprune.errors import ConfigError
from llmprune.structured.arch import head_geometry, layout_of
from llmprune.structured.pipeline import prune_structured
from llmprune.structured.save import save_structured
from llmprune.structured.surgery import Removal, head_indices, rebuild

HEADS_ARCHS = ("llama", "mistral", "qwen2")


def _shrink(model, ids, **kwargs):
    """prune_structured on the calibration windows ``ids`` (N, L), quietly."""
    n, length = ids.shape
    return prune_structured(
        model, None, dataset=ids, num_calibration_samples=n, max_seq_length=length, progress=False, **kwargs
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _removal(arch: str, model) -> Removal:
    heads = {1: [1]} if arch in HEADS_ARCHS else {}
    return Removal(blocks=[0], channels={1: [0, 3, 17, 40]}, kv_groups=heads)


@torch.no_grad()
def _zero_equivalent(model, removal: Removal) -> None:
    """What removal means functionally: a removed channel/head is a zero column of the output projection."""
    layout = layout_of(model)
    _, blocks = find_blocks(model)
    for i, cols in removal.channels.items():
        view = WeightView(blocks[i].get_submodule(layout.mlp_out))
        keep = torch.ones(view.shape, dtype=torch.bool)
        keep[:, cols] = False
        view.write(keep)
    for i, groups in removal.kv_groups.items():
        view = WeightView(blocks[i].get_submodule(layout.attn[3]))
        keep = torch.ones(view.shape, dtype=torch.bool)
        keep[:, head_indices(head_geometry(model.config), groups)[0]] = False
        view.write(keep)


def test_removing_nothing_keeps_logits(arch, token_ids):
    model = make_model(arch)
    small = rebuild(model, Removal())
    torch.testing.assert_close(_logits(small, token_ids), _logits(model, token_ids), rtol=0, atol=0)


def test_rebuilt_model_equals_the_zeroed_model(arch, token_ids):
    """Catches a wrong row/column slice (Conv1D transposition, GQA head order, biases) in the surgery."""
    model = make_model(arch)
    removal = _removal(arch, model)
    small = rebuild(model, removal)
    _zero_equivalent(model, removal)
    _, blocks = find_blocks(model)
    del blocks[0]  # the reference without block 0: drop it from the ModuleList
    prefix, _ = find_blocks(model)
    layers = model.get_submodule(prefix)
    model.get_submodule(prefix.rsplit(".", 1)[0]).__setattr__(prefix.rsplit(".", 1)[1], layers[1:])
    for j, layer in enumerate(layers[1:]):  # attention modules address the cache by layer_idx
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    model.config.num_hidden_layers = 1
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[1:]
    torch.testing.assert_close(_logits(small, token_ids), _logits(model, token_ids), rtol=1e-5, atol=1e-5)


def test_config_says_the_new_shape(arch):
    model = make_model(arch)
    removal = _removal(arch, model)
    layout = layout_of(model)
    width = WeightView(find_blocks(model)[1][0].get_submodule(layout.mlp_out)).shape[1]
    small = rebuild(model, removal)
    cfg = small.config
    assert cfg.num_hidden_layers == 1 == len(find_blocks(small)[1])
    assert getattr(cfg, layout.width_key) == width - 4
    assert WeightView(find_blocks(small)[1][0].get_submodule(layout.mlp_out)).shape[1] == width - 4
    if arch in HEADS_ARCHS:
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8)
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == 1


def test_layer_types_follow_the_kept_blocks():
    model = make_model("qwen2")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    small = rebuild(model, Removal(blocks=[0]))
    assert small.config.layer_types == ["full_attention"]


def test_save_and_plain_reload_give_identical_logits(arch, token_ids, tmp_path):
    model = make_model(arch)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    structure = "auto" if arch in HEADS_ARCHS else "width"
    result = _shrink(model, ids, structure=structure, sparsity=0.3)
    out = save_structured(result, None, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, token_ids), _logits(result.model, token_ids), rtol=0, atol=0)
    doc = json.loads((out / "structure.json").read_text())
    assert doc["format"] == "llmprune.structure.v1" and doc["counts"] == result.counts
    assert Removal.from_dict(doc["removed"]).to_dict() == result.removal.to_dict()
    assert not (out / "masks.safetensors").exists()
    assert "Structure removed" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config  # no remote code


@pytest.mark.parametrize(
    ("arch", "structure"),
    [("llama", s) for s in ("depth", "width", "heads", "auto")]
    + [(a, "depth") for a in sorted(ARCHITECTURES) if a != "llama"]
    + [("qwen2", "heads"), ("gpt2", "heads")],
)
def test_prune_structured_every_structure(arch, structure):
    model = make_model(arch)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    sparsity = 0.15 if structure == "heads" else 0.3
    if structure == "heads" and arch not in HEADS_ARCHS:
        with pytest.raises(ConfigError, match="cannot express removing heads"):
            _shrink(model, ids, structure=structure, sparsity=sparsity)
        return
    result = _shrink(model, ids, structure=structure, sparsity=sparsity)
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)  # input model unchanged
    assert result.block_params["pruned"] < result.block_params["dense"]
    dense_params = sum(p.numel() for p in model.parameters())
    assert result.total_params["dense"] == dense_params
    assert sum(p.numel() for p in result.model.parameters()) == result.total_params["pruned"]
    assert torch.isfinite(_logits(result.model, ids)).all()


def test_refit_lowers_the_block_error():
    """The OBS refit must beat removing the same channels without compensation (on the calibration)."""
    model = make_model("llama")
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    fitted = _shrink(model, ids, structure="width", sparsity=0.3)
    plain = _shrink(model, ids, structure="width", sparsity=0.3, refit=False)
    assert fitted.removal.channels[0] == plain.removal.channels[0]  # same choice; later inputs differ
    err_fit = (_logits(fitted.model, ids) - ref).pow(2).mean()
    err_plain = (_logits(plain.model, ids) - ref).pow(2).mean()
    assert err_fit < err_plain


def test_explicit_shapes():
    model = make_model("llama")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    shape = dict(num_hidden_layers=1, intermediate_size=48, num_key_value_heads=1)
    cfg = _shrink(model, ids, structure="auto", **shape).model.config
    assert {k: getattr(cfg, k) for k in shape} == shape
    assert cfg.num_attention_heads == 2  # the query heads of the one remaining group


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("llama", dict(structure="heads", sparsity=0.5), "heads alone can remove at most"),
        (
            "llama",
            dict(structure="auto", num_key_value_heads=3),
            "num_key_value_heads must be between 1 and 2",
        ),
        ("llama", dict(structure="auto", num_attention_heads=3), "multiple of 2"),
        ("gpt2", dict(structure="heads", sparsity=0.1), "gpt2 configs cannot express removing heads"),
        ("gpt2", dict(structure="auto", num_key_value_heads=1), "cannot express removing heads"),
        ("opt", dict(structure="auto", num_hidden_layers=0), "positive integer"),
        ("llama", dict(structure="depth", sparsity=0.9), "leaves none"),
        ("llama", dict(structure="width", sparsity="2:4"), "fraction of decoder-block parameters"),
        ("llama", dict(structure="width", method="sparsegpt"), "does not apply to --structure width"),
        ("llama", dict(structure="widht"), "did you mean 'width'"),
        ("llama", dict(structure="width", blocksize=3), "unknown structured option"),
    ],
)
def test_bad_requests_are_refused_and_nothing_written(arch, kwargs, match, tmp_path):
    model = make_model(arch)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        llmprune.prune(
            model, None, output_dir=str(out), dataset=torch.zeros(2, 8, dtype=torch.long), **kwargs
        )
    assert not out.exists()


def test_structured_recovery_distils_from_the_dense_model():
    """The teacher has another shape; only its logits are used, and the student's loss goes down."""
    from llmprune.recovery import recover

    model = make_model("llama")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    small = _shrink(model, ids, structure="width", sparsity=0.3).model
    before = [p.detach().clone() for p in small.parameters()]
    result = recover(small, input_ids=ids, method="perp", steps=4, dense_model=model, lr=1e-2, batch_size=4)
    assert result.steps_done == 4 and torch.isfinite(torch.tensor(result.losses)).all()
    assert any(not torch.equal(a, b) for a, b in zip(small.parameters(), before, strict=True))  # it trained


def test_auto_scores_candidates_by_calibration_loss(arch):
    """The skip hook removes a block exactly as the rebuilt model does; auto keeps the lowest loss."""
    from llmprune.structured.auto import _candidate_loss
    from llmprune.structured.plan import Allocation, Counts

    model = make_model(arch)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    alloc = Allocation(Counts(blocks=1), [0], 0.0)
    loss = _candidate_loss(model, layout_of(model), alloc, [], [], None, ids, {"dampening_frac": 0.01})
    with torch.no_grad():
        reference = float(rebuild(model, Removal(blocks=[0]))(input_ids=ids, labels=ids).loss)
    assert loss == pytest.approx(reference, rel=1e-5)
    result = _shrink(model, ids, structure="auto", sparsity=0.3, min_decode_speedup=0)  # loss alone
    assert len(result.search) >= 2
    best = min(result.search, key=lambda r: r["loss"])
    assert result.counts == {k: best[k] for k in ("blocks", "channels", "kv_groups")}
