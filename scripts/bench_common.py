"""Shared pieces of the benchmark scripts: fixed data, one measured run, markdown tables.

Every benchmark uses the same token tensors, written once to ``--data`` (``calib.pt``: calibration
windows sampled from the built-in calibration text; ``test.pt`` and ``valid.pt``: evenly spaced
windows of the built-in held-out text's test part, *Pride and Prejudice*, and validation part, *Emma*).
Tables report the test part only; defaults are chosen on the validation part (``load_data(d, "valid")``).
The llm-compressor peer (``../shared/bench/peers``) is fed the very same
tensors, so perplexities are comparable across tools. Timings are reported as ratios to one dense
forward over the calibration tokens measured in the same process: absolute CPU seconds are noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def make_data(
    out: Path, tokenizer, num_calibration_samples: int, max_seq_length: int, eval_windows: int
) -> None:
    from llmprune.calibration.data import calibration_tokens
    from llmprune.evaluation.perplexity import eval_windows as held_out

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "calib.pt").exists():
        calib = calibration_tokens(None, tokenizer, num_calibration_samples, max_seq_length, seed=0)
        torch.save(calib, out / "calib.pt")
    for part, source in (("test", "test"), ("valid", "validation")):
        if not (out / f"{part}.pt").exists():
            ev = held_out(tokenizer, source, max_seq_length, limit=eval_windows)
            torch.save(ev, out / f"{part}.pt")
            # the same text for checkers that tokenize themselves (verify_checkpoint.py)
            (out / f"{part}.txt").write_text(tokenizer.decode(ev.reshape(-1)), encoding="utf-8")


def load_data(data: Path, part: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows of ``part``: "test" for tables, "valid" for choosing)."""
    return torch.load(data / "calib.pt"), torch.load(data / f"{part}.pt")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def dense_forward_seconds(model, calib: torch.Tensor) -> float:
    """One forward of the full model over every calibration window, one window at a time (as the peer)."""
    model(calib[:1, :64])  # warm-up
    start = time.perf_counter()
    for x in calib:
        model(x.unsqueeze(0))
    return time.perf_counter() - start


@torch.no_grad()
def window_perplexity(model, ev: torch.Tensor) -> float:
    """Mean next-token NLL over the windows, one at a time (the peer's exact loop)."""
    nll, count = 0.0, 0
    for x in ev:
        logits = model(x.unsqueeze(0)).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
        count += x.shape[0] - 1
    return math.exp(nll / count)


def prune_on_windows(model, tok, calib, method: str, sparsity: str, options: dict[str, Any]):
    """Prune ``model`` in place on the calibration windows ``calib`` (all of them, at their length), the
    benchmarks' one way to call ``llmprune.prune``. -> (PruneResult, prune seconds)."""
    import llmprune

    start = time.perf_counter()
    result = llmprune.prune(
        model,
        tok,
        method=method,
        sparsity=sparsity,
        dataset=calib,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        progress=False,
        **options,
    )
    return result, time.perf_counter() - start


def prune_fixed(model_name: str, data: Path, method: str, sparsity: str, options: dict[str, Any]):
    """Load and prune with the fixed calibration tokens. -> (model, PruneResult, prune seconds)."""
    import llmprune

    calib, _ = load_data(data)
    model, tok = llmprune.load_model(model_name)
    return (model, *prune_on_windows(model, tok, calib, method, sparsity, options))


def run_one(
    model_name: str,
    data: Path,
    method: str,
    sparsity: str,
    options: dict[str, Any],
    threads: int,
    valid: bool = False,
) -> dict:
    """Load, prune with the fixed calibration tokens, score: one JSON-ready record (``ppl`` on the test
    part; with ``valid``, ``ppl_valid`` on the validation part too, for choosing settings)."""
    torch.set_num_threads(threads)
    rec: dict[str, Any] = {"method": method, "sparsity": sparsity, "options": options, "threads": threads}
    cpu = time.process_time()  # includes the model load, a few hundred ms
    model, result, rec["prune_s"] = prune_fixed(model_name, data, method, sparsity, options)
    rec["prune_cpu_s"] = time.process_time() - cpu  # load-robust with one thread (no waiting counted)
    rec["rss_peak_after_prune_mib"] = peak_rss_mib()
    rec["achieved_sparsity"] = result.overall_sparsity
    rec["ppl"] = window_perplexity(model, load_data(data)[1])
    if valid:
        rec["ppl_valid"] = window_perplexity(model, load_data(data, "valid")[1])
    if result.allocation:  # the settings a non-uniform allocation ran with (they are code defaults)
        rec["allocation_options"] = result.allocation.get("options", {})
    rec["block_recon_error_mean"] = sum(b.recon_error for b in result.blocks) / max(1, len(result.blocks))
    return rec


def run_dense(model_name: str, data: Path, threads: int) -> dict:
    import llmprune

    torch.set_num_threads(threads)
    calib, ev = load_data(data)
    model, _ = llmprune.load_model(model_name)
    cpu = time.process_time()
    fwd = dense_forward_seconds(model, calib)
    return {
        "dense_fwd_s": fwd,
        "dense_fwd_cpu_s": time.process_time() - cpu,
        "ppl": window_perplexity(model, ev),
        "calib_shape": list(calib.shape),
        "eval_shape": list(ev.shape),
        "threads": threads,
    }


def run_key(method: str, sparsity: str, options: dict[str, Any]) -> str:
    """The key of one run in a results JSON."""
    return f"{method}|{sparsity}|{json.dumps(options, sort_keys=True)}"


def child(script: str, args: list[str]) -> dict:
    """Run ``script`` in a fresh process (own peak RSS; a crash loses one row): its last stdout line."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_run_args(p: argparse.ArgumentParser, out: str, section: str) -> None:
    """The flags every sweep shares: model, fixed data, sizes, threads, output, and the child modes."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("bench_out/data"))
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--num_calibration_samples", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--section", default=section)
    p.add_argument("--one", nargs=3, metavar=("METHOD", "SPARSITY", "OPTIONS_JSON"), help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)


def write_section(name: str, body: str, path: Path = BENCH_MD) -> None:
    """Replace the ``<!-- name:start -->…<!-- name:end -->`` section of docs/benchmarks.md (atomic)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
