"""Scale: peak memory of in-memory vs streaming pruning against model size, and 1 vs 2 processes.

    python scripts/bench_scale.py                                  # both parts, default sizes
    python scripts/bench_scale.py --layers 4,8,16 --skip_speed     # memory only
    python scripts/bench_scale.py --skip_memory --methods wanda    # processes only

Memory: random-weight Llama checkpoints (hidden 768, intermediate 2048, vocabulary 512) with more and
more blocks, pruned with Wanda 2:4 in a fresh process each, in memory (``load_model`` + ``prune``) and
streaming (``prune(streaming=True)``). Each process first prunes a tiny model (so imports and code paths are
warm), then resets the kernel's peak-RSS counter; the figure is the peak resident set above that
baseline, i.e. what the model itself costs.

Processes: the embedded model pruned with the built-in calibration text by 1 process with 1 thread,
1 process with 2 threads and 2 processes (gloo) with 1 thread each; wall time of ``prune`` only
(after a barrier), so process start-up and model loading are left out. The masks of the 2-process
run are checked bit-identical to the 1-process run. Results go to ``bench_out/scale.json`` and the
``scale`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import save_json, write_section  # noqa: E402

HIDDEN, INTER = 768, 2048


def _status() -> dict[str, int]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in lines if ln.endswith(" kB")}


def build_llama(path: Path, layers: int, hidden: int = HIDDEN, inter: int = INTER) -> int:
    """A random-weight Llama checkpoint (sharded, built once); returns its weight bytes."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["metadata"]["total_size"]
    if (path / "model.safetensors").exists():
        return (path / "model.safetensors").stat().st_size
    import torch
    import transformers
    from accelerate import init_empty_weights

    heads = hidden // 64
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    state = {
        n: torch.rand(p.shape, generator=g).sub_(0.5).mul_(0.05) if p.dim() > 1 else torch.ones(p.shape)
        for n, p in model.named_parameters()
    }
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    model.save_pretrained(path, max_shard_size="100MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_child(mode: str, model: str, tiny: str) -> dict:
    """One measurement in this (fresh) process: peak RSS above the warmed-up baseline."""
    import ctypes
    import gc

    import torch
    import transformers

    torch.set_num_threads(1)
    import llmprune

    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(1))
    kw = dict(method="wanda", sparsity="2:4", dataset=ids, num_calibration_samples=8, max_seq_length=128,
              batch_size=4, progress=False)  # fmt: skip

    def run(path: str, out: str) -> None:
        if mode == "streaming":
            llmprune.prune(path, streaming=True, output_dir=out, **kw)
        else:
            m = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            llmprune.prune(m, None, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        run(tiny, tmp + "/warm")
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS counter (Linux >= 4.0)
        base = _status()["VmRSS"]
        start = time.perf_counter()
        run(model, tmp + "/out")
        seconds = time.perf_counter() - start
    return {"base_rss": base, "peak_rss": _status()["VmHWM"], "seconds": seconds}


def _dist_worker(
    rank: int, world: int, threads: int, method: str, init: str, out: str, samples: int, seq: int
):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    import llmprune

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model, tok = llmprune.load_model("smollm2-135m")
    if world > 1:
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result = llmprune.prune(model, tok, method=method, sparsity=0.5, num_calibration_samples=samples,
                            max_seq_length=seq, batch_size=2, progress=False)  # fmt: skip
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, cpu)
        cpu = max(gathered)  # the busiest rank bounds the wall time on an idle machine
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"seconds": seconds, "cpu_seconds": cpu, "masks": result.keep_masks}, out)


def speed(method: str, world: int, threads: int, samples: int, seq: int) -> dict:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        args = (world, threads, method, os.path.join(tmp, "init"), out, samples, seq)
        mp.spawn(_dist_worker, args=args, nprocs=world, join=True)
        return torch.load(out)


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,8,16", help="model sizes, in decoder blocks")
    p.add_argument("--methods", default="wanda,sparsegpt", help="methods timed for 1 vs 2 processes")
    p.add_argument("--num_calibration_samples", type=int, default=16)
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("bench_out/scale"))
    p.add_argument("--out", type=Path, default=Path("bench_out/scale.json"))
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_speed", action="store_true")
    p.add_argument("--section", default="scale")
    p.add_argument("--memory_child", nargs=3, metavar=("MODE", "MODEL", "TINY"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(*a.memory_child)))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    if not a.skip_memory:
        tiny = a.work / "llama-tiny"
        build_llama(tiny, 2, 64, 128)
        memory = []
        for layers in (int(x) for x in a.layers.split(",")):
            path = a.work / f"llama-{layers}"
            nbytes = build_llama(path, layers)
            row = {"layers": layers, "weights_mib": nbytes / 2**20}
            for mode in ("in_memory", "streaming"):
                rec = _child(["--memory_child", mode, str(path), str(tiny)])
                row[mode] = rec
                if "error" not in rec:
                    rec["grown_mib"] = (rec["peak_rss"] - rec["base_rss"]) / 2**20
                print(layers, mode, rec, flush=True)
            memory.append(row)
        results["memory"] = memory
        save_json(a.out, results)
    if not a.skip_speed:
        import torch

        rows = []
        for method in a.methods.split(","):
            runs = {}
            for world, threads in ((1, 1), (1, 2), (2, 1)):
                runs[f"{world}x{threads}"] = speed(
                    method, world, threads, a.num_calibration_samples, a.max_seq_length
                )
                print(method, world, threads, runs[f"{world}x{threads}"]["seconds"], flush=True)
            one, two = runs["1x1"]["masks"], runs["2x1"]["masks"]
            same = one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
            rows.append(
                {
                    "method": method,
                    **{k: v["seconds"] for k, v in runs.items()},
                    "cpu_1x1": runs["1x1"]["cpu_seconds"],
                    "cpu_2x1": runs["2x1"]["cpu_seconds"],
                    "masks_identical": same,
                }
            )
        results["processes"] = {
            "rows": rows,
            "samples": a.num_calibration_samples,
            "seq": a.max_seq_length,
            "load_average": os.getloadavg()[0],  # other work on the machine skews wall times
            "cpus": os.cpu_count(),
        }
        save_json(a.out, results)
    write_section(a.section, _table(results))


def _table(results: dict) -> str:
    lines = []
    if "memory" in results:
        lines += [
            "Peak resident memory above a warmed-up process (Wanda 2:4, 8×128 calibration tokens; random",
            f"Llama, hidden {HIDDEN}, intermediate {INTER}; `scripts/bench_scale.py`):",
            "",
            "| blocks | weights (MiB) | in memory (MiB) | streaming (MiB) | in memory (s) | streaming (s) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["memory"]:
            mem, st = r["in_memory"], r["streaming"]
            lines.append(
                f"| {r['layers']} | {r['weights_mib']:.0f} | {mem.get('grown_mib', float('nan')):.0f} | "
                f"{st.get('grown_mib', float('nan')):.0f} | {mem.get('seconds', float('nan')):.1f} | "
                f"{st.get('seconds', float('nan')):.1f} |"
            )
        lines.append("")
    if "processes" in results:
        pr = results["processes"]
        lines += [
            f"Wall time of `prune` on smollm2-135m, {pr['samples']}×{pr['seq']} calibration tokens,",
            "batch size 2 (processes × threads each; 2 processes use gloo on this 2-core machine):",
            "",
            f"Load average at the end: {pr.get('load_average', float('nan')):.1f} on {pr.get('cpus')} CPUs; "
            "wall times are only comparable within a row.",
            "",
            "CPU time of the busiest rank does not depend on other load: its ratio to one process is what",
            "the wall-time ratio approaches on an idle machine.",
            "",
            "| method | 1×1 (s) | 1×2 (s) | 2×1 (s) | wall 2×1 / 1×1 | CPU busiest rank / 1×1 | same masks |",
            "|---|---:|---:|---:|---:|---:|:-:|",
        ]
        for r in pr["rows"]:
            cpu = r["cpu_2x1"] / r["cpu_1x1"] if "cpu_1x1" in r else float("nan")
            lines.append(
                f"| {r['method']} | {r['1x1']:.1f} | {r['1x2']:.1f} | {r['2x1']:.1f} | "
                f"{r['2x1'] / r['1x1']:.2f} | {cpu:.2f} | {'yes' if r['masks_identical'] else 'NO'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
