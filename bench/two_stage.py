"""Two-stage serving latency: dual encoder query -> ScaNN top K -> feed ranker -> top N.

Command (after ``make demo``, which leaves trained checkpoints and exports in runs/demo):
    .venv/bin/python bench/two_stage.py --workdir runs/demo
    .venv/bin/python bench/two_stage.py --workdir runs/demo --candidates 2000 --batch 16 --repeats
    100

Uses the demo's dual encoder (members embedded from their prompts on each request), its
ScaNN item index (export/items/index) and its feed ranker checkpoint, on 8 simulated CPU
devices (``--devices``). For each request shape -- one member, and ``--batch`` members --
every stage is timed ``--repeats`` times after a warm-up call that compiles: query
embedding, ScaNN retrieval of K candidates, ranker features, ranker scoring, and the
total. Reports p50 and p99 in milliseconds; ``--json`` writes them with the machine.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="a finished `lf-jax demo` workdir")
    parser.add_argument("--candidates", type=int, default=2000, help="K retrieved per member")
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="members per batched request")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import lf_jax

    lf_jax.simulate_cpu_devices(args.devices)
    import numpy as np

    from lf_jax.configuration import load_config
    from lf_jax.console import set_verbosity
    from lf_jax.export.embed_corpus import open_source
    from lf_jax.export.scann_index import VectorIndex
    from lf_jax.export.two_stage import (
        FeedWorldFeatures,
        RankerScorer,
        TwoStageService,
        dual_encoder_queries,
    )

    set_verbosity("warning")
    workdir = Path(args.workdir)
    for needed in ("ranker/checkpoints", "dual_encoder/checkpoints", "export/items/index"):
        if not (workdir / needed).exists():
            sys.exit(f"{workdir / needed} is missing: run `lf-jax demo --workdir {workdir}` first")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    for section in ("ranker", "dual_encoder"):
        with config[section].unlocked():
            config[section].data.data_dir = str((workdir / "tfds").resolve())
    encoder = open_source(config.dual_encoder, workdir / "dual_encoder")
    ranker = open_source(config.ranker, workdir / "ranker")
    index = VectorIndex.load(workdir / "export" / "items" / "index")
    service = TwoStageService(
        dual_encoder_queries(encoder),
        index,
        RankerScorer(ranker),
        FeedWorldFeatures(config.ranker.data.config),
        num_candidates=args.candidates,
        top_n=args.top_n,
    )
    rng = np.random.default_rng(0)
    figures = {}
    for name, size in (("single", 1), ("batched", args.batch)):

        def members(size=size):
            # members of the demo's world (300 in feed_logs tiny 1.2.0), not a fixed range
            return [f"m{i}" for i in rng.choice(service.features.num_members, size, replace=False)]

        service.serve(members())  # compile this shape
        samples: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            service.serve(members())
            for stage, ms in service.timings.items():
                samples.setdefault(stage, []).append(ms)
        figures[name] = {
            "members": size,
            **{
                stage: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
                for stage, v in samples.items()
            },
        }
    print(
        f"K={args.candidates} candidates of {index.count:,} items ({index.params.mode}, "
        f"{service.leaves_for(args.candidates)} of {index.params.num_leaves} leaves), top "
        f"{args.top_n}, "
        f"{args.repeats} requests per shape, {args.devices} simulated CPU devices, "
        f"{os.cpu_count()} cores"
    )
    stages = list(figures["single"])[1:]
    print(f"{'request':<18}" + "".join(f"{s[:-3]:>22}" for s in stages))
    for name, row in figures.items():
        label = f"{name} ({row['members']})"
        print(
            f"{label:<18}"
            + "".join(f"{row[s]['p50']:>10.1f} / {row[s]['p99']:>7.1f}" + "   " for s in stages)
        )
    print("(ms, p50 / p99)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "figures": figures,
                    "candidates": args.candidates,
                    "top_n": args.top_n,
                    "index": {"count": index.count, "mode": index.params.mode},
                    "repeats": args.repeats,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                    },
                    "date": time.strftime("%Y-%m-%d"),
                },
                indent=2,
            )
        )
    encoder.close()
    ranker.close()


if __name__ == "__main__":
    main()
