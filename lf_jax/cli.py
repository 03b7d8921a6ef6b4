"""The ``lf-jax`` command.

    lf-jax [--verbosity LEVEL] COMMAND [--config FILE.py[:ARG]] [--config.a.b=VALUE ...]

Each command lives in COMMANDS as (help, add_arguments, run); ``lf-jax COMMAND --help``
explains it. Config overrides follow ml_collections' ``--config.a.b=value`` convention.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lf_jax import export_command
from lf_jax.configuration import (
    ConfigError,
    apply_overrides,
    load_config,
    load_workdir_config,
    packaged_configs,
    split_override_args,
)
from lf_jax.console import get_logger, set_verbosity
from lf_jax.distributed.coordination import is_primary
from lf_jax.distributed.device_flags import (
    add_device_arguments,
    planned_device_count,
    setup_devices,
)
from lf_jax.errors import LfJaxError, UserInputError
from lf_jax.serving import commands as serving_commands
from lf_jax.workdir import ensure_writable_dir, reject_remote

DEFAULT_CONFIGS = {"demo": "demo", "plan": "feed_ranker"}  # packaged: lf_jax/configs/<name>.py


class CommandError(UserInputError):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_config_arguments(
    parser: argparse.ArgumentParser, default: str | None, required: bool = True
) -> None:
    parser.add_argument(
        "--config",
        default=default,
        required=required and default is None,
        metavar="FILE.py[:ARG]|NAME[:ARG]",
        help="config file with get_config(arg), or a packaged config by name ("
        + ", ".join(packaged_configs())
        + "); ARG like 'size=tiny,steps=3'"
        + (f" (default: {default})" if default else "")
        + ("" if required or default else " (default: WORKDIR/config.json of the training run)"),
    )
    parser.epilog = (
        "Override any existing config key with --config.KEY.SUBKEY=VALUE; values are "
        "converted to the key's type, unknown keys are an error."
    )


def _add_workdir(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--workdir",
        default=default,
        help=f"directory for outputs, created if missing (default: {default})",
    )


def _resolved_config(args, overrides):
    """The config with its overrides, every value range checked (lf_jax/config_checks.py)
    before any device work or file write."""
    from lf_jax.config_checks import check_config

    if args.config is None:  # eval without --config: the workdir's own config.json
        config = apply_overrides(load_workdir_config(args.workdir), overrides)
    else:
        config = apply_overrides(load_config(args.config), overrides)
    check_config(config, planned_device_count(args, config))
    return config


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
    parser.add_argument(
        "--output",
        default=None,
        metavar="PLAN.json",
        help="also write the plan as JSON (load it with lf_jax.embedding.plan.load_plan)",
    )


def _plan_run(args, overrides):
    config = _resolved_config(args, overrides)
    for key in ("embedding", "mesh", "devices", "batch_size"):
        if key not in config:
            raise CommandError(
                f"config '{args.config}' has no '{key}' key; the planner needs "
                f"embedding, mesh, devices and batch_size"
            )
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():
        raise CommandError(f"--output '{output}': directory '{output.parent}' does not exist")
    # Plans for config.devices devices without touching (or needing) any jax device.
    from lf_jax.embedding.config_specs import (
        dynamic_expected_keys,
        memory_budget_from_config,
        specs_from_config,
    )
    from lf_jax.embedding.dynamic.layout import table_shards
    from lf_jax.embedding.dynamic.report import explain_tables, format_rows
    from lf_jax.embedding.kernels.fused import describe_kernel
    from lf_jax.embedding.plan import save_plan
    from lf_jax.planner import plan_tables

    tables, features, hand_plan = specs_from_config(config.embedding)
    result = plan_tables(
        tables,
        features,
        dict(config.mesh),
        config.batch_size,
        memory_budget_from_config(config.embedding),
        hand_plan,
        device_count=config.devices,
    )
    print(result.format_table())
    by_name = {t.name: t for t in tables}
    dynamic = explain_tables(
        by_name,
        table_shards(by_name, result.plan, result.mesh_shape),
        dynamic_expected_keys(config.embedding),
    )
    if dynamic:
        print(format_rows(dynamic))
    print(describe_kernel())
    if output is not None:
        try:
            save_plan(result.plan, output)
        except OSError as error:
            raise CommandError(f"--output '{output}' is not writable: {error.strerror}") from None
        print(f"plan written to {output}")


# --- train / eval / ips -----------------------------------------------------------------
def _train_arguments(parser):
    _add_config_arguments(parser, None)
    _add_workdir(parser, "runs/train")
    add_device_arguments(parser)


def _train_run(args, overrides):
    config = _resolved_config(args, overrides)
    _check_workdir(args.workdir)
    setup_devices(args.devices, config, args)
    from lf_jax.train.loop import train_and_evaluate
    from lf_jax.train.metrics import format_metrics

    metrics = train_and_evaluate(config, args.workdir)
    if is_primary():  # every process has the metrics; one prints them
        print(format_metrics(metrics))
        print(
            f"workdir: {Path(args.workdir).resolve()} (checkpoints/, tensorboard/, history.jsonl, "
            f"metrics.json, plan.json)"
        )


def _eval_arguments(parser):
    _add_config_arguments(parser, None, required=False)
    _add_workdir(parser, "runs/train")
    add_device_arguments(parser)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def _eval_run(args, overrides):
    reject_remote(args.workdir, "--workdir")
    config = _resolved_config(args, overrides)
    checkpoints = (Path(args.workdir) / "checkpoints").absolute()
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise CommandError(f"no checkpoint in '{checkpoints}': train first (or pass --workdir)")
    setup_devices(args.devices, config, args)
    from lf_jax.train.loop import evaluate_checkpoint
    from lf_jax.train.metrics import format_metrics

    step, metrics = evaluate_checkpoint(config, args.workdir, args.step)
    if is_primary():
        print(f"evaluated checkpoint step {step} of {Path(args.workdir).resolve()}")
        print(format_metrics(metrics))


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
    ips = ips_weights_for_run(
        builder, tuple(meta["tasks"]), config.train.ips_clip, path, fit=config.train.ips_fit
    )
    print(ips.format_table())
    print(f"IPS weights written to {path} (used by `lf-jax train` with train.ips=true)")


# --- export -----------------------------------------------------------------------------
def _export_arguments(parser):
    _add_config_arguments(parser, None)
    _add_workdir(parser, "runs/train")
    add_device_arguments(parser)
    export_command.add_corpus_arguments(parser)
    serving_commands.add_export_arguments(parser)


def _export_run(args, overrides):
    config = _resolved_config(args, overrides)
    reject_remote(args.workdir, "--workdir")
    reject_remote(args.output, "--output")
    if args.serving:
        if args.delta:
            raise UserInputError("--delta updates a corpus export; it does not go with --serving")
        serving_commands.check_export(args)  # before any device work
        export_command.check_serving_tables(config)
        setup_devices(args.devices, config, args)
        return serving_commands.run_export(args, config)
    return export_command.run_corpus_export(args, config)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable]
COMMANDS: dict[str, Command] = {
    "demo": (
        "run the end-to-end demo on simulated CPU devices (8 by default): mesh, "
        "embedding plan, synthetic feed logs, a short ranker run and a report",
        _demo_arguments,
        _demo_run,
    ),
    "config": (
        "print a config after its ARG and --config.* overrides are applied "
        "(checks overrides without running anything)",
        _config_arguments,
        _config_run,
    ),
    "train": (
        "train a model family (config.model_family) with evaluation, checkpoints and "
        "resume; e.g. --config configs/feed_ranker.py:size=tiny",
        _train_arguments,
        _train_run,
    ),
    "eval": (
        "evaluate a checkpoint of a training workdir on the holdout splits",
        _eval_arguments,
        _eval_run,
    ),
    "ips": (
        "compute the IPS weights (random vs ranked session CTR per position and task) "
        "of a dataset and store them in the workdir",
        _ips_arguments,
        _ips_run,
    ),
    "export": (
        "embed a corpus (members, posts, items) from a checkpoint; write vectors, ids and "
        "a manifest, and optionally a ScaNN index and a KV store",
        _export_arguments,
        _export_run,
    ),
    "serve": (
        "serve an `export --serving` artifacts directory over HTTP on one CPU device: "
        "retrieve, rank and feed endpoints, health, metrics, hot swap of versions",
        serving_commands.serve_arguments,
        serving_commands.run_serve,
    ),
    "plan": (
        "explain the embedding plan for config.devices devices (one row per table: "
        "bytes, strategy, reason) without allocating anything",
        _plan_arguments,
        _plan_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lf-jax",
        description="Train large-embedding feed models with JAX on a device mesh.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<8} {help_}" for name, (help_, _, _) in COMMANDS.items())
        + "\n\nRun 'lf-jax COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--verbosity",
        default="info",
        help="log level: debug | info | warning | error (default: info)",
    )
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
    except KeyboardInterrupt:  # outside the training loop (which saves and returns)
        print(f"lf-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
