"""Block-wise reconstruction fused into the pruning pass (``prune(..., recover=...)``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model

import llmprune
from llmprune.errors import ConfigError
from llmprune.recovery.blockwise import SubBlockTaps, sub_block_modules
from llmprune.recovery.masking import decoder_blocks, keep_masks_from_zeros, weight_2d


def _ids(n: int = 8, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))


def _prune(model, recover=None, **options):
    kwargs = {"recover": recover, "recover_options": options} if recover else {}
    return llmprune.prune(
        model, method="wanda", sparsity=0.5, dataset=_ids(), batch_size=4, progress=False, **kwargs
    )


def _assert_zeros_kept(model, result) -> None:
    """The keep mask is bit-identical to the zeros, and every pruned entry is +0.0 (not -0.0)."""
    zeros = keep_masks_from_zeros(model)
    for name, keep in result.keep_masks.items():
        assert torch.equal(zeros[name], keep), name
        weight = weight_2d(model.get_submodule(name))
        assert not torch.signbit(weight[~keep]).any(), name


@pytest.mark.parametrize("method", ["perp", "lift"])
def test_fused_recovery_lowers_the_block_error_and_keeps_every_zero(arch, method, one_thread) -> None:
    plain, fused = make_model(arch), make_model(arch)
    before = _prune(plain)
    after = _prune(fused, method, steps=12, lr=2e-3)
    # block 0 sees the same inputs in both runs, so it gets the same mask: only recovery differs
    first = [n for n in before.keep_masks if n.startswith(after.blocks[0].name + ".")]
    assert all(torch.equal(before.keep_masks[n], after.keep_masks[n]) for n in first)
    assert after.blocks[0].recon_error < 0.8 * before.blocks[0].recon_error
    _assert_zeros_kept(fused, after)
    report = after.recovery
    assert report["method"] == method and report["steps_done"] == 12 * len(after.blocks)
    assert all(b["trainable"] > 0 and len(b["taps"]) == 2 for b in report["details"]["blocks"])


def test_the_next_block_is_fed_the_recovered_outputs(one_thread) -> None:
    """The last block's reported error is measured on inputs made by the recovered blocks before it:
    recompute it from the final model and a dense copy."""
    dense = make_model("llama")
    model = copy.deepcopy(dense)
    result = _prune(model, "perp", steps=6, lr=2e-3)
    (_, block), (_, dense_block) = decoder_blocks(model)[-1], decoder_blocks(dense)[-1]
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args, kw: seen.append((args, kw)), with_kwargs=True)
    with torch.no_grad():
        for batch in _ids().split(4):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    num = den = 0.0
    with torch.no_grad():
        for args, kw in seen:
            got, want = block(*args, **kw), dense_block(*args, **kw)
            got, want = (x[0] if isinstance(x, tuple) else x for x in (got, want))
            num += float((got - want).pow(2).sum())
            den += float(want.pow(2).sum())
    assert result.blocks[-1].recon_error == pytest.approx(num / den, rel=1e-4)


def test_taps_record_the_attention_and_mlp_outputs() -> None:
    """Against the residual structure of a Llama block: out = x + attention + mlp."""
    model = make_model("llama")
    block = decoder_blocks(model)[0][1]
    paths = sub_block_modules(block)
    assert paths == {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}
    taps = SubBlockTaps(block, paths)
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args, kw: seen.append((args, kw)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=_ids(2), use_cache=False)
    handle.remove()
    (args, kw) = seen[0]
    with torch.no_grad(), taps.record():
        out = block(*args, **kw)
    out = out[0] if isinstance(out, tuple) else out
    x = args[0] if args else kw["hidden_states"]
    attention, mlp = taps.targets["attention"][0], taps.targets["mlp"][0]
    torch.testing.assert_close(x + attention + mlp, out)
    with torch.no_grad():
        h = x + attention
        torch.testing.assert_close(block.mlp(block.post_attention_layernorm(h)), mlp)
    block(*args, **kw)  # outside record(): nothing more is recorded
    assert len(taps.targets["attention"]) == 1


def test_same_seed_same_weights_other_seed_other_weights(one_thread) -> None:
    runs = []
    for seed in (0, 0, 1):
        model = make_model("llama")
        _prune(model, "perp", steps=3, lr=2e-3, seed=seed)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("recover", "options", "message"),
    [
        ("prep", {}, "did you mean 'perp'"),
        ("perp", {"rr": 4}, "did you mean 'r'"),
        ("perp", {"r": -1}, "rank r must be >= 1"),
        ("lift", {"steps": 0}, "steps must be >= 1"),
        ("perp", {"lr": -1.0}, "lr must be > 0"),
        ("perp", {"batch_size": 2}, "set micro_batch"),
        ("perp", {"micro_batch": 0}, "micro_batch must be a whole number"),
        ("lift", {"micro_batch": 1.5}, "micro_batch must be a whole number"),
        (None, {"steps": 2}, "recover is not"),
    ],
)
def test_bad_recovery_options_fail_before_loading(tmp_path, recover, options, message) -> None:
    with pytest.raises(ConfigError, match=message):  # not "model not found": nothing was loaded
        llmprune.prune(str(tmp_path / "missing"), recover=recover, recover_options=options)


def _sub_block_outputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block 0's attention and MLP outputs of a Llama on ``ids``, read directly (not through the taps)."""
    layer, seen = model.model.layers[0], {}
    handles = [
        layer.self_attn.o_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("attention", out)),
        layer.mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("mlp", out)),
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_a_step_is_a_micro_batch_of_the_calibration_batch(one_thread) -> None:
    """micro_batch=1 with batches of 4: each of block 0's first steps trains on one window. With a rate
    too small to move anything, the first losses are then the per-window errors of the plain pruned
    block against the dense one, computed here window by window from the two models: they fail if a step
    takes the wrong rows of its inputs or of its targets, or skips or repeats windows."""
    dense, plain, fused = make_model("llama"), make_model("llama"), make_model("llama")
    _prune(plain)
    result = _prune(fused, "perp", steps=8, lr=1e-12, micro_batch=1)
    record = result.recovery["details"]["blocks"][0]
    assert record["windows_per_step"] == 1 and record["steps"] == 8
    assert result.recovery["options"]["micro_batch"] == 1
    want = []
    for window in _ids().split(1):
        got, ref = _sub_block_outputs(plain, window), _sub_block_outputs(dense, window)
        want.append(sum(float((got[k] - ref[k]).pow(2).sum() / ref[k].pow(2).sum()) for k in ref))
    assert sorted(record["losses"]) == pytest.approx(sorted(want), rel=2e-3)


def test_the_default_step_is_about_2048_tokens_whatever_prune_batch(monkeypatch, one_thread) -> None:
    """The default micro-batch follows the window length, not prune's batch_size: with 24-token windows
    and 48 tokens per step, a step is 2 windows, in batches of 4 as of 8 (same steps, same cost)."""
    from llmprune.recovery import blockwise

    monkeypatch.setattr(blockwise, "DEFAULT_STEP_TOKENS", 48)
    calls = []
    for batch_size in (4, 8):
        model = make_model("llama")
        block = decoder_blocks(model)[0][1]
        rows = []

        def count(_m, a, kw, rows=rows):
            if torch.is_grad_enabled():  # a training forward, not the calibration or propagation ones
                rows.append((a[0] if a else kw["hidden_states"]).shape[0])

        block.register_forward_pre_hook(count, with_kwargs=True)
        result = llmprune.prune(
            model, method="wanda", sparsity=0.5, dataset=_ids(), batch_size=batch_size, progress=False,
            recover="perp", recover_options={"steps": 3, "lr": 2e-3},
        )  # fmt: skip
        assert [b["windows_per_step"] for b in result.recovery["details"]["blocks"]] == [2, 2]
        calls.append(rows)
    assert calls[0] == calls[1] == [2, 2, 2]  # block 0's training forwards: three steps of two windows
