"""Peak resident memory of end-to-end recovery against model size, and what each memory lever buys.

    python scripts/bench_recovery_memory.py run          # every job in its own process (nice, no lock)
    python scripts/bench_recovery_memory.py report       # the recovery-memory section of docs/benchmarks.md

Each job builds a model (three Llama configs with SmolLM2's vocabulary at growing width and depth, or
SmolLM2-135M itself), prunes every block Linear to 50 % by magnitude and runs ``STEPS`` PERP steps of
4 × 256 tokens distilling from the dense model. Settings compared:

* ``previous``: a live dense teacher (a copy kept before pruning), float32, no checkpointing;
* ``default``: the dense model's top-64 targets computed *before* pruning (no copy at all), bfloat16
  autocast, one checkpoint per decoder block (today's ``recover()`` defaults);
* ablations on SmolLM2 only: one lever of ``default`` undone at a time.

Peak RSS is the process's high-water mark (``ru_maxrss``), model build included; "before training" is
the RSS with the pruned model and the targets in memory. Seconds per step are a median of the steps
after the first, at nice 19 on a shared machine: read them as ratios between rows, not as timings.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import save_json, write_section  # noqa: E402

WORK = Path("bench_out/recovery_memory")
STEPS = 4
#: name -> (hidden, layers, intermediate, heads, kv heads); SmolLM2's vocabulary (49,152) for all
SIZES = {
    "llama-s": (256, 6, 768, 4, 2),
    "llama-m": (384, 12, 1024, 6, 2),
    "llama-l": (512, 20, 1536, 8, 4),
    "smollm2": None,
}
SETTINGS = {
    "previous": {"teacher": "live", "precision": "float32", "gradient_checkpointing": False},
    "default": {"teacher": "topk", "precision": "auto", "gradient_checkpointing": True},
    "topk+fp32+no ckpt": {"teacher": "topk", "precision": "float32", "gradient_checkpointing": False},
    "topk+bf16+no ckpt": {"teacher": "topk", "precision": "auto", "gradient_checkpointing": False},
    "topk+fp32+ckpt": {"teacher": "topk", "precision": "float32", "gradient_checkpointing": True},
    "live+bf16+ckpt": {"teacher": "live", "precision": "auto", "gradient_checkpointing": True},
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmprune

    if SIZES[size] is None:
        return llmprune.load_model("smollm2-135m")[0]
    hidden, layers, inter, heads, kv = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _magnitude_50(model) -> dict[str, torch.Tensor]:
    from llmprune.recovery.masking import block_linears, weight_2d

    keep = {}
    for name, m in block_linears(model).items():
        w = weight_2d(m)
        thr = w.abs().flatten().kthvalue(w.numel() // 2).values
        keep[name] = w.abs() > thr
        m.weight.masked_fill_(~(keep[name].t() if w is not m.weight else keep[name]), 0.0)
    return keep


def job(size: str, setting: str, threads: int) -> None:
    import copy

    from llmprune.recovery import recover
    from llmprune.recovery.precision import autocast
    from llmprune.recovery.teacher import topk_targets

    torch.set_num_threads(threads)
    s = SETTINGS[setting]
    model = _model(size)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (16, 256), generator=gen)
    if size == "smollm2":  # real text for the real model
        from bench_common import load_data

        calib = load_data(Path("bench_out/data"))[0]
        ids = torch.cat([calib[:, :256], calib[:, 256:]])[:16]
    teacher, targets = None, None
    if s["teacher"] == "live":
        teacher = copy.deepcopy(model)
    else:
        with autocast(s["precision"], torch.device("cpu")):
            targets = topk_targets(model, ids, 64, 4)
    keep = _magnitude_50(model)
    before = _rss_mib()
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, m) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    info = recover(
        model, input_ids=ids, keep_masks=keep, dense_model=teacher, teacher_targets=targets, steps=STEPS,
        batch_size=4, callback=tick, precision=s["precision"],
        gradient_checkpointing=s["gradient_checkpointing"],
    )  # fmt: skip
    row = {"size": size, "setting": setting, "params": params, "threads": threads, **s}
    row.update(rss_before_mib=before, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    row.update(s_per_step=statistics.median(times[1:]), precision_used=info.options["precision"])
    save_json(WORK / f"{size}_{setting.replace(' ', '_').replace('+', '-')}.json", row)
    print(json.dumps(row), flush=True)


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(WORK.glob("*.json"))]
    order = {s: i for i, s in enumerate(SIZES)}
    rows.sort(key=lambda r: (order[r["size"]], list(SETTINGS).index(r["setting"])))
    lines = [
        "| model | parameters | setting | teacher | precision | checkpointing | RSS before training "
        "| peak RSS | peak / fp32 weights | s/step (ratio only) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        weights = r["params"] * 4 / 2**20
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f} M | {r['setting']} | {r['teacher']} "
            f"| {r['precision_used']} "
            f"| {'yes' if r['gradient_checkpointing'] else 'no'} | {r['rss_before_mib']:.0f} MiB "
            f"| {r['peak_rss_mib']:.0f} MiB | {r['peak_rss_mib'] / weights:.1f}× | {r['s_per_step']:.2f} |"
        )
    text = (
        "`scripts/bench_recovery_memory.py` (PERP, 50 % magnitude, batch 4 × 256 tokens, "
        f"{STEPS} steps, one process per row, nice 19; peak RSS is the whole process's, model build "
        "included).\n\n" + "\n".join(lines)
    )
    write_section("recovery-memory", text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "job"])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--settings", default="previous,default")
    p.add_argument("--ablations", action="store_true", help="also every ablation on smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if a.command == "job":
        size, setting = a.job.split("|")
        job(size, setting, a.threads)
    elif a.command == "report":
        report()
    else:
        jobs = [(z, s) for z in a.sizes.split(",") for s in a.settings.split(",")]
        if a.ablations:
            jobs += [("smollm2", s) for s in SETTINGS if s not in a.settings.split(",")]
        for size, setting in jobs:
            subprocess.call(
                [sys.executable, __file__, "job", "--threads", str(a.threads), "--job", f"{size}|{setting}"]
            )


if __name__ == "__main__":
    main()
