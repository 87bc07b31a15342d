"""Calibration across processes: two gloo ranks give the very bits one process gives.

The reference is the ordinary single-process run of the same code (``llmprune.prune``), and the
summation tree is checked against float64 sums computed directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import VOCAB, make_model

import llmprune
from llmprune.calibration.stats import StatsAccumulator, combine, dyadic_nodes, tree_split
from llmprune.solvers.types import HESSIAN, SQ_NORMS

# 10 windows in batches of 2 = 5 batches: rank 0 gets batches [0, 2), rank 1 gets [2, 5)
IDS = torch.randint(0, VOCAB, (10, 16), generator=torch.Generator().manual_seed(7))
CASES = [
    ("wanda", dict(sparsity=0.5)),
    ("magnitude", dict(sparsity="2:4")),
    ("sparsegpt", dict(sparsity=0.5, true_sequential=True)),  # Hessians, weight updates, sequential groups
    # the allocation's statistics pass is reduced across ranks too
    ("alps", dict(sparsity=0.6, allocation="owl", owl_m=2.0, max_iterations=12)),
]


def _run(method: str, kw: dict):
    model = make_model("llama", seed=3)
    result = llmprune.prune(
        model,
        None,
        method=method,
        dataset=IDS,
        num_calibration_samples=10,
        max_seq_length=16,
        batch_size=2,
        progress=False,
        **kw,
    )
    return {
        "masks": result.keep_masks,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "errors": [b.recon_error for b in result.blocks],
        "layer_errors": {k: m.layer_error for k, m in result.modules.items()},
        "hash": result.calibration_hash,
    }


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for method, kw in CASES:
            record = _run(method, kw)  # llmprune.prune picks up the running process group by itself
            if rank == 0:
                torch.save(record, Path(out) / f"{method}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    init_file = out / "rendezvous"
    mp.spawn(_worker, args=(2, str(init_file), str(out)), nprocs=2, join=True)
    return {method: torch.load(out / f"{method}.pt") for method, _ in CASES}


@pytest.mark.parametrize("method,kw", CASES, ids=[c[0] for c in CASES])
def test_two_processes_are_bit_identical_to_one(two_ranks, method, kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with one thread each: same kernels, same bits
    try:
        single = _run(method, kw)
    finally:
        torch.set_num_threads(threads)
    multi = two_ranks[method]
    assert single["masks"].keys() == multi["masks"].keys()
    for name, keep in single["masks"].items():
        assert torch.equal(keep, multi["masks"][name]), name
    for name, value in single["state"].items():
        assert torch.equal(value, multi["state"][name]), name
    assert single["errors"] == multi["errors"]  # per-batch values summed in batch order: exact
    assert single["layer_errors"] == multi["layer_errors"]
    assert single["hash"] == multi["hash"]


# ---------------------------------------------------------------- the fixed summation tree


def _naive_nodes(lo: int, hi: int) -> list[tuple[int, int]]:
    """Maximal aligned power-of-two intervals inside [lo, hi), by brute force."""
    nodes, i = [], lo
    while i < hi:
        size = 1
        while i % (2 * size) == 0 and i + 2 * size <= hi:
            size *= 2
        nodes.append((i, i + size))
        i += size
    return nodes


def test_dyadic_nodes_and_split_match_brute_force():
    for lo in range(0, 40):
        for hi in range(lo, 45):
            assert dyadic_nodes(lo, hi) == _naive_nodes(lo, hi), (lo, hi)
    for lo, hi in [(0, 2), (0, 5), (4, 7), (8, 16), (3, 4 + 3)]:
        mid = tree_split(lo, hi)
        assert lo < mid < hi and (mid - lo) & (mid - lo - 1) == 0 and mid - lo >= (hi - lo) / 2


def _batches(num: int, width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(int(torch.randint(3, 9, (1,), generator=g)), width, generator=g) * 10 for _ in range(num)
    ]


@pytest.mark.parametrize("num_batches", [1, 5, 13])
def test_any_contiguous_split_gives_the_same_bits(num_batches):
    batches = _batches(num_batches, 6)
    needs = frozenset({SQ_NORMS, HESSIAN})

    def split_stats(cuts: list[int]):
        nodes, tokens = [], 0
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            acc = StatsAccumulator(6, needs, torch.device("cpu"))
            for b in range(lo, hi):
                acc.add(batches[b], b)
            nodes += acc.nodes()
            tokens += acc.num_tokens
        return combine(nodes, tokens)

    whole = StatsAccumulator(6, needs, torch.device("cpu"))
    for x in batches:
        whole.add(x)
    reference = whole.result()
    g = torch.Generator().manual_seed(num_batches)
    for parts in range(1, min(num_batches, 5) + 1):
        inner = sorted(torch.randperm(num_batches - 1, generator=g)[: parts - 1].add(1).tolist())
        got = split_stats([0, *inner, num_batches])
        assert torch.equal(got.hessian, reference.hessian) and torch.equal(got.sq_norms, reference.sq_norms)
    # and the statistics are the means they claim to be (float64 reference)
    x = torch.cat(batches).double()
    torch.testing.assert_close(reference.hessian.double(), x.T @ x / len(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reference.sq_norms.double(), (x * x).mean(0), rtol=1e-5, atol=1e-4)
    assert reference.num_tokens == len(x)


def test_repeated_calls_in_one_batch_share_a_leaf():
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    acc = StatsAccumulator(3, frozenset({HESSIAN}), torch.device("cpu"))
    acc.add(x1, 0)
    acc.add(x2, 0)  # the same Linear called twice in one forward
    stats = acc.result()
    x = torch.cat([x1, x2]).double()
    torch.testing.assert_close(stats.hessian.double(), x.T @ x / 9, rtol=1e-6, atol=1e-6)
    assert stats.num_tokens == 9


def test_too_many_processes_for_the_batches_is_a_clear_error(monkeypatch):
    from llmprune.calibration import distributed
    from llmprune.errors import ConfigError

    class FakeWorld(distributed.Comm):
        world = 4

    monkeypatch.setattr("llmprune.calibration.engine.current_comm", lambda: FakeWorld())
    with pytest.raises(ConfigError, match="batch_size"):
        llmprune.prune(
            make_model("llama"),
            None,
            dataset=IDS[:4],
            num_calibration_samples=4,
            max_seq_length=16,
            batch_size=2,
            progress=False,
        )


def test_solves_are_dealt_largest_first_to_the_least_loaded_rank():
    from llmprune.calibration.distributed import Comm

    class TwoRanks(Comm):
        world = 2

    assert TwoRanks().owners([5, 1, 1, 1, 1, 1]) == [0, 1, 1, 1, 1, 1]  # hand-computed: loads 5 and 5
    assert TwoRanks().owners([3, 3, 2, 2, 2]) == [0, 1, 0, 1, 0]  # loads 7 and 5
    assert Comm().owners([4, 2]) == [0, 0]
