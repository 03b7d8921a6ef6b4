"""End-to-end demo on 8 simulated CPU devices.

Command:  lf-jax demo                      (or `make demo`)
Devices:  8 simulated CPU devices, mesh data=2 x model=4
Time:     see README "Demo" for the measured time on 2 CPU cores (target: about 5 minutes)
Metric:   the report prints the plan table, the ranker's holdout AUC next to the oracle
          AUC, the dual encoder's recall@10 per Matryoshka dim next to popularity, the
          ScaNN index recall, and what each serving stage buys in true engagement;
          files land in the workdir (default runs/demo), PNG plots included.

The ranker section is configs/feed_ranker.py:size=tiny with a shorter run and a smaller
MLP and cross network (sized for serving, below), the encoder section
configs/dual_encoder.py with a shorter run, so their overrides work here too:
``--config.ranker.train.steps=300``, ``--config.dual_encoder.train.steps=300``.
"""

from pathlib import Path

import ml_collections

from lf_jax.configuration import load_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"devices": 8})
    config = ml_collections.ConfigDict()
    config.devices = args["devices"]
    config.mesh = ml_collections.ConfigDict({"data": 2, "model": -1})
    config.seed = 0
    ranker = load_config(Path(__file__).with_name("feed_ranker.py").as_posix() + ":size=tiny")
    with ranker.unlocked():
        ranker.devices = args["devices"]
        ranker.train.steps = 150
        ranker.train.eval_every = 150
        ranker.train.checkpoint_every = 150
        ranker.train.log_every = 25
        # A ranker sized for serving 2,000 candidates in milliseconds on 2 CPU cores
        # (bench/rank_cost.py): MLP 64-32 with hidden gates, rank-16 cross layers. With the
        # member side folded it costs 0.18 GFLOP per 2,048 pairs (the tiny config's MLP
        # 256-128 + full-rank cross layers: 1.06); holdout_random mean AUC after 150 steps
        # 0.8539 vs 0.8589 (bench/BENCHMARKS.md "Serving").
        ranker.model.mlp_dims = (64, 32)
        ranker.model.dcn_low_rank = 16
        # Show several strategies on the tiny tables (the planner fills in the rest):
        ranker.embedding.plan = {
            "member": {"strategy": "row_wise", "axes": ("model",)},
            "post": {"strategy": "column_wise", "num_shards": 4},
        }
    config.ranker = ranker
    encoder = load_config(Path(__file__).with_name("dual_encoder.py").as_posix())
    with encoder.unlocked():
        encoder.devices = args["devices"]
        encoder.train.steps = 80
        encoder.train.eval_every = 80
        encoder.train.checkpoint_every = 80
        encoder.train.log_every = 10
    config.dual_encoder = encoder
    config.export = ml_collections.ConfigDict({"target_recall": 0.95})
    config.serving = ml_collections.ConfigDict(
        {
            # K retrieved by ScaNN from the dual encoder's item index (1,000 posts)
            "num_candidates": 500,
            "top_n": 10,  # N returned after the ranker
            "members": ("m3", "m42", "m151", "m277"),
            "task_weights": {"like": 1.0, "comment": 1.0, "share": 1.0, "long_dwell": 0.5},
        }
    )
    return config
