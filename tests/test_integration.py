"""End to end on the embedded SmolLM2-135M: the CLI prunes, evaluates, saves; plain transformers reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_cli_prunes_embedded_model_and_checkpoint_reloads(tmp_path):
    out = tmp_path / "smollm2-wanda-2of4"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "llmprune",
        "prune",
        "--method",
        "wanda",
        "--sparsity",
        "2:4",
        "--num_calibration_samples",
        "4",
        "--max_seq_length",
        "128",
        "--eval_limit",
        "4",
        "--output_dir",
        str(out),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    dense, pruned = summary["perplexity"]["dense"]["ppl"], summary["perplexity"]["pruned"]["ppl"]
    assert 5 < dense < 200, dense  # SmolLM2-135M on Austen at 128 tokens
    assert dense < pruned < 50 * dense
    # >= 0.5: the dequantized Q4_1 weights already hold a few exact zeros beside the pruned ones
    assert 0.5 <= summary["achieved_sparsity"] < 0.5 + 1e-4

    # the checkpoint loads with plain transformers, in a process that never imports llmprune
    check = (
        "import sys, torch, json\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert 'llmprune' not in sys.modules\n"
        "bad = 0\n"
        "for name, mod in m.named_modules():\n"
        "    if isinstance(mod, torch.nn.Linear) and '.layers.' in name:\n"
        "        g = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)\n"
        "        bad += int((g > 2).sum())\n"
        "print(json.dumps({'bad': bad}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(proc.stdout.strip().splitlines()[-1])
    assert verdict == {"bad": 0}  # no 2:4 group keeps more than 2 (embeddings: see test_engine)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in json.dumps(config)
