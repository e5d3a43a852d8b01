"""examples/reward_plugin end to end: ``pip install -e`` it into a throwaway virtualenv layered on this
one (never into the environment the tests run in), run its own tests, find it with
``align rewards list|check``, and train two iterations with it by name."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "reward_plugin"


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> str:
    """A throwaway virtualenv that sees this environment's packages (its site dirs, .pth files and
    so the project's editable install included) and holds the plugin's editable install itself; it
    is deleted with the test's temp dir, so nothing is installed into or removed from this one."""
    venv = tmp_path_factory.mktemp("plugin_venv")
    done = _run(sys.executable, "-m", "venv", str(venv))
    assert done.returncode == 0, done.stderr
    python = str(venv / "bin" / "python")
    own_site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    layered = "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages())
    Path(own_site, "zz_layered_on_parent.pth").write_text(layered)
    _run(python, "-m", "pip", "uninstall", "-y", "-q", "setuptools")  # use the parent's (the build needs >= 68)
    done = _run(
        python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(PLUGIN)
    )
    assert done.returncode == 0, done.stderr
    return python


def test_installed_plugin_is_listed_checked_and_passes_its_own_tests(venv_python) -> None:
    listed = _run(venv_python, "-m", "align", "rewards", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.split()[0] == "brightness")
    assert "entry point align_reward_brightness:Brightness (align-reward-brightness 0.1.0)" in line
    checked = _run(
        venv_python, "-m", "align", "rewards", "check", "brightness", "--arg", "target=0.3", "--arg", "batch_size=3"
    )
    assert checked.returncode == 0 and "brightness: ok" in checked.stdout, checked.stdout + checked.stderr
    own = _run(venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=PLUGIN)
    assert own.returncode == 0 and "3 passed" in own.stdout, own.stdout + own.stderr


def test_two_training_iterations_with_the_installed_plugin_by_name(venv_python, tmp_path, tiny_train_overrides) -> None:
    overrides = [
        *tiny_train_overrides,
        "algo=grpo",
        "trainer.iterations=2",
        "rewards=[{name: brightness, args: {target: 0.3}}]",
        f"run_dir={tmp_path}",
    ]
    done = _run(venv_python, "-m", "align", "train", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2 and state["policy_updates"] == 2
    scores = [h["reward/brightness"] for h in state["history"]]
    assert all(-1.0 <= s <= 0.0 for s in scores)
