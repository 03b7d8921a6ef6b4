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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {"demo": REPO_ROOT / "configs" / "demo.py",
                   "plan": REPO_ROOT / "configs" / "feed_ranker.py"}


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
    workdir = Path(path)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".lf_jax_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise CommandError(f"--workdir '{workdir}' is not writable: {error.strerror}") from None
    return workdir


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


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable]
COMMANDS: dict[str, Command] = {
    "demo": ("run the end-to-end demo on simulated CPU devices (8 by default): "
             "mesh, sharded steps and a short report", _demo_arguments, _demo_run),
    "config": ("print a config after its ARG and --config.* overrides are applied "
               "(checks overrides without running anything)", _config_arguments, _config_run),
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
