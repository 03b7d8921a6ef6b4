"""``lf-jax export`` without ``--serving``: embed a corpus from a checkpoint.

cli.py registers these (a module outside lf_jax.export, so that every `lf-jax` start does
not import the export package): ``add_corpus_arguments`` adds the corpus options to the export
parser, ``run_corpus_export`` runs it once cli.py has resolved the config (the
``--serving`` form lives in lf_jax/serving/commands.py).

Example:
    lf-jax export --config configs/dual_encoder.py:size=tiny --workdir runs/de \\
        --entity items --output runs/items --index --kv
    # a run with dynamic tables: export the live keys once, then only what changed
    lf-jax export --config ... --workdir runs/dyn --entity posts --output runs/posts --kv
    lf-jax export --config ... --workdir runs/dyn --entity posts --output runs/posts --delta
"""

import argparse

from lf_jax.distributed.device_flags import setup_devices
from lf_jax.errors import UserInputError


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """--step, --entity, --output, --index, --kv, --dims, --metric, --target-recall,
    --batch-size, --delta."""
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--entity",
        default=None,
        metavar="members|posts|items",
        help="which corpus to embed (the model family says which it has); required "
        "without --serving",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="export directory (replaced atomically; a failed export keeps the old one); "
        "with --serving, the artifacts directory (a new version is added)",
    )
    parser.add_argument(
        "--index", action="store_true", help="also build a tuned ScaNN index (DIR/index)"
    )
    parser.add_argument(
        "--kv", action="store_true", help="also write an int8 LMDB key-value store (DIR/kv)"
    )
    parser.add_argument(
        "--dims",
        type=int,
        default=None,
        help="keep the first DIMS dimensions (Matryoshka; default: all)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        help="dot_product | cosine | squared_l2 (default: the model family's)",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 the index is tuned to (default: 0.95)",
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="entities per embedding batch")
    parser.add_argument(
        "--delta",
        action="store_true",
        help="update the export at --output (of a dynamic table) in place with the rows "
        "changed since the checkpoint step it records: its kv/, index/, vectors and ids",
    )


def check_serving_tables(config) -> None:
    """``--serving`` of a run with dynamic tables: one clear error before any device work
    for a dynamic table whose ids the serving export cannot map.

    A dynamic table is served as its alive keys' rows plus an id -> row map over the
    dataset's ids of the table (lf_jax/serving/dynamic_tables.py), so its ids must be ones
    the dataset counts (member, post, hashtag, position ids)."""
    from lf_jax.embedding.config_specs import dynamic_expected_keys
    from lf_jax.serving.dynamic_tables import check_servable

    ranker = config.ranker if "ranker" in config else config
    if "embedding" not in ranker:
        return
    check_servable(sorted(dynamic_expected_keys(ranker.embedding)))


def run_corpus_export(args: argparse.Namespace, config) -> None:
    """Checks --entity and --output before any device work, embeds the corpus and prints
    what was written."""
    from lf_jax.export.embed_corpus import check_output

    if args.entity is None:
        raise UserInputError("--entity is required (members, posts or items) without --serving")
    if args.delta:
        _run_delta(args, config)
        return
    check_output(args.output)  # before any device work
    setup_devices(args.devices, config, args)
    from lf_jax.export.embed_corpus import export_corpus, open_source

    source = open_source(config, args.workdir, args.step)
    try:
        result = export_corpus(
            source,
            args.entity,
            args.output,
            batch_size=args.batch_size,
            dims=args.dims,
            metric=args.metric,
            build_index=args.index,
            build_kv=args.kv,
            target_recall=args.target_recall,
        )
    finally:
        source.close()
    m = result.manifest
    print(
        f"exported {m['count']:,} {m['entity']} x {m['dims']} dims ({m['model']}, checkpoint step "
        f"{m['checkpoint_step']}, {m['metric']}) in {m['seconds']:.1f} s -> {result.directory}"
    )
    if "index" in m:
        print(
            f"  index/  ScaNN {m['index']['mode']}, recall@{m['index']['k']} = "
            f"{m['index']['recall']}"
        )
    if "kv" in m:
        print(
            f"  kv/     LMDB int8, version {m['kv']['version']}, {m['kv']['bytes_on_disk']:,} bytes"
        )


def _run_delta(args: argparse.Namespace, config) -> None:
    """``--delta``: the export at --output is read (and checked) before any device work;
    the options that shape a new export are refused (the export keeps its own)."""
    from lf_jax.export.embed_corpus import load_export

    given = [
        flag
        for flag, value in (
            ("--index", args.index),
            ("--kv", args.kv),
            ("--dims", args.dims is not None),
            ("--metric", args.metric is not None),
        )
        if value
    ]
    if given:
        raise UserInputError(
            f"--delta updates what the export at --output holds (its dims, metric, index/ "
            f"and kv/); drop {given[0]}"
        )
    _, _, manifest = load_export(args.output)
    if "dynamic_table" not in manifest:
        raise UserInputError(
            f"--delta: '{args.output}' is an export of a static table ({manifest['entity']}); "
            "only exports of dynamic tables take increments"
        )
    setup_devices(args.devices, config, args)
    from lf_jax.export.delta_corpus import update_export
    from lf_jax.export.embed_corpus import open_source

    source = open_source(config, args.workdir, args.step)
    try:
        result = update_export(source, args.entity, args.output)
    finally:
        source.close()
    print(
        f"delta {result.entity}: checkpoint step {result.since_step} -> {result.step}, "
        f"{result.upserts:,} upserts, {result.deletes:,} deletes, {result.count:,} rows now "
        f"-> {args.output}"
    )
