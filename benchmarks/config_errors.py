"""Time to a config error: `align train <bad value>` as a user runs it (a fresh interpreter each).

Each bad value must be refused in one line with exit code 2 before torch is imported (target: under
2 s; before the two-phase validation it took 14–25 s, because torch and diffusers were imported
first). The table gives, per override, the median wall time of ``--repeats`` runs, the exit code,
the number of stderr lines, and whether torch was imported by then (rollouts and rewards in-process,
so that a value an old revision accepts trains without Ray until ``--limit-s`` ends it: 'accepted').
``--rev REV`` also times the same commands on another git revision (extracted with ``git archive``
into a temp dir), side by side.

    python benchmarks/config_errors.py [--repeats 3] [--rev d95855b]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAD = [
    "trainer.lr=-1",
    "trainer.clip_range=-1",
    "trainer.epochs=0",
    "critic.pretrain_epochs=0",
    "trainer.minibatch_size=0",
    "lora.rank=0",
    "critic.rank=0",
    "rewards=[{name: toy_geneval, weight: nan}]",
    "sampler.eta=0",
    "trainer.iterations=0",
    "model.source=/no/such/dir",
]
PROBE = (
    "import sys, runpy\nsys.argv = ['align', 'train', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('align.cli', run_name='__main__')\n"
    "except SystemExit as e:\n    print('torch' in sys.modules, file=sys.stderr); raise\n"
)


def run_once(root: Path, override: str, cwd: Path, limit_s: float) -> tuple[float, object, int, str]:
    """(seconds, exit code or 'accepted' if it ran past ``limit_s``, stderr lines, torch imported)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": "1",
        "RAY_ADDRESS": "",
        "RAY_DISABLE_USAGE_STATS": "1",
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, override, "ray.num_rollout_workers=0", "ray.num_reward_workers=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:  # the value was accepted and training started: end it (its whole group)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return time.perf_counter() - start, "accepted", 0, "True"
    lines = err.strip().splitlines()
    flag = lines.pop() if lines and lines[-1] in ("True", "False") else "?"  # '?': it died of a traceback
    return time.perf_counter() - start, proc.returncode, len(lines), flag


def measure(root: Path, repeats: int, cwd: Path, limit_s: float) -> dict[str, tuple]:
    out = {}
    for override in BAD:
        runs = [run_once(root, override, cwd, limit_s) for _ in range(repeats)]
        out[override] = (statistics.median(r[0] for r in runs), *runs[-1][1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rev", default=None, help="also time this git revision (side by side)")
    parser.add_argument("--limit-s", type=float, default=60.0, help="a run still going after this accepted the value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp) / "cwd"
        cwd.mkdir()
        tables = {"this tree": measure(ROOT, args.repeats, cwd, args.limit_s)}
        if args.rev:  # at an old revision an accepted value starts training; --limit-s ends it
            old = Path(tmp) / "rev"
            old.mkdir()
            subprocess.run(f"git -C {ROOT} archive {args.rev} | tar -x -C {old}", shell=True, check=True)
            tables[args.rev] = measure(old, args.repeats, cwd, args.limit_s)
    header = f"{'override':<28}" + "".join(f" | {name:>10} s  rc lines torch" for name in tables)
    print(header)
    print("-" * len(header))
    for override in BAD:
        row = f"{override:<28}"
        for table in tables.values():
            seconds, rc, lines, torch_loaded = table[override]
            row += f" | {seconds:>12.2f} {rc!s:>3} {lines:>5} {torch_loaded:>5}"
        print(row)


if __name__ == "__main__":
    main()
