"""The ``lf-jax`` command.

    lf-jax [--verbosity LEVEL] COMMAND [--config FILE.py[:ARG]] [--config.a.b=VALUE ...]

Each command lives in COMMANDS as (help, add_arguments, run); ``lf-jax COMMAND --help``
explains it. Config overrides follow ml_collections' ``--config.a.b=value`` convention.
"""

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
import sys

from lf_jax.configuration import ConfigError, apply_overrides, load_config, split_override_args
from lf_jax.console import get_logger, set_verbosity
from lf_jax.errors import LfJaxError, UserInputError
from lf_jax.workdir import ensure_writable_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {"demo": REPO_ROOT / "configs" / "demo.py",
                   "plan": REPO_ROOT / "configs" / "feed_ranker.py"}
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")


class CommandError(UserInputError):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_config_arguments(parser: argparse.ArgumentParser, default: Path | None) -> None:
    parser.add_argument(
        "--config", default=str(default) if default else None, required=default is None,
        metavar="FILE.py[:ARG]",
        help="config file with get_config(arg); ARG like 'size=tiny,steps=3'"
             + (f" (default: {default.relative_to(REPO_ROOT)})" if default else ""))
    parser.epilog = ("Override any existing config key with --config.KEY.SUBKEY=VALUE; values are "
                     "converted to the key's type, unknown keys are an error.")


def _add_workdir(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--workdir", default=default,
                        help=f"directory for outputs, created if missing (default: {default})")


def _resolved_config(args, overrides):
    return apply_overrides(load_config(args.config), overrides)


def _check_workdir(path: str) -> Path:
    return ensure_writable_dir(path, "--workdir")


# --- demo -------------------------------------------------------------------------------
def _demo_arguments(parser):
    _add_config_arguments(parser, DEFAULT_CONFIGS["demo"])
    _add_workdir(parser, "runs/demo")


def _demo_run(args, overrides):
    config = _resolved_config(args, overrides)
    workdir = _check_workdir(args.workdir)
    from lf_jax.distributed.devices import simulate_cpu_devices
    simulate_cpu_devices(config.devices)
    from lf_jax.demo import run_demo
    run_demo(config, workdir)


# --- config -----------------------------------------------------------------------------
def _config_arguments(parser):
    _add_config_arguments(parser, None)


def _config_run(args, overrides):
    print(str(_resolved_config(args, overrides)).rstrip())


# --- plan -------------------------------------------------------------------------------
def _plan_arguments(parser):
    _add_config_arguments(parser, DEFAULT_CONFIGS["plan"])
    parser.add_argument("--output", default=None, metavar="PLAN.json",
                        help="also write the plan as JSON (load it with "
                             "lf_jax.embedding.plan.load_plan)")


def _plan_run(args, overrides):
    config = _resolved_config(args, overrides)
    for key in ("embedding", "mesh", "devices", "batch_size"):
        if key not in config:
            raise CommandError(f"config '{args.config}' has no '{key}' key; the planner needs "
                               f"embedding, mesh, devices and batch_size")
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():
        raise CommandError(f"--output '{output}': directory '{output.parent}' does not exist")
    # Plans for config.devices devices without touching (or needing) any jax device.
    from lf_jax.embedding.config_specs import memory_budget_from_config, specs_from_config
    from lf_jax.embedding.plan import save_plan
    from lf_jax.planner import plan_tables
    tables, features, hand_plan = specs_from_config(config.embedding)
    result = plan_tables(tables, features, dict(config.mesh), config.batch_size,
                         memory_budget_from_config(config.embedding), hand_plan,
                         device_count=config.devices)
    print(result.format_table())
    if output is not None:
        try:
            save_plan(result.plan, output)
        except OSError as error:
            raise CommandError(f"--output '{output}' is not writable: {error.strerror}") from None
        print(f"plan written to {output}")


# --- devices ----------------------------------------------------------------------------
def _add_devices(parser):
    parser.add_argument("--devices", default="auto", metavar="auto|cpu:N|real",
                        help="auto: real accelerators when a GPU/TPU plugin is installed, else "
                             "config.devices simulated CPU devices; cpu:N simulates N; real uses "
                             "what jax finds (default: auto)")


def _setup_devices(choice: str, config) -> None:
    import importlib.util

    from lf_jax.distributed.devices import simulate_cpu_devices
    if choice == "real":
        return
    if choice.startswith("cpu:"):
        try:
            count = int(choice[4:])
        except ValueError:
            raise CommandError(f"--devices {choice!r}: expected cpu:N with an integer N") from None
        simulate_cpu_devices(count)
        return
    if choice != "auto":
        raise CommandError(f"--devices {choice!r}: expected auto, cpu:N or real")
    if not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS):
        simulate_cpu_devices(int(config.get("devices", 1)))


# --- train / eval / ips -----------------------------------------------------------------
def _train_arguments(parser):
    _add_config_arguments(parser, None)
    _add_workdir(parser, "runs/train")
    _add_devices(parser)


def _train_run(args, overrides):
    config = _resolved_config(args, overrides)
    _check_workdir(args.workdir)
    _setup_devices(args.devices, config)
    from lf_jax.train.loop import train_and_evaluate
    metrics = train_and_evaluate(config, args.workdir)
    print(_format_metrics(metrics))
    print(f"workdir: {Path(args.workdir).resolve()} (checkpoints/, tensorboard/, history.jsonl, "
          f"metrics.json, plan.json)")


def _eval_arguments(parser):
    _add_config_arguments(parser, None)
    _add_workdir(parser, "runs/train")
    _add_devices(parser)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def _eval_run(args, overrides):
    config = _resolved_config(args, overrides)
    _setup_devices(args.devices, config)
    from lf_jax.train.loop import evaluate_checkpoint
    print(_format_metrics(evaluate_checkpoint(config, args.workdir, args.step)))


def _ips_arguments(parser):
    _add_config_arguments(parser, None)
    _add_workdir(parser, "runs/train")


def _ips_run(args, overrides):
    config = _resolved_config(args, overrides)
    workdir = _check_workdir(args.workdir)
    from lf_jax.input.datasets import build_dataset, dataset_metadata
    from lf_jax.train.ranker import ips_weights_for_run
    builder = build_dataset(config.data.dataset, config.data.config, config.data.data_dir or None)
    meta = dataset_metadata(builder)
    path = workdir / "ips_weights.json"
    if path.exists():
        path.unlink()
    ips = ips_weights_for_run(builder, tuple(meta["tasks"]), int(meta["num_positions"]),
                              config.train.ips_clip, path, fit=config.train.ips_fit)
    print(ips.format_table())
    print(f"IPS weights written to {path} (used by `lf-jax train` with train.ips=true)")


def _format_metrics(metrics) -> str:
    """Splits 'split/task/metric' keys into one row per split and task."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in sorted(metrics.items()):
        split, task, name = key.split("/") if key.count("/") == 2 else ("", *key.split("/", 1))
        rows.setdefault((split, task), {})[name] = value
    names = sorted({name for row in rows.values() for name in row})
    lines = [f"{'split':<16}{'task':<12}" + "".join(f"{n:>12}" for n in names)]
    for (split, task), row in rows.items():
        lines.append(f"{split:<16}{task:<12}" + "".join(f"{row.get(n, float('nan')):>12.4f}" for n in names))
    return "\n".join(lines)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable]
COMMANDS: dict[str, Command] = {
    "demo": ("run the end-to-end demo on simulated CPU devices (8 by default): mesh, "
             "embedding plan, synthetic feed logs, a short ranker run and a report",
             _demo_arguments, _demo_run),
    "config": ("print a config after its ARG and --config.* overrides are applied "
               "(checks overrides without running anything)", _config_arguments, _config_run),
    "train": ("train a model family (config.model_family) with evaluation, checkpoints and "
              "resume; e.g. --config configs/feed_ranker.py:size=tiny", _train_arguments, _train_run),
    "eval": ("evaluate a checkpoint of a training workdir on the holdout splits",
             _eval_arguments, _eval_run),
    "ips": ("compute the IPS weights (random vs ranked session CTR per position and task) "
            "of a dataset and store them in the workdir", _ips_arguments, _ips_run),
    "plan": ("explain the embedding plan for config.devices devices (one row per table: "
             "bytes, strategy, reason) without allocating anything", _plan_arguments, _plan_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lf-jax",
        description="Train large-embedding feed models with JAX on a device mesh.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<8} {help_}" for name, (help_, _, _) in COMMANDS.items())
               + "\n\nRun 'lf-jax COMMAND --help' for a command's options.")
    parser.add_argument("--verbosity", default="info",
                        help="log level: debug | info | warning | error (default: info)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        overrides, rest = split_override_args(argv)
    except ConfigError as error:
        parser.error(str(error))
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        set_verbosity(args.verbosity)
        COMMANDS[args.command][2](args, overrides)
    except LfJaxError as error:
        get_logger().debug("command failed", exc_info=True)
        print(f"lf-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
