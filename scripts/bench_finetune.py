"""Fine-tuning a pruned SmolLM2 three ways with its zeros kept, and gradual pruning against one-shot.

    flock /work/wt/timed.lock python scripts/bench_finetune.py --steps 40 --max_seconds 300 --batch_size 2 \
        --threads 2

SmolLM2-135M is pruned once to 50 % with SparseGPT (``--num_calibration_samples`` × ``--max_seq_length``
tokens of the built-in calibration text) and cached. Each arm then runs in a fresh process (so its peak
RSS is its own) for the same budget, ``--steps`` optimiser steps or ``--max_seconds`` of training,
whichever comes first, on 256-token windows of the built-in calibration text, batch ``--batch_size``,
next-token loss for every arm:

* ``trainer``: full fine-tune with ``transformers.Trainer`` + ``llmprune.KeepSparsityCallback`` (AdamW,
  lr 5e-5 constant, Trainer's defaults otherwise: weight decay 0, clipping at 1.0);
* ``lora``: peft LoRA (r 16, alpha 32, every block Linear) with Trainer, lr 1e-3, then
  ``llmprune.merge_adapter``; perplexity is scored with the adapter unmerged too;
* ``perp``: ``llmprune.recovery.recover(method="perp", distill=0)`` with its defaults (lr 3e-3);
* ``gradual``: the dense model trained with ``llmprune.GradualPruningCallback(0.5, method="wanda")`` for
  as many steps as the ``trainer`` arm made (ramp over the first two thirds), against one-shot + the
  ``trainer`` arm.

Held-out perplexity on ``--eval_windows`` windows of the built-in evaluation text before and after,
exact sparsity after (every pruned weight ``+0.0``, sign bit included), peak RSS and seconds per step.
Learning rates are the usual defaults of each tool, not tuned on these numbers. Results go to
bench_out/finetune/*.json and the ``finetune`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import prune_on_windows, save_json, write_section  # noqa: E402

WORK = Path("bench_out/finetune")


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


@torch.no_grad()
def held_out_ppl(model, ev: torch.Tensor) -> float:
    model.eval()
    nll, count = 0.0, 0
    for x in ev:
        logits = model(x.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
        count += x.shape[0] - 1
    return math.exp(nll / count)


@torch.no_grad()
def exact_sparsity(model, keep: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(zeros / weights over the masked Linears, pruned entries that are not +0.0)."""
    zeros = total = bad = 0
    for name, k in keep.items():
        w = model.get_submodule(name).weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
        pruned = w[~k]
        bad += int(((pruned != 0) | torch.signbit(pruned)).sum())
    return zeros / total, bad


def data(a, tok) -> None:
    from llmprune.calibration.data import calibration_tokens
    from llmprune.evaluation.perplexity import eval_windows

    if not (WORK / "data.pt").exists():
        blob = {
            "calib": calibration_tokens(None, tok, a.num_calibration_samples, a.max_seq_length, seed=0),
            "train": calibration_tokens(None, tok, a.train_windows, 256, seed=1),
            "eval": eval_windows(tok, None, 512, limit=a.eval_windows),
        }
        torch.save(blob, WORK / "data.pt")


def prune_arm(a) -> dict:
    import llmprune

    model, tok = llmprune.load_model(a.model)
    blob = torch.load(WORK / "data.pt")
    dense_ppl = held_out_ppl(model, blob["eval"])
    result, prune_s = prune_on_windows(model, tok, blob["calib"], "sparsegpt", "0.5", {})
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in result.keep_masks}
    torch.save({"weights": weights, "keep": result.keep_masks}, WORK / "pruned.pt")
    return {"dense_ppl": dense_ppl, "pruned_ppl": held_out_ppl(model, blob["eval"]), "prune_s": prune_s}


def _pruned_model(a):
    import llmprune

    model, tok = llmprune.load_model(a.model)
    cache = torch.load(WORK / "pruned.pt")
    with torch.no_grad():
        for name, w in cache["weights"].items():
            model.get_submodule(name).weight.copy_(w)
    return model, tok, cache["keep"]


class _TimeBudget:
    """Stop Trainer after ``seconds`` of training (checked after each step)."""

    def __new__(cls, seconds: float):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if time.perf_counter() - self.start >= seconds:
                    control.should_training_stop = True

        return Stop()


def _train(model, train_ids, lr: float, callbacks, max_steps: int, batch_size: int) -> tuple[int, float]:
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": x, "labels": x} for x in train_ids]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant",
            max_steps=max_steps,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
        start = time.perf_counter()
        trainer.train()
        return trainer.state.global_step, time.perf_counter() - start


def _scored(model, keep, ev, steps: int, seconds: float, **extra) -> dict:
    """One arm's record: held-out perplexity, exact sparsity, steps, time, peak RSS."""
    sparsity, bad = exact_sparsity(model, keep)
    return {
        "ppl": held_out_ppl(model, ev), "steps": steps, "train_s": seconds, "sparsity": sparsity,
        "nonzero_pruned": bad, "peak_rss_mib": _peak_rss_mib(), **extra,
    }  # fmt: skip


def trainer_arm(a) -> dict:
    import llmprune

    model, _, keep = _pruned_model(a)
    blob = torch.load(WORK / "data.pt")
    keeper = llmprune.KeepSparsityCallback(keep)
    budget = [keeper, _TimeBudget(a.max_seconds)]
    steps, secs = _train(model, blob["train"], 5e-5, budget, a.steps, a.batch_size)
    return _scored(model, keep, blob["eval"], steps, secs, report=keeper.report)


def lora_arm(a) -> dict:
    from peft import LoraConfig, get_peft_model

    import llmprune

    model, _, keep = _pruned_model(a)
    blob = torch.load(WORK / "data.pt")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, config)
    steps, secs = _train(peft_model, blob["train"], 1e-3, [_TimeBudget(a.max_seconds)], a.steps, a.batch_size)
    adapter_ppl = held_out_ppl(peft_model, blob["eval"])
    merged, report = llmprune.merge_adapter(peft_model, keep, return_report=True)
    extra = {"adapter_ppl": adapter_ppl, "dropped_fraction": report.dropped_fraction}
    return _scored(merged, keep, blob["eval"], steps, secs, **extra)


def perp_arm(a) -> dict:
    from llmprune.recovery import recover

    model, _, keep = _pruned_model(a)
    blob = torch.load(WORK / "data.pt")
    res = recover(
        model, input_ids=blob["train"], method="perp", keep_masks=keep, steps=a.steps,
        max_seconds=a.max_seconds, batch_size=a.batch_size, distill=0.0,
    )  # fmt: skip
    return _scored(model, keep, blob["eval"], res.steps_done, res.seconds)


def gradual_arm(a) -> dict:
    import llmprune

    model, _ = llmprune.load_model(a.model)
    blob = torch.load(WORK / "data.pt")
    steps = json.loads((WORK / "trainer.json").read_text())["steps"]
    cb = llmprune.GradualPruningCallback(sparsity=0.5, method="wanda")
    done, secs = _train(model, blob["train"], 5e-5, [cb], steps, a.batch_size)
    return _scored(model, cb.pruner.keep_masks, blob["eval"], done, secs, schedule=cb.pruner.history)


def overhead_arm(a) -> dict:
    """Seconds per AdamW step with and without keep_sparsity, interleaved in one process (a ratio)."""
    import statistics

    import llmprune

    model, _, keep = _pruned_model(a)
    ids = torch.load(WORK / "data.pt")["train"][:1]  # one window: the hooks' cost is per weight, not token
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    step()  # warm-up: AdamW state, allocator
    plain, held = [], []
    for _ in range(a.overhead_rounds):
        plain.append(step())
        with llmprune.keep_sparsity(model, keep, apply=True):
            held.append(step())
    return {"plain_s": statistics.median(plain), "held_s": statistics.median(held), "rounds": len(plain)}


ARMS = {
    "overhead": overhead_arm,
    "prune": prune_arm,
    "trainer": trainer_arm,
    "lora": lora_arm,
    "perp": perp_arm,
    "gradual": gradual_arm,
}


def table(r: dict, a) -> str:
    p = r["prune"]
    lines = [
        f"`scripts/bench_finetune.py --steps {a.steps} --max_seconds {a.max_seconds:g} "
        f"--batch_size {a.batch_size} --threads {a.threads}` "
        f"({a.conditions}): "
        f"SmolLM2-135M, SparseGPT 50 % on {a.num_calibration_samples} × {a.max_seq_length} calibration "
        f"tokens, then per arm {a.steps} optimiser steps or {a.max_seconds:g} s of training, whichever came "
        f"first, on {a.train_windows} windows of 256 tokens of the built-in calibration text, batch "
        f"{a.batch_size}, next-token "
        f"loss, {a.threads} thread(s). Held-out perplexity on {a.eval_windows} × 512 tokens of the built-in "
        f"evaluation text: dense {p['dense_ppl']:.2f}, pruned {p['pruned_ppl']:.2f}. Sparsity = exact zeros "
        "over the 210 pruned Linears after training; 'pruned ≠ +0.0' counts pruned entries that are nonzero "
        "or -0.0. Peak RSS is each arm's own process (model load included).",
        "",
        "| arm | ppl before | ppl after | sparsity after | pruned ≠ +0.0 | steps | s/step | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "trainer": "SparseGPT 50 % + Trainer full fine-tune + KeepSparsityCallback (lr 5e-5)",
        "lora": "SparseGPT 50 % + peft LoRA r16 (lr 1e-3) + merge_adapter",
        "perp": "SparseGPT 50 % + llmprune PERP (lr 3e-3, LM loss)",
        "gradual": "dense + Trainer + GradualPruningCallback(0.5, wanda), same steps as the Trainer arm",
    }
    for arm, label in names.items():
        x = r.get(arm)
        if x is None:
            continue
        if "error" in x:
            lines.append(f"| {label} | FAILED: {x['error'][:80]} | | | | | | |")
            continue
        before = p["dense_ppl"] if arm == "gradual" else p["pruned_ppl"]
        lines.append(
            f"| {label} | {before:.2f} | {x['ppl']:.2f} | {x['sparsity']:.4f} | {x['nonzero_pruned']} | "
            f"{x['steps']} | {x['train_s'] / max(1, x['steps']):.2f} | {x['peak_rss_mib']:.0f} MiB |"
        )
    ok = {k: v for k, v in r.items() if "error" not in v}
    notes = []
    if "lora" in ok:
        x = ok["lora"]
        notes.append(
            "LoRA before the merge (adapter unmerged, dense effective weights): "
            f"ppl {x['adapter_ppl']:.2f}; "
            f"merge_adapter dropped {100 * x['dropped_fraction']:.0f} % of the update's norm (the part on "
            f"pruned weights), giving {x['ppl']:.2f} merged with every zero kept."
        )
    if "overhead" in ok:
        x = ok["overhead"]
        notes.append(
            f"Cost of keep_sparsity on a full AdamW step (batch 1 × 256, medians of {x['rounds']} "
            "interleaved "
            f"steps with and without it, one process): {x['plain_s']:.2f} s → {x['held_s']:.2f} s "
            f"({100 * (x['held_s'] / x['plain_s'] - 1):+.0f} %)."
        )
    if "trainer" in ok:
        rep = ok["trainer"]["report"]
        notes.append(
            f"KeepSparsityCallback report: {rep['gradient_entries_blocked']} pruned weights received a "
            "nonzero gradient (each would have left zero without it), "
            f"{rep['rezeroed_after_steps']} were moved by "
            f"an optimiser step and put back, {rep['nonzero_pruned_weights']} nonzero at the end."
        )
    for note in notes:
        lines += ["", note]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per arm")
    p.add_argument("--max_seconds", type=float, default=300.0, help="training seconds per arm, at most")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num_calibration_samples", type=int, default=16)
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--train_windows", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=16)
    p.add_argument("--arms", default="trainer,lora,perp,gradual,overhead")
    p.add_argument("--overhead_rounds", type=int, default=5)
    p.add_argument("--section", default="finetune")
    p.add_argument(
        "--conditions",
        default="arms one after another, each in its own process, alone under the timed lock",
        help="how the machine was shared, for the table's header",
    )
    p.add_argument("--one", choices=sorted(ARMS), help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    if a.one:
        torch.manual_seed(0)
        print(json.dumps(ARMS[a.one](a)))
        return

    import llmprune

    _, tok = llmprune.load_model(a.model)
    data(a, tok)
    results = {}
    base = [sys.executable, __file__] + [f"--{k}={v}" for k, v in vars(a).items() if k not in ("one", "arms")]
    for arm in ["prune", *a.arms.split(",")]:
        path = WORK / f"{arm}.json"
        if not path.exists():
            print(f"running {arm} …", file=sys.stderr, flush=True)
            proc = subprocess.run([*base, f"--one={arm}"], capture_output=True, text=True)
            if proc.returncode != 0:
                results[arm] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            save_json(path, json.loads(proc.stdout.strip().splitlines()[-1]))
        results[arm] = json.loads(path.read_text())
        print(f"  {arm}: {results[arm]}", file=sys.stderr, flush=True)
    body = table(results, a)
    write_section(a.section, body)
    print(body)


if __name__ == "__main__":
    main()
