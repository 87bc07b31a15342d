"""Cutting a captured block call to some of its windows (``llmprune.calibration.rows``)."""

from __future__ import annotations

import torch
from conftest import make_model

from llmprune.calibration.modules import first_output
from llmprune.calibration.rows import row_chunks, take_rows
from llmprune.recovery.masking import decoder_blocks


def test_per_window_tensors_are_cut_and_shared_ones_pass_through() -> None:
    batch = 4
    per_window, broadcast, flat = torch.arange(24.0).view(4, 6), torch.ones(1, 6), torch.arange(4)
    cut = take_rows(
        {"a": per_window, "cos_sin": (broadcast, per_window), "pos": flat, "flag": True}, slice(1, 3), batch
    )
    assert torch.equal(cut["a"], per_window[1:3])
    assert cut["cos_sin"][0] is broadcast and torch.equal(cut["cos_sin"][1], per_window[1:3])
    assert cut["pos"] is flat  # 1-D: a position vector (L,), never a batch dimension
    assert cut["flag"] is True


def test_row_chunks_cover_every_window_once() -> None:
    assert row_chunks(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert row_chunks(4, 4) == [slice(None)] and row_chunks(4, 9) == [slice(None)]


def test_a_cut_call_gives_the_rows_of_the_whole_call(arch, one_thread) -> None:
    """For each architecture, whatever it passes its blocks (masks, rotary tables, position ids): the
    block run on windows 1..2 of a captured batch of 4, cut by take_rows, equals rows 1..2 of the block
    run on all 4. A left-padded window makes the attention mask differ per window."""
    model = make_model(arch)
    block = decoder_blocks(model)[0][1]
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # window 1 is left-padded
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, a, kw: seen.append((a, dict(kw))), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    args, kwargs = seen[0]
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    if args:
        hidden, args = args[0], args[1:]
    else:
        hidden = kwargs.pop("hidden_states")
    rows = slice(1, 3)
    with torch.no_grad():
        whole = first_output(block(hidden, *args, **kwargs))
        cut = first_output(block(hidden[rows], *take_rows(args, rows, 4), **take_rows(kwargs, rows, 4)))
    torch.testing.assert_close(cut, whole[rows], rtol=1e-5, atol=1e-5)
