"""Calibration across processes: 2 or 3 gloo ranks give the very bits one process gives.

The ranks share calibration *samples*; the statistics are summed per sample in an order fixed by the
data (``stats.py``). The references: the ordinary single-process run of the same code, the fixed
summation order written out by hand, and float64 sums computed directly. Besides masks and weights, the
runs compare a digest of every reduced statistic (the pruning pass's and the allocation pass's): Wanda's
masks would survive a change in the last bits of its column norms, the statistics would not.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ARCHITECTURES, SAMPLE_TEXT, VOCAB, make_model

import llmprune
from llmprune.calibration import engine
from llmprune.calibration.capture import batch_ranges
from llmprune.calibration.distributed import Comm, share
from llmprune.calibration.stats import (
    CHUNK,
    StatsAccumulator,
    combine,
    dyadic_nodes,
    part_spans,
    tree_split,
)
from llmprune.errors import ConfigError
from llmprune.solvers.types import HESSIAN, SQ_NORMS

IDS = torch.randint(0, VOCAB, (10, 16), generator=torch.Generator().manual_seed(7))
# 8 samples at the default batch size (8) is one batch: 2 and 3 ranks cut it (one chunk, so the ranks'
# shares start inside it). 10 samples in batches of 3 are two chunks: whole chunks for 2 ranks.
CASES = [
    ("wanda-8", "wanda", dict(sparsity=0.5, num_calibration_samples=8)),
    ("sparsegpt-8", "sparsegpt", dict(sparsity=0.5, true_sequential=True, num_calibration_samples=8)),
    ("owl-8", "wanda", dict(sparsity=0.5, allocation="owl", owl_m=2.0, num_calibration_samples=8)),
    ("sparsegpt-10", "sparsegpt", dict(sparsity="2:4", num_calibration_samples=10, batch_size=3)),
]


def _digest(stats) -> str:
    h = hashlib.sha256()
    for t in (stats.sq_norms, stats.hessian):
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    h.update(str(stats.num_tokens).encode())
    return h.hexdigest()


def _run(kw: dict, arch: str = "llama") -> dict:
    """One pruning run; also the digest of every statistic the engine reduced, in order."""
    seen: list[tuple[str, str]] = []
    reduced = engine._reduced

    def recording(accs, comm, num_samples):
        out = reduced(accs, comm, num_samples)
        seen.extend((name, _digest(s)) for name, s in out.items())
        return out

    engine._reduced = recording
    try:
        model = make_model(arch, seed=3)
        result = llmprune.prune(model, None, dataset=IDS, max_seq_length=16, progress=False, **kw)
    finally:
        engine._reduced = reduced
    return {
        "masks": result.keep_masks,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "errors": [b.recon_error for b in result.blocks],
        "layer_errors": {k: m.layer_error for k, m in result.modules.items()},
        "allocation": (result.allocation or {}).get("sparsity"),
        "stats": seen,
        "hash": result.calibration_hash,
    }


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, method, kw in CASES:
            record = _run(dict(method=method, **kw))  # llmprune.prune finds the running process group
            if rank == 0:
                torch.save(record, Path(out) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ranks{request.param}")
    mp.spawn(
        _worker, args=(request.param, str(out / "rendezvous"), str(out)), nprocs=request.param, join=True
    )
    return {name: torch.load(out / f"{name}.pt") for name, _, _ in CASES}


def _single(kw: dict, arch: str = "llama") -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with one thread each: same kernels, same bits
    try:
        return _run(kw, arch)
    finally:
        torch.set_num_threads(threads)


def _assert_same(single: dict, multi: dict) -> None:
    assert single["stats"] == multi["stats"]  # every reduced statistic, bit for bit
    assert single["masks"].keys() == multi["masks"].keys()
    for name, keep in single["masks"].items():
        assert torch.equal(keep, multi["masks"][name]), name
    for name, value in single["state"].items():
        assert torch.equal(value, multi["state"][name]), name
    assert single["errors"] == multi["errors"]  # per-sample values summed in sample order: exact
    assert single["layer_errors"] == multi["layer_errors"]
    assert single["allocation"] == multi["allocation"]
    assert single["hash"] == multi["hash"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_processes_are_bit_identical_to_one(ranks, case):
    name, method, kw = case
    single = _single(dict(method=method, **kw))
    assert single["stats"]  # the digests were recorded
    _assert_same(single, ranks[name])
    if kw.get("allocation") == "owl":  # the allocation pass was reduced too, and it did allocate
        assert len(set(single["allocation"].values())) > 1


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_batch_size_does_not_change_the_bits(arch):
    """Statistics are summed per sample, and a sample's activations do not depend on its batch-mates
    (what a process's share, cut out of one process's batches, relies on): batches of 1, 3 or 8 give
    one result, on every architecture."""
    kw = dict(method="sparsegpt", num_calibration_samples=10)
    runs = [_single(dict(kw, batch_size=b), arch) for b in (1, 3, 8)]
    for other in runs[1:]:
        _assert_same(runs[0], other)


# ---------------------------------------------------------------- the fixed summation order


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


def _units(num: int, width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(num)
    return [
        torch.randn(int(torch.randint(3, 9, (1,), generator=g)), width, generator=g) * 10 for _ in range(num)
    ]


NEEDS = frozenset({SQ_NORMS, HESSIAN})


def test_the_sum_is_the_fixed_order_written_out():
    """20 units in chunks of 8: each chunk folded left to right, then ((c0 + c1) + c2), by hand."""
    units = _units(20, 5)
    acc = StatsAccumulator(5, NEEDS, torch.device("cpu"))
    for u, x in enumerate(units):
        acc.add(x, u)
    got = acc.result()

    def fold(lo, hi):
        h, q = units[lo].T @ units[lo], units[lo].pow(2).sum(0)
        for x in units[lo + 1 : hi]:
            h, q = h + x.T @ x, q + x.pow(2).sum(0)
        return h, q

    (h0, q0), (h1, q1), (h2, q2) = fold(0, 8), fold(8, 16), fold(16, 20)
    tokens = sum(len(x) for x in units)
    assert torch.equal(got.hessian, ((h0 + h1) + h2) / tokens)
    assert torch.equal(got.sq_norms, ((q0 + q1) + q2) / tokens)
    x = torch.cat(units).double()  # and they are the means they claim to be
    torch.testing.assert_close(got.hessian.double(), x.T @ x / len(x), rtol=1e-5, atol=1e-4)
    assert got.num_tokens == len(x)


@pytest.mark.parametrize("num_units", [1, 5, 13, 40])
def test_any_contiguous_split_gives_the_same_bits(num_units):
    """Cuts anywhere, inside chunks too: the parts' partial sums finish to the one process's bits."""
    units = _units(num_units, 6)
    whole = StatsAccumulator(6, NEEDS, torch.device("cpu"))
    for x in units:
        whole.add(x)
    reference = whole.result()
    g = torch.Generator().manual_seed(num_units)
    for parts in range(1, min(num_units, 6) + 1):
        for _ in range(4):
            inner = sorted(torch.randperm(num_units - 1, generator=g)[: parts - 1].add(1).tolist())
            cuts = [0, *inner, num_units]
            nodes, tokens = [], 0
            for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
                acc = StatsAccumulator(6, NEEDS, torch.device("cpu"))
                for u in range(lo, hi):
                    acc.add(units[u], u)
                mine = acc.nodes()
                assert [(n.lo, n.hi) for n in mine] == part_spans(lo, hi)  # what the other ranks expect
                nodes += mine
                tokens += acc.num_tokens
            got = combine(nodes, tokens)
            assert torch.equal(got.hessian, reference.hessian), cuts
            assert torch.equal(got.sq_norms, reference.sq_norms), cuts


def test_part_spans_match_the_accumulator_everywhere():
    for chunk in (1, 3, 4):
        for lo in range(0, 20):
            for hi in range(lo + 1, 26):
                acc = StatsAccumulator(2, frozenset({SQ_NORMS}), torch.device("cpu"), chunk=chunk)
                for u in range(lo, hi):
                    acc.add(torch.ones(1, 2), u)
                assert [(n.lo, n.hi) for n in acc.nodes()] == part_spans(lo, hi, chunk), (chunk, lo, hi)


def test_repeated_calls_in_one_unit_share_a_term():
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    acc = StatsAccumulator(3, frozenset({HESSIAN}), torch.device("cpu"))
    acc.add(x1, 0)
    acc.add(x2, 0)  # the same Linear called twice in one forward
    stats = acc.result()
    x = torch.cat([x1, x2]).double()
    torch.testing.assert_close(stats.hessian.double(), x.T @ x / 9, rtol=1e-6, atol=1e-6)
    assert stats.num_tokens == 9
    with pytest.raises(ValueError, match="in order"):
        acc = StatsAccumulator(3, frozenset({HESSIAN}), torch.device("cpu"))
        acc.add(x1, 0)
        acc.add(x2, 2)  # a gap would silently drop a unit


def test_a_batch_is_added_sample_by_sample():
    """(B, L, in) and router-style (B·L, in) inputs are split per sample; inputs that cannot be (tokens
    routed to an expert) go whole to the batch's first sample, and the module is marked."""
    hidden = torch.randn(3, 4, 6)  # (B, L, d)
    x = torch.randn(3, 4, 5) * 10

    def fed(*xs):
        acc = StatsAccumulator(5, NEEDS, torch.device("cpu"))
        engine._add_per_sample(acc, "m", list(xs), hidden, first=0)
        return acc

    by_hand = StatsAccumulator(5, NEEDS, torch.device("cpu"))
    for i in range(3):
        by_hand.add(x[i], i)
        by_hand.add(2 * x[i], i)  # a second call of the same Linear: its sample's term, in call order
    want = by_hand.result()
    for got in (fed(x, 2 * x), fed(x.reshape(12, 5), 2 * x.reshape(12, 5))):
        assert not got.per_batch
        stats = got.result()
        assert torch.equal(stats.hessian, want.hessian) and torch.equal(stats.sq_norms, want.sq_norms)
    routed = fed(x.reshape(12, 5)[:7])
    assert routed.per_batch
    stats = routed.result()
    flat = x.reshape(12, 5)[:7].double()
    torch.testing.assert_close(stats.hessian.double(), flat.T @ flat / 7, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- who holds what


def test_shares_cover_the_samples_in_whole_chunks_when_they_can():
    for n in range(1, 41):
        chunks = -(-n // CHUNK)
        for world in range(1, n + 1):
            parts = [share(n, world, r) for r in range(world)]
            assert [p.start for p in parts] == [0, *[p.stop for p in parts[:-1]]] and parts[-1].stop == n
            assert all(len(p) > 0 for p in parts), (n, world)
            if chunks >= world:
                assert all(p.start % CHUNK == 0 for p in parts), (n, world)
            else:
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [share(128, 3, r) for r in range(3)] == [range(0, 40), range(40, 80), range(80, 128)]
    assert [share(8, 3, r) for r in range(3)] == [range(0, 2), range(2, 5), range(5, 8)]


def test_batches_are_one_process_batches_cut_at_the_share():
    assert batch_ranges(range(0, 8), 8) == [range(0, 8)]
    assert batch_ranges(range(3, 13), 4) == [range(3, 4), range(4, 8), range(8, 12), range(12, 13)]
    assert batch_ranges(range(8, 16), 3) == [range(8, 9), range(9, 12), range(12, 15), range(15, 16)]
    assert batch_ranges(range(5, 5), 4) == []


def test_more_processes_than_samples_is_refused_before_any_forward(monkeypatch):
    class FiveRanks(Comm):
        world = 5

    def no_forward(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(engine, "current_comm", lambda: FiveRanks())
    monkeypatch.setattr(engine, "capture_block_inputs", no_forward)
    with pytest.raises(ConfigError, match="--nproc_per_node 4 or less"):
        llmprune.prune(make_model("llama"), None, dataset=IDS[:4], max_seq_length=16, progress=False)


def test_solves_are_dealt_largest_first_to_the_least_loaded_rank():
    class TwoRanks(Comm):
        world = 2

    assert TwoRanks().owners([5, 1, 1, 1, 1, 1]) == [0, 1, 1, 1, 1, 1]  # hand-computed: loads 5 and 5
    assert TwoRanks().owners([3, 3, 2, 2, 2]) == [0, 1, 0, 1, 0]  # loads 7 and 5
    assert Comm().owners([4, 2]) == [0, 0]


def test_saved_activations_are_read_back_across_other_cuts(tmp_path):
    """A resumed run may use another number of processes: its batches start at other samples."""
    from llmprune.calibration.resume import _SavedHidden

    hidden = torch.randn(10, 3, 2)  # (samples, L, d)
    for lo, hi in [(0, 3), (3, 8), (8, 10)]:  # cut as the killed run's ranks cut them
        torch.save(hidden[lo:hi].clone(), tmp_path / f"s{lo:06d}.pt")
    saved = _SavedHidden(tmp_path)
    for lo, hi in [(0, 10), (2, 5), (5, 8), (7, 9), (9, 10)]:
        assert torch.equal(saved.samples(lo, hi - lo), hidden[lo:hi]), (lo, hi)


def test_torchrun_prunes_eight_windows_at_the_default_batch_size(tmp_path, tiny_tokenizer):
    """The command the issue quotes, refused before ("1 calibration batches cannot be shared by 2
    processes"): it runs, and rank 0 saves the very files one process saves."""
    make_model("llama", seed=3).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    flags = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "text.txt"), "--method",
             "sparsegpt", "--num_calibration_samples", "8", "--max_seq_length", "16"]  # fmt: skip
    flags.append("--skip_eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for out, launch in (("one", [sys.executable]), ("two", launcher)):
        cmd = [*launch, "-m", "llmprune", "prune", *flags, "--output_dir", str(tmp_path / out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "masks.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


RESUME_CASE = dict(
    method="sparsegpt", sparsity=0.5, true_sequential=True, num_calibration_samples=10, batch_size=3
)


def _resume_worker(rank: int, world: int, init_file: str, ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        record = _run(dict(RESUME_CASE, checkpoint_dir=ckpt, resume=True))
        if rank == 0:
            torch.save(record, out)
    finally:
        dist.destroy_process_group()


def test_a_run_killed_in_one_process_resumes_in_two_with_the_same_bits(tmp_path, monkeypatch):
    """The saved activations were cut at one process's batches (0-2, 3-5, ...); two ranks read them back
    for their own shares (0-7 and 8-9) and finish the run as if it had never stopped."""
    from llmprune.calibration import resume

    straight = _single(RESUME_CASE)
    ckpt = tmp_path / "progress"
    real = resume.Progress.save_block

    def save_then_die(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index == 0:
            raise RuntimeError("killed after block 0")

    with monkeypatch.context() as m:
        m.setattr(resume.Progress, "save_block", save_then_die)
        with pytest.raises(RuntimeError, match="killed"):
            _single(dict(RESUME_CASE, checkpoint_dir=str(ckpt)))
    saved = sorted(p.name for p in (ckpt / "hidden-00001").glob("s*.pt"))
    assert saved == ["s000000.pt", "s000003.pt", "s000006.pt", "s000009.pt"]
    mp.spawn(
        _resume_worker,
        args=(2, str(tmp_path / "rendezvous"), str(ckpt), str(tmp_path / "two.pt")),
        nprocs=2,
        join=True,
    )
    resumed = torch.load(tmp_path / "two.pt")
    assert 0 < len(resumed["stats"]) < len(straight["stats"]), "the finished blocks were restored"
    assert resumed["stats"] == straight["stats"][-len(resumed["stats"]) :]
    for key in ("masks", "state"):
        assert straight[key].keys() == resumed[key].keys()
        assert all(torch.equal(v, resumed[key][k]) for k, v in straight[key].items()), key
    assert straight["errors"] == resumed["errors"]
    assert straight["layer_errors"] == resumed["layer_errors"]
