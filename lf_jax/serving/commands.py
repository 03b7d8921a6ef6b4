"""The serving side of the ``lf-jax`` command: ``export --serving`` and ``serve``.

cli.py registers these: ``add_export_arguments`` adds the --serving options to
``lf-jax export``, ``run_export`` runs it, ``serve_arguments`` / ``run_serve`` are the
``serve`` command.

Example:
    $ lf-jax export --serving --config configs/demo.py --workdir runs/demo \\
          --output runs/demo/serving --serving-dtype int8
    $ lf-jax serve --artifacts runs/demo/serving --port 8080
"""

import argparse
from pathlib import Path

from lf_jax.errors import UserInputError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return values


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "serving artifacts (--serving: a new version under --output, see README 'Serving')"
    )
    group.add_argument(
        "--serving",
        action="store_true",
        help="write serving artifacts (jax.export functions, weights, id maps, manifest) "
        "and the feature store instead of a corpus export; --entity is not used",
    )
    group.add_argument(
        "--serving-dtype",
        default="int8",
        choices=("int8", "float32"),
        help="embedding tables and item vectors: int8 with per-row scales or float32",
    )
    group.add_argument("--version", default=None, help="version name (default: v<N+1>)")
    group.add_argument(
        "--query-buckets", type=_int_list, default=(1, 4, 16), help="queries per call (1,4,16)"
    )
    group.add_argument(
        "--candidate-buckets",
        type=_int_list,
        default=(512, 2048),
        help="candidates per query (512,2048); K above the largest is refused",
    )


def check_export(args) -> None:
    """Checks --output and --version before any device work."""
    from lf_jax.serving.export_serving import VERSION_PATTERN

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserInputError(f"--output '{output}' exists and is not a directory")
    if args.version is not None and not VERSION_PATTERN.match(args.version):
        raise UserInputError(f"--version {args.version!r}: use letters, digits, '.', '_' or '-'")
    if args.version is not None and (output / "versions" / args.version).exists():
        raise UserInputError(f"--version {args.version!r} already exists under '{output}'")


def run_export(args, config) -> None:
    from lf_jax.serving.export_serving import export_serving

    result = export_serving(
        config,
        args.workdir,
        args.output,
        dtype=args.serving_dtype,
        version=args.version,
        queries=args.query_buckets,
        candidates=args.candidate_buckets,
    )
    print(f"serving version {result['version']} -> {result['directory']}")
    for name, manifest in result["manifests"].items():
        line = (
            f"  {name:<10} {manifest['bytes']:>12,} bytes, tables {manifest['table_dtype']}, "
            f"{len(manifest['functions'])} bucket functions"
        )
        aucs = manifest.get("quality", {}).get("holdout_random_auc")
        if aucs:
            line += ", holdout_random AUC " + ", ".join(
                f"{d} {v['mean']:.4f}" for d, v in aucs.items()
            )
            line += f" ({manifest['quality']['holdout_random_examples']:,} examples)"
        print(line)
    f = result["features"]
    print(
        f"  features   {Path(args.output) / 'features'}: {f['written']:,} rows written "
        f"({f['new']:,} new), {f['unchanged']:,} unchanged"
    )


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", required=True, metavar="DIR", help="an export --serving DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--poll", type=float, default=1.0, metavar="S", help="seconds between CURRENT checks"
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=0.0,
        help="wait this long after a request for others to batch with (default 0: batch "
        "whatever waits while the device is busy)",
    )


def run_serve(args, overrides) -> None:
    if overrides:
        raise UserInputError(f"serve takes no --config overrides, got {overrides}")
    if not Path(args.artifacts).is_dir():
        raise UserInputError(f"--artifacts '{args.artifacts}' is not a directory")
    from lf_jax.serving.server import run_server

    run_server(args.artifacts, args.host, args.port, args.poll, args.batch_window_ms)
