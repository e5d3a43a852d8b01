"""`align`: the command line, thin over the library.

Every job takes an optional YAML config and dotted overrides, e.g.
``align sample configs/toy_sample.yaml sampler.guidance_scale=3``. ``--show-config`` prints every
key with its default and help. Heavy imports happen inside the handlers, after the config is
loaded and validated, so ``align --help`` and config errors are fast. Every known error (bad input:
align/errors.py) is one line on stderr with exit code 2; ``--debug`` (anywhere on the line) shows
its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import Callable, Sequence

from align.config import ConfigError, ConfigWarning, describe, load_config, to_yaml
from align.errors import EXIT_BAD_INPUT, one_line

DEFAULT_TRAIN_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy_ecg.yaml"
)
Handler = Callable[[argparse.Namespace], int]
#: name -> (help, function that adds the arguments and returns the handler)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {}


def command(name: str, help: str):
    """Register a (sub)command: ``name`` may be two words, e.g. ``"toy pretrain"``."""

    def wrap(fn: Callable[[argparse.ArgumentParser], Handler]):
        COMMANDS[name] = (help, fn)
        return fn

    return wrap


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (optional); keys not in it keep their defaults")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides: key.sub=value")
    p.add_argument("--show-config", action="store_true", help="print every config key, default and help")


def _split_config(ns: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A first positional containing '=' is an override, not a config path."""
    cfg, overrides = ns.config, list(ns.overrides)
    if cfg is not None and "=" in cfg:
        overrides.insert(0, cfg)
        cfg = None
    return cfg, overrides


def _show(schema: type) -> int:
    rows = describe(schema)
    width = max(len(r[0]) for r in rows)
    for key, default, help_text in rows:
        print(f"  {key:<{width}}  {default:<22} {help_text}")
    return 0


@command("train", "RL fine-tuning: ECG (default), GRPO or DDPO; embedded toy default")
def _train(p: argparse.ArgumentParser) -> Handler:
    _config_args(p)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR (its newest complete checkpoint; refused if the settings define another run)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="resume although run-defining settings or the base differ, "
        "or start over in a run_dir that holds a checkpoint",
    )

    def run(ns: argparse.Namespace) -> int:
        from align.train_config import TrainConfig

        if ns.show_config:
            return _show(TrainConfig)
        path, overrides = _split_config(ns)
        if ns.resume:
            saved = os.path.join(ns.resume, "config.json")
            if not os.path.isfile(saved):
                raise ConfigError(f"--resume {ns.resume}: no config.json there (not a run directory)")
            overrides = [f"run_dir={ns.resume}", *overrides]
            path = path or saved  # JSON is YAML: loaded in place, no temporary copy
        elif path is None and os.path.isfile(DEFAULT_TRAIN_CONFIG):
            path = DEFAULT_TRAIN_CONFIG
        cfg = load_config(TrainConfig, path, overrides)
        from align.run_identity import check_fresh_run_dir, resolve_resume

        if ns.resume:
            resolve_resume(cfg.run_dir, cfg, ns.force)  # before any model loads (train() checks the base too)
        else:
            check_fresh_run_dir(cfg.run_dir, ns.force)
        from align.train import train

        train(cfg, resume=bool(ns.resume), force=ns.force)
        return 0

    return run


@command("toy pretrain", "train the embedded toy model on CPU (regenerates the shipped weights)")
def _toy_pretrain(p: argparse.ArgumentParser) -> Handler:
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint")

    def run(ns: argparse.Namespace) -> int:
        from align.toy.pretrain import PretrainConfig, pretrain

        if ns.show_config:
            return _show(PretrainConfig)
        cfg = load_config(PretrainConfig, *_split_config(ns))
        print(to_yaml(cfg))
        pretrain(cfg, resume=ns.resume)
        return 0

    return run


#: `align sample` flags that are shorthands for ``steering.*`` config keys
_STEER_FLAGS = {"critic": "critic", "steer": "steer", "scale": "scale", "candidates": "candidates"}


@command("sample", "sample images (toy prompts are also scored by the toy checker); --critic DIR --steer to steer")
def _sample(p: argparse.ArgumentParser) -> Handler:
    _config_args(p)
    p.add_argument("--critic", metavar="DIR", help="exported critic directory (= steering.critic)")
    p.add_argument("--steer", help="steering mode (= steering.steer; the registered modes: --show-config)")
    p.add_argument("--scale", help="grad steering scale s (= steering.scale)")
    p.add_argument("--candidates", help="rerank: M candidates per step; best_of_n: N chains (= steering.candidates)")
    p.add_argument("--policy-lora", metavar="DIR", help="exported policy LoRA directory (= policy_lora)")
    p.add_argument("--force", action="store_true", help="load the critic onto another base (= steering.force=true)")
    p.add_argument("--height", help="image height in pixels (= sampler.height; default: the model's)")
    p.add_argument("--width", help="image width in pixels (= sampler.width; default: the model's)")

    def run(ns: argparse.Namespace) -> int:
        from align.sample_job import SampleJobConfig, run_sample_job

        if ns.show_config:
            return _show(SampleJobConfig)
        path, overrides = _split_config(ns)
        overrides += [
            f"steering.{key}={getattr(ns, flag)}" for flag, key in _STEER_FLAGS.items() if getattr(ns, flag) is not None
        ]
        overrides += ["steering.force=true"] if ns.force else []
        overrides += [f"policy_lora={ns.policy_lora}"] if ns.policy_lora else []
        overrides += [
            f"sampler.{key}={getattr(ns, key)}" for key in ("height", "width") if getattr(ns, key) is not None
        ]
        cfg = load_config(SampleJobConfig, path, overrides)
        run_sample_job(cfg)
        return 0

    return run


@command("export", "export a run: policy LoRA (diffusers format) and critic (HF-style directory)")
def _export(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `align train` (config.json + checkpoint/)")
    p.add_argument(
        "--out", metavar="DIR", default=None, help="where to write policy/ and critic/ (default RUN_DIR/export)"
    )

    def run(ns: argparse.Namespace) -> int:
        from align.policy import export_run

        try:
            out = export_run(ns.run_dir, ns.out)
        except (FileNotFoundError, FileExistsError) as err:
            raise ConfigError(str(err)) from None
        print(f"exported {ns.run_dir} to {out} (policy/: pipe.load_lora_weights; critic/: critics.load)")
        return 0

    return run


def _reward_args(items: Sequence[str]) -> dict:
    """``--arg key=value`` pairs → kwargs (values parsed as YAML scalars: 16, 1e-3, true, a/path)."""
    import yaml

    bad = [i for i in items if "=" not in i]
    if bad:
        raise ConfigError(f"--arg {bad[0]!r} is not of the form key=value")
    return {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def _reward_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="reward name (see `align rewards list`) or remote:http://HOST:PORT/NAME")
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the reward (repeatable), as in the config's reward_args",
    )


@command("rewards list", "list the built-in and installed reward plugins with their source")
def _rewards_list(p: argparse.ArgumentParser) -> Handler:
    def run(ns: argparse.Namespace) -> int:
        from rewards.registry import available_rewards, describe_reward

        found = available_rewards()
        width = max(map(len, found))
        for name, source in sorted(found.items()):
            print(f"  {name:<{width}}  {source:<40} {describe_reward(name)}")
        return 0

    return run


@command("rewards check", "run a reward on toy renders: shape, dtype, finiteness, batch-size invariance")
def _rewards_check(p: argparse.ArgumentParser) -> Handler:
    _reward_cli_args(p)
    p.add_argument(
        "--num-images",
        type=_positive_int,
        default=8,
        help="images in the test batch (>= 2: the batch-size invariance check splits it)",
    )
    p.add_argument("--size", type=_positive_int, default=64, help="render size in pixels")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the invariance checks")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the invariance checks")

    def run(ns: argparse.Namespace) -> int:
        from rewards import get_reward
        from rewards.check import check_reward

        try:
            reward = get_reward(ns.name, **_reward_args(ns.arg))
        except (ValueError, OSError, RuntimeError) as err:
            raise ConfigError(str(err)) from None
        results = check_reward(reward, ns.num_images, size=ns.size, rtol=ns.rtol, atol=ns.atol)
        for r in results:
            print(f"  {'PASS' if r.ok else 'FAIL'}  {r.check:<22} {r.detail}")
        ok = all(r.ok for r in results)
        print(f"{ns.name}: {'ok' if ok else 'FAILED'}")
        return 0 if ok else 1

    return run


@command("rewards serve", "serve one reward over HTTP for remote:http://HOST:PORT/NAME")
def _rewards_serve(p: argparse.ArgumentParser) -> Handler:
    _reward_cli_args(p)
    p.add_argument("--port", type=_port, required=True, help="TCP port 0-65535 (0: a free one, printed)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs a token")
    p.add_argument("--token-env", default="ALIGN_REWARD_TOKEN", help="environment variable holding the bearer token")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body accepted (MB)")

    def run(ns: argparse.Namespace) -> int:
        from rewards import get_reward
        from rewards.server import make_server

        try:
            reward = get_reward(ns.name, **_reward_args(ns.arg))
            server = make_server(
                reward, ns.host, ns.port, os.environ.get(ns.token_env) or None, int(ns.max_request_mb * (1 << 20))
            )
        except (ValueError, OSError, RuntimeError) as err:
            raise ConfigError(str(err)) from None
        host, port = server.server_address[:2]
        print(f"serving reward {reward.name!r} at http://{host}:{port}/{reward.name}", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return 0

    return run


@command("eval", "GenEval's protocol (toy, geneval or a JSONL of records): images, results.jsonl, summary")
def _eval(p: argparse.ArgumentParser) -> Handler:
    from align import eval_cli

    eval_cli.add_parser(p)
    return eval_cli.run


#: `align solve` flags → the SolveConfig key each one overrides (``--sigma-y 0.1`` is ``sigma_y=0.1``).
SOLVE_FLAGS = {
    "--task": "task",
    "--method": "method",
    "--input": "input",
    "--out": "out",
    "--mask": "mask",
    "--box": "box",
    "--scale": "scale",
    "--kernel": "kernel",
    "--renoise": "renoise",
    "--reference": "reference",
    "--lora": "lora",
    "--lpips-weights": "lpips_weights",
    "--stage2": "stage2",
    "--sigma-y": "sigma_y",
    "--seed": "seed",
}


@command("solve", "inverse problems (inpaint, sr, deblur) with MAP-RPS, CLAMP or DPS; metrics and knob sweeps")
def _solve(p: argparse.ArgumentParser) -> Handler:
    _config_args(p)
    for flag, key in SOLVE_FLAGS.items():
        p.add_argument(
            flag, dest=f"flag_{key}", metavar=key.upper(), default=None, help=f"config key {key} (help: --show-config)"
        )
    p.add_argument("--degrade", action="store_true", help="input is clean: simulate the measurement from it")

    def run(ns: argparse.Namespace) -> int:
        from align.inverse.solve import SolveConfig, run_solve

        if ns.show_config:
            return _show(SolveConfig)
        path, overrides = _split_config(ns)
        overrides += [
            f"{key}={getattr(ns, f'flag_{key}')}"
            for key in SOLVE_FLAGS.values()
            if getattr(ns, f"flag_{key}") is not None
        ]  # each flag is its override: typed by the config
        overrides += ["degrade=true"] if ns.degrade else []
        cfg = load_config(SolveConfig, path, overrides)
        try:
            run_solve(cfg)
        except (ValueError, FileNotFoundError) as err:
            print(f"align solve: error: {err}", file=sys.stderr)
            return 2
        return 0

    return run


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse prints the one-line usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port 0-65535 (0: the OS picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors (``--port 99999``, a missing argument) on one line, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="align", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, add_args) in COMMANDS.items():
        words = name.split()
        if len(words) == 1:
            leaf_parser = subs.add_parser(words[0], help=help_text, description=help_text)
            leaf_parser.set_defaults(_handler=add_args(leaf_parser))
            continue
        group, leaf = words
        if group not in groups:
            gp = subs.add_parser(group, help=f"{group} subcommands ({leaf}, ...)")
            groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND", required=True)
        leaf_parser = groups[group].add_parser(leaf, help=help_text, description=help_text)
        leaf_parser.set_defaults(_handler=add_args(leaf_parser))
    return parser


def _show_config_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A :class:`ConfigWarning` as one line on stderr; other warnings as Python prints them."""
    if issubclass(category, ConfigWarning):
        print(f"align: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: the traceback of a known error too
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse stops collecting positional overrides at the first --flag; dotted overrides after the flags
    # (``align sample --steer grad sampler.eta=0.5``) are still overrides, anything else is an error.
    if extra and (not hasattr(ns, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        ns.overrides = [*ns.overrides, *extra]
    handler = getattr(ns, "_handler", None)
    if handler is None:
        parser.print_help()
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        warnings.showwarning = _show_config_warning
        return _run(handler, ns, debug)


def _run(handler: Handler, ns: argparse.Namespace, debug: bool) -> int:
    """The handler; a known error (align/errors.py) is one line and exit code 2, anything else a traceback."""
    try:
        return handler(ns)
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (the mapping decides; unknown errors re-raise below)
        line = one_line(err)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"align: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
