"""The trl 0.21 virtualenv of ``benchmarks/vs_trl_ddpo.py`` (TRL's last DDPO line beside a recent diffusers).

The project needs trl >= 1, which has no diffusion trainers, so TRL's ``DDPOTrainer`` runs in a venv of
its own, created once under a cache directory and reused (a ``.complete`` marker with the pins is written
last, so a killed install is redone). torch comes from the local wheel index (pip's configured
``find-links``/``extra-index-url``); the rest from PyPI. The pins are the set known to import together
(measured on this machine kind; docs/benchmarks.md, "Ours vs TRL's DDPOTrainer").

    python benchmarks/trl_venv.py [--venv DIR]     # create it (or report that it exists) and time it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("ALIGN_BENCH_CACHE", Path.home() / ".cache" / "align-bench")) / "trl021"
#: what the venv holds; torch/torchvision as in the project's own env (the pair that imports on CPU)
PINS = (
    "trl==0.21.0",
    "diffusers==0.35.1",
    "transformers==4.55.4",
    "peft==0.17.1",
    "accelerate==1.10.1",
    "datasets==4.0.0",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "pillow",
)
MARKER = ".complete"


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def is_complete(venv: Path, pins: tuple[str, ...] = PINS) -> bool:
    """True when ``venv`` finished installing exactly ``pins``."""
    marker = Path(venv) / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("pins") == list(pins)


def ensure_venv(venv: Path = DEFAULT_VENV, pins: tuple[str, ...] = PINS, log=print) -> dict:
    """Create (or reuse) the trl venv; returns ``{"python", "created", "seconds"}`` (seconds of this call)."""
    venv = Path(venv).expanduser()
    start = time.perf_counter()
    if is_complete(venv, pins):
        return {"python": str(venv_python(venv)), "created": False, "seconds": time.perf_counter() - start}
    log(f"creating the trl venv {venv} ({' '.join(pins)}); a few minutes, once")
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q", *pins], check=True)
    subprocess.run(
        [str(venv_python(venv)), "-c", "import trl, diffusers, peft; from trl import DDPOTrainer"], check=True
    )
    seconds = time.perf_counter() - start
    (venv / MARKER).write_text(json.dumps({"pins": list(pins), "seconds": seconds}))
    return {"python": str(venv_python(venv)), "created": True, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    info = ensure_venv(ap.parse_args().venv)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
