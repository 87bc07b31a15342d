"""Run the public reference code of ALPS and OWL on SmolLM2, on CPU, with llmprune's very token tensors.

    python scripts/peers/run_reference.py alps 0.7                     # mazumder-lab/ALPS, 70 %
    python scripts/peers/run_reference.py alps 2:4
    python scripts/peers/run_reference.py owl-wanda 0.7                # luuyin/OWL, Wanda + OWL
    python scripts/peers/run_reference.py owl-sparsegpt 0.7            # luuyin/OWL, SparseGPT + OWL
    python scripts/peers/run_reference.py alps-layers 0.7 --blocks 8,24  # ALPS's layer solver vs ours

The reference sources are read from a local git mirror at a pinned commit (``--repo``, default
``/work/.mirror/<owner>+<name>/repo``; the ``fetch`` tool or ``git clone --mirror`` makes one), copied
to a temporary directory, and patched by exact text replacements listed in ``PATCHES`` below — each must
match, or the run stops — only where they cannot run on a CPU or on transformers 5:

* ``cuda:0`` → ``cpu`` and ``torch.cuda.synchronize()`` → ``pass`` (both repos hard-code the GPU);
* the decoder-layer calls: transformers ≥ 4.48 computes rotary embeddings once per model and passes
  them to each layer as ``position_embeddings``; the references capture ``position_ids`` in their
  ``Catcher`` and pass those. The patch captures and passes ``position_embeddings`` instead.

Everything else is theirs: ALPS's ``llama_sequential`` with its ``ALPS_prune.ALPS_admm`` (ρ = 0.1, up to
300 iterations, CG refit), OWL's ``prune_wanda_outlier`` / ``prune_sparsegpt_outlier`` (λ = 0.08, M = 5,
the paper's). The driver only replaces their C4/WikiText loaders by our ``calib.pt`` windows (same 32 x
512 tokens as ``scripts/bench_frontier.py``), loads the model as llmprune does (fp32), times the pruning
call, and scores with ``bench_common.window_perplexity`` on ``test.pt`` — the loop of every llmprune row
— so the only difference between rows is the pruning. OWL has no N:M allocation: its ``2:4`` row is the
repo's own Wanda (``prune_wanda``) at 2:4. The record goes to ``--out/<peer>_<sparsity>.json``.

``alps-layers`` is the affordable side-by-side on a busy CPU: the reference's ``ALPS_prune.ALPS_admm`` and
llmprune's ``alps`` (and ``sparsegpt``) prune the Linears of the given blocks of the dense model from the
same calibration Hessians; the relative layer loss ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` is measured on the
Hessians of the test windows, and the CPU seconds of each solve are summed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_common as bench  # noqa: E402

REPOS = {
    "alps": (
        "mazumder-lab/ALPS",
        "8af9e6b5c8b1b06a028bde6065e5c38829df3a19",
        ["alps.py", "llama.py", "modelutils.py"],
    ),
    "owl": (
        "luuyin/OWL",
        "dddb7a4bffe27c73e4c8cf692b3a5e36401532c8",
        ["lib/__init__.py", "lib/prune_all.py", "lib/sparsegpt.py", "lib/layerwrapper.py", "lib/data.py"],
    ),
}
#: (file, old text, new text, expected count or None for "at least one", why)
PATCHES = {
    "alps": [
        ("alps.py", "'cuda:0'", "'cpu'", None, "hard-coded GPU"),
        ("alps.py", "torch.cuda.synchronize()", "pass", 1, "no CUDA on this machine"),
        ("modelutils.py", "torch.device('cuda:0')", "torch.device('cpu')", 1, "hard-coded GPU"),
        (
            "llama.py",
            "cache['position_ids'] = kwargs['position_ids']",
            "cache['position_ids'] = kwargs['position_embeddings']",
            None,
            "transformers 5 layers take rotary position_embeddings",
        ),
        (
            "llama.py",
            "position_ids=position_ids)[0]",
            "position_embeddings=position_ids)[0]",
            None,
            "transformers 5 layers take rotary position_embeddings",
        ),
    ],
    "owl": [
        ("lib/sparsegpt.py", "torch.cuda.synchronize()", "pass", None, "no CUDA on this machine"),
        ("lib/prune_all.py", ".cuda())", ")", None, "hard-coded GPU (magnitude threshold sort)"),
        (
            "lib/prune_all.py",
            "cache['position_ids'] = kwargs['position_ids']",
            "cache['position_ids'] = kwargs['position_embeddings']",
            None,
            "transformers 5 layers take rotary position_embeddings",
        ),
        (
            "lib/prune_all.py",
            "position_ids=position_ids)[0]",
            "position_embeddings=position_ids)[0]",
            None,
            "transformers 5 layers take rotary position_embeddings",
        ),
    ],
}


def checkout(peer: str, repo: Path, into: Path) -> list[dict]:
    """Write the pinned, patched sources into ``into``. -> the patches applied, with their counts."""
    _, commit, files = REPOS[peer]
    applied = []
    for name in files:
        try:
            text = subprocess.run(
                ["git", "--git-dir", str(repo), "show", f"{commit}:{name}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except subprocess.CalledProcessError:
            if name.endswith("__init__.py"):  # a namespace package needs none
                text = ""
            else:
                raise
        for file, old, new, expected, why in PATCHES[peer]:
            if file != name:
                continue
            count = text.count(old)
            if count == 0 or (expected is not None and count != expected):
                raise SystemExit(
                    f"patch of {file} does not apply ({old!r} found {count}x): check the commit."
                )
            text = text.replace(old, new)
            applied.append({"file": file, "old": old, "new": new, "count": count, "why": why})
        path = into / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return applied


def prune(peer: str, sparsity: str, model, calib: torch.Tensor, src: Path) -> None:
    """Call the reference's own pruning entry point on ``model`` with our calibration windows."""
    sys.path.insert(0, str(src))
    loader = [(x.unsqueeze(0), None) for x in calib]  # their loaders yield (input, target) pairs
    n, m = (int(v) for v in sparsity.split(":")) if ":" in sparsity else (0, 0)
    ratio = n / m if m else float(sparsity)
    model.seqlen = calib.shape[1]
    if peer == "alps":
        llama = importlib.import_module("llama")
        llama.args = SimpleNamespace(nsamples=calib.shape[0], method="ALPS", sp=ratio, nm_n=n, nm_m=m)
        llama.llama_sequential(model, loader, "cpu", nsamples=calib.shape[0])
        return
    prune_all = importlib.import_module("lib.prune_all")
    prune_all.get_loaders = lambda *_a, **_k: (loader, None)
    model.hf_device_map = {}  # they read it (multi-GPU placement); empty = one device
    args = SimpleNamespace(
        nsamples=calib.shape[0],
        seed=0,
        sparsity_ratio=ratio,
        model="smollm2",
        Lamda=0.08,
        Hyper_m=5.0,
        use_variant=False,
    )
    cpu = torch.device("cpu")
    if m:  # OWL allocates unstructured sparsity only: the repo's own N:M Wanda / SparseGPT
        # N:M in these repos: prune_n = the number *pruned* per group of m
        fn = prune_all.prune_wanda if peer == "owl-wanda" else prune_all.prune_sparsegpt
        fn(args, model, None, cpu, prune_n=m - n, prune_m=m)
    elif peer == "owl-wanda":
        prune_all.prune_wanda_outlier(args, model, None, cpu)
    else:
        prune_all.prune_sparsegpt_outlier(args, model, None, cpu)


def compare_layers(a: argparse.Namespace, repo: Path, model, calib, test) -> dict:
    """The reference's ALPS layer solver against llmprune's on the same Hessians (see the docstring)."""
    from choose_defaults import _layer_hessians

    from llmprune.registry import get_solver
    from llmprune.solvers.types import LayerProblem, LayerStats, reconstruction_error
    from llmprune.spec import SparsitySpec

    blocks = [int(b) for b in a.blocks.split(",")]
    layers = _layer_hessians(model, calib, test, blocks)  # "valid" entries are the test windows' here
    n, m = (int(v) for v in a.sparsity.split(":")) if ":" in a.sparsity else (0, 0)
    ratio = n / m if m else float(a.sparsity)
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        patches = checkout("alps", repo, Path(tmp))
        sys.path.insert(0, tmp)
        reference = importlib.import_module("alps")
        for name, layer in layers.items():
            w, h_cal, h_test = layer["weight"], layer["calib"], layer["valid"]
            news = {}
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w.clone()
            pruner = reference.ALPS_prune(linear, nsamples=calib.shape[0], seqlen=calib.shape[1])
            pruner.XtX = h_cal.clone().float()  # their sum of x xᵀ; the scale cancels in their normalisation
            cpu = time.process_time()
            pruner.ALPS_admm(sp=ratio, nm_n=n, nm_m=m, rho=0.1)
            news["ALPS (reference)"] = (linear.weight.data.clone(), time.process_time() - cpu)
            problem = LayerProblem(name, w, LayerStats(hessian=h_cal), SparsitySpec.parse(a.sparsity))
            for method in ("alps", "sparsegpt"):
                cpu = time.process_time()
                news[f"llmprune {method}"] = (get_solver(method)(problem).weight, time.process_time() - cpu)
            energy = reconstruction_error(w, torch.zeros_like(w), h_test)
            for label, (new, seconds) in news.items():
                t = totals.setdefault(label, [0.0, 0.0])
                t[0] += reconstruction_error(w, new, h_test) / energy / len(layers)
                t[1] += seconds
            print(name, {k: round(v[0], 5) for k, v in totals.items()}, file=sys.stderr, flush=True)
    return {
        "sparsity": a.sparsity,
        "blocks": blocks,
        "test_loss": {k: v[0] for k, v in totals.items()},
        "solve_cpu_s": {k: v[1] for k, v in totals.items()},
        "patches": patches,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("peer", choices=("alps", "owl-wanda", "owl-sparsegpt", "alps-layers"))
    p.add_argument("sparsity", help="a fraction (0.7) or N:M (2:4)")
    p.add_argument("--repo", type=Path, default=None, help="git dir of the reference (a mirror)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("bench_out/data16"))
    p.add_argument("--out", type=Path, default=Path("bench_out/peers"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--blocks", default="8,24", help="alps-layers: the decoder blocks whose Linears are compared"
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    family = "alps" if a.peer.startswith("alps") else "owl"
    owner_name = REPOS[family][0]
    repo = a.repo or Path("/work/.mirror") / owner_name.replace("/", "+") / "repo"
    if not repo.exists():
        raise SystemExit(f"no mirror of {owner_name} at {repo}: pass --repo (a `git clone --mirror` of it).")

    import llmprune

    calib, test = bench.load_data(a.data)
    model, _ = llmprune.load_model(a.model)
    if a.peer == "alps-layers":
        record = compare_layers(a, repo, model, calib, test)
        a.out.mkdir(parents=True, exist_ok=True)
        bench.save_json(a.out.parent / f"alps_layers_{a.sparsity.replace(':', 'of')}.json", record)
        print(json.dumps({k: v for k, v in record.items() if k != "patches"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        patches = checkout(family, repo, Path(tmp))
        cpu = time.process_time()
        fwd = bench.dense_forward_seconds(model, calib)
        fwd_cpu, cpu = time.process_time() - cpu, time.process_time()
        start = time.perf_counter()
        with torch.no_grad():
            prune(a.peer, a.sparsity, model, calib, Path(tmp))
        seconds, prune_cpu = time.perf_counter() - start, time.process_time() - cpu
    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    label = {"alps": "ALPS (reference)", "owl-wanda": "OWL Wanda (reference)"}.get(
        a.peer, "OWL SparseGPT (reference)"
    )
    record = {
        "label": label,
        "peer": a.peer,
        "repo": owner_name,
        "commit": REPOS[family][1],
        "sparsity": a.sparsity,
        "allocation": "owl λ 0.08, M 5" if a.peer != "alps" and ":" not in a.sparsity else "uniform",
        "ppl": bench.window_perplexity(model, test),
        "achieved_sparsity": zeros,
        "prune_s": seconds,
        "dense_fwd_s": fwd,
        "prune_cpu_s": prune_cpu,
        "dense_fwd_cpu_s": fwd_cpu,
        "threads": a.threads,
        "patches": patches,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    bench.save_json(a.out / f"{a.peer}_{a.sparsity.replace(':', 'of')}.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "patches"}))


if __name__ == "__main__":
    main()
