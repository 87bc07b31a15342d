"""File sizes, load times and perplexity of every export format, on SmolLM2-135M.

For dense, Wanda 50 %, Wanda 2:4 and Wanda 70 %: the checkpoint is saved as dense safetensors and as
``compressed`` (float32 and bfloat16 each), and as GGUF f16 and q8_0. Sizes are ratios to the dense
checkpoint of the same dtype (GGUF: to the 16-bit dense one); load time is one ``llmprune.load_model``
per folder (ratios within the run matter, absolute CPU seconds are noise on a shared machine);
perplexity is measured on the same held-out windows for the model in memory and every GGUF reload;
lossless reloads are checked bit for bit instead (same bits, same perplexity). Results go to
``bench_out/formats/formats.json`` (resumable) and the ``formats`` section of docs/benchmarks.md.

    nice -n 10 python scripts/bench_formats.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import load_data, make_data, prune_fixed, save_json, window_perplexity, write_section

import llmprune
from llmprune.io.compressed import WEIGHTS_NAME

VARIANTS = (("dense", None), ("wanda", "0.5"), ("wanda", "2:4"), ("wanda", "0.7"))
#: (label, format, dtype, gguf_type)
EXPORTS = (
    ("dense fp32", "dense", torch.float32, None),
    ("compressed fp32", "compressed", torch.float32, None),
    ("dense bf16", "dense", torch.bfloat16, None),
    ("compressed bf16", "compressed", torch.bfloat16, None),
    ("gguf f16", "gguf", torch.float32, "f16"),
    ("gguf q8_0", "gguf", torch.float32, "q8_0"),
)
_MEASURED = ("dense fp32", "compressed fp32", "gguf f16", "gguf q8_0")  # perplexity and load time


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files alone (safetensors or GGUF; not masks, tokenizer or card)."""
    files = [*folder.glob("model*.safetensors"), folder / WEIGHTS_NAME, *folder.glob("*.gguf")]
    return sum(f.stat().st_size for f in files if f.is_file())


def run_variant(a: argparse.Namespace, method: str, sparsity: str | None, results: dict) -> None:
    tag = "dense" if sparsity is None else f"{method} {sparsity}"
    if tag in results:
        return
    _, ev = load_data(a.data)
    if sparsity is None:
        model, tok = llmprune.load_model(a.model)
    else:
        model, _result, _ = prune_fixed(a.model, a.data, method, sparsity, {})
        tok = llmprune.load_model(a.model)[1]
    source = {k: v.clone() for k, v in model.state_dict().items()}
    rec: dict = {"source_ppl": window_perplexity(model, ev), "exports": {}}
    root = a.out / tag.replace(" ", "-").replace(":", "of")
    for label, fmt, dtype, gguf_type in EXPORTS:
        folder = root / label.replace(" ", "-")
        if folder.exists():
            shutil.rmtree(folder)
        model.to(dtype)
        llmprune.save_pruned(model, tok, folder, format=fmt, gguf_type=gguf_type or "f16", save_masks=False)
        model.to(torch.float32)
        entry = {"bytes": weights_bytes(folder)}
        if label in _MEASURED:
            start = time.perf_counter()
            loaded, _ = llmprune.load_model(str(folder), device="cpu")
            entry["load_s"] = time.perf_counter() - start
            if fmt == "gguf":
                entry["ppl"] = window_perplexity(loaded, ev)
            else:  # lossless: bit-identical weights give the source's perplexity, no need to re-run it
                state = loaded.state_dict()
                entry["bit_identical"] = all(torch.equal(source[k], state[k]) for k in source)
            del loaded
        rec["exports"][label] = entry
        print(tag, label, entry, flush=True)
    results[tag] = rec
    save_json(a.out / "formats.json", results)


_PEAK_RSS = (  # one short forward after loading, so lazily mapped weights are resident too
    "import resource, sys, torch, llmprune; m, _ = llmprune.load_model(sys.argv[1], device='cpu'); "
    "m(torch.tensor([[1, 2, 3]])); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
)


def load_peak_rss(a: argparse.Namespace, results: dict) -> None:
    """Peak RSS (MiB) of loading each Wanda 50 % folder in a fresh process: compressed decodes tensor by
    tensor, so it should need about what the dense load needs."""
    rec = results.get("wanda 0.5")
    if rec is None or "peak_rss_mib" in rec:
        return
    root = a.out / "wanda-0.5"
    rec["peak_rss_mib"] = {}
    for label in ("dense fp32", "compressed fp32", "gguf q8_0"):
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(root / label.replace(" ", "-"))],
            capture_output=True,
            text=True,
            check=True,
        )
        rec["peak_rss_mib"][label] = float(proc.stdout.strip().splitlines()[-1])
    save_json(a.out / "formats.json", results)


def report(a: argparse.Namespace, results: dict) -> str:
    calib, ev = load_data(a.data)
    lines = [
        f"Embedded SmolLM2-135M-Instruct, pruned with Wanda on {list(calib.shape)} calibration tokens; "
        f"perplexity on {list(ev.shape)} held-out windows of the built-in evaluation text (a small "
        f"sample: the machine is shared), torch threads {a.threads}, under `nice -n 10`. Size = bytes of "
        "the weight files (no masks, tokenizer or card) as a ratio to the dense checkpoint of the same "
        "dtype (GGUF f16 and q8_0: to dense bf16, the 16-bit checkpoint). Load = one "
        "`llmprune.load_model` into float32, as a ratio to the dense fp32 folder of the same model "
        "(GGUF is dequantized by transformers). Lossless reloads are compared bit for bit with the model in "
        "memory, so their perplexity is the in-memory one; GGUF perplexity is measured.",
        "",
        "| model | format | MiB | size ratio | load ratio | ppl | bit-identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag, rec in results.items():
        ex = rec["exports"]
        base_load = ex["dense fp32"].get("load_s")
        for label, entry in ex.items():
            ref = ex["dense bf16" if ("bf16" in label or "gguf" in label) else "dense fp32"]["bytes"]
            load = entry.get("load_s")
            ratio = f"{load / base_load:.2f}" if load and base_load else "–"
            ppl = f"{entry['ppl']:.3f}" if "ppl" in entry else "–"
            if entry.get("bit_identical"):
                ppl = f"{rec['source_ppl']:.3f} (same bits)"
            same = {True: "yes", False: "NO"}.get(entry.get("bit_identical"), "–")
            lines.append(
                f"| {tag} | {label} | {entry['bytes'] / 2**20:.1f} | {entry['bytes'] / ref:.3f} | "
                f"{ratio} | {ppl} | {same} |"
            )
        lines.append(f"| {tag} | (in memory, before saving) | | | | {rec['source_ppl']:.3f} | |")
    w50 = (results.get("wanda 0.5") or {}).get("exports")
    if w50:
        q8 = w50["gguf q8_0"]["ppl"] / results["wanda 0.5"]["source_ppl"] - 1
        fp32 = w50["compressed fp32"]["bytes"] / w50["dense fp32"]["bytes"]
        bf16 = w50["compressed bf16"]["bytes"] / w50["dense bf16"]["bytes"]
        lines += [
            "",
            f"Targets (Wanda 50 %): compressed = {fp32:.3f}x (fp32) and {bf16:.3f}x (bf16) the bytes of "
            f"the dense checkpoint (target <= 0.66x), reloaded bit-identical: "
            f"{'yes' if w50['compressed fp32'].get('bit_identical') else 'NO'}; GGUF q8_0 perplexity "
            f"{q8:+.2%} from the source (target within 3 %).",
            "",
            "Load times were taken on a machine shared with five other jobs (load average above 10), so only "
            "their order of magnitude means something: compressed pays for SHA-256 checks and decoding "
            "(a few times a dense load); transformers' GGUF loader dequantizes in Python (tens of times).",
        ]
    rss = (results.get("wanda 0.5") or {}).get("peak_rss_mib")
    if rss:
        lines += [
            "",
            "Peak RSS of one `llmprune.load_model` and a 3-token forward in a fresh process, Wanda 50 %: "
            + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items())
            + " (the GGUF load dequantizes through transformers).",
        ]
    lines += [
        "",
        "Reproduce: `nice -n 10 python scripts/bench_formats.py --threads 1` "
        f"(calibration {calib.shape[0]}×{calib.shape[1]}, eval {ev.shape[0]}×{ev.shape[1]}).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("bench_out/formats"))
    p.add_argument("--data", type=Path, default=Path("bench_out/formats/data"))
    p.add_argument("--num_calibration_samples", type=int, default=16)
    p.add_argument("--eval_windows", type=int, default=16)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report_only", action="store_true", help="render the saved results, measure nothing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    _, tok = llmprune.load_model(a.model)
    make_data(a.data, tok, a.num_calibration_samples, a.max_seq_length, a.eval_windows)
    path = a.out / "formats.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not a.report_only:
        for method, sparsity in VARIANTS:
            run_variant(a, method, sparsity, results)
        load_peak_rss(a, results)
    write_section("formats", report(a, results))


if __name__ == "__main__":
    main()
