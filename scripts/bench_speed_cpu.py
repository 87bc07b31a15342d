"""CPU seconds of ``prune()`` per method and of one dense forward, for the llmprune on PYTHONPATH.

    PYTHONPATH=. nice -n 10 python scripts/bench_speed_cpu.py bench_out/speed_cpu.json

A load-robust companion to ``bench_speed.py`` for a shared machine: a single-threaded run's CPU time
(``time.process_time``) barely depends on how many other processes share the cores, where its wall
time does. Run it for two trees side by side to compare them (docs/benchmarks.md, "Speed after the
architecture step"). SmolLM2-135M, sparsity 0.5, calibration 8×256 tokens, 3 repeats, a fresh model
per repeat, torch threads 1.
"""

import json
import sys
import time

import torch

import llmprune
from llmprune.calibration.data import calibration_tokens

torch.set_num_threads(1)
out = {}
model, tok = llmprune.load_model("smollm2-135m")
calib = calibration_tokens(None, tok, 8, 256, seed=0)
for method in ("magnitude", "wanda", "sparsegpt"):
    rows = []
    for _ in range(3):
        model, _ = llmprune.load_model("smollm2-135m")
        with torch.no_grad():
            t0 = time.process_time()
            model(calib)
            dense = time.process_time() - t0
        t0 = time.process_time()
        llmprune.prune(
            model,
            tok,
            method=method,
            sparsity=0.5,
            dataset=calib,
            progress=False,
            num_calibration_samples=8,
            max_seq_length=256,
        )
        rows.append({"prune_cpu_s": time.process_time() - t0, "dense_cpu_s": dense})
    out[method] = rows
    print(method, rows, file=sys.stderr, flush=True)
with open(sys.argv[1], "w") as fh:
    json.dump(out, fh, indent=1)
