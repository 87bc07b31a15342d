"""How long the commands a new user types first take with their defaults, on this machine.

Runs, as subprocesses, a bare ``llmprune prune`` on the embedded model (Wanda 50 %, defaults sized to
the machine) and ``llmprune prune --max_seq_length 256`` with default evaluation, and records wall time,
the CPU time of the process, and what the run announced before its long stages. Writes the
``first-run`` section of docs/benchmarks.md. The machine is shared: the CPU time is the steadier figure,
and the load average is written beside each row.

    nice -n 10 python scripts/bench_first_run.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_section  # noqa: E402

COMMANDS = {
    "llmprune prune": [],
    "llmprune prune --max_seq_length 256": ["--max_seq_length", "256"],
}


def run(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = [sys.executable, "-m", "llmprune", "prune", "--output_dir", str(out), *extra]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    announced = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if "llmprune.estimate" in line]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load, "announced": announced}


def main() -> None:
    rows = [
        "| command (defaults, --output_dir) | wall | CPU time | load average at start | announced |",
        "|---|---|---|---|---|",
    ]
    for name, extra in COMMANDS.items():
        r = run(extra)
        said = "; ".join(r["announced"])
        rows.append(
            f"| `{name}` | {r['wall'] / 60:.1f} min | {r['cpu'] / 60:.1f} min | {r['load']:.1f} | {said} |"
        )
        print(rows[-1], flush=True)
    body = (
        "## First run: the defaults a new user gets\n\n"
        + "\n".join(rows)
        + (
            "\n\nMeasured with `python scripts/bench_first_run.py` on the 2-core machine (its load "
            "average at the start of each command is in the table); "
            "the issue's target is under 15 minutes for the bare command and under 20 with "
            "`--max_seq_length 256`.\n"
        )
    )
    write_section("first-run", body)


if __name__ == "__main__":
    main()
