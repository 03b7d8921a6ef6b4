"""Multi-task feed ranker over sparse member/hashtag ids: tiny | small | large.

Command:  lf-jax train --config configs/feed_ranker.py:size=tiny
          lf-jax plan  --config configs/feed_ranker.py:size=large --config.mesh.data=8 \\
                       --config.devices=64          (the embedding plan only; no devices)
Devices:  tiny, small: 8 simulated CPU devices, mesh data=2 x model=4.
          large: 64 accelerators, mesh data=8 x model=8 with the overrides above.
Time:     plan: under 5 s for any size. Training targets (not yet measured):
          tiny ~1 min and small ~15 min on 2 CPU cores; large a few hours on 64 chips.
Metric:   held-out click AUC of the ranker on synthetic feed logs (target: tiny > 0.6);
          `lf-jax plan` prints one row per table with bytes, strategy and reason.

Sizes (rows): tiny ~5e3 members / 2e3 hashtags; small 2e5 / 5e4; large 4e6 members
and a 1e7-row hashtag table. The member table is shared by member_id, actor_id,
root_actor_id and history_actors; the hashtag table by post_hashtags and
history_hashtags. ``embedding.plan`` is empty: the planner chooses every strategy
under ``embedding.memory_budget_bytes`` per device; a hand plan may name some tables,
e.g. ``{"member": {"strategy": "row_wise", "axes": ("data", "model")}}``.
"""

import ml_collections

from lf_jax.configuration import ConfigError, parse_config_arg

SIZES = {
    #         members     hashtags   dim_m dim_h history hashtags batch  budget (bytes/device)
    "tiny": (5_000, 2_000, 32, 16, 10, 5, 128, 4_000_000),
    "small": (200_000, 50_000, 64, 32, 50, 10, 1_024, 128_000_000),
    "large": (4_000_000, 10_000_000, 128, 64, 50, 10, 16_384, 8_000_000_000),
}
TRAIN = {  # steps, eval_every, checkpoint_every, num_impressions
    "tiny": (200, 50, 100, 50_000),
    "small": (5_000, 500, 1_000, 2_000_000),
    "large": (200_000, 5_000, 10_000, 2_000_000_000),
}


def _embedding(size: str) -> ml_collections.ConfigDict:
    members, hashtags, dim_m, dim_h, history, max_tags, _, budget = SIZES[size]
    adagrad = {"kind": "rowwise_adagrad", "learning_rate": 0.05, "initial_accumulator": 0.1}
    adam = {"kind": "adam", "learning_rate": 0.01}
    tables = {
        "member": {"vocab_size": members, "dim": dim_m, "initializer": "normal",
                   "optimizer": dict(adagrad)},
        "hashtag": {"vocab_size": hashtags, "dim": dim_h, "initializer": "normal",
                    "optimizer": dict(adagrad)},
        "position": {"vocab_size": 50, "dim": 8, "initializer": "normal", "optimizer": dict(adam)},
        "post_type": {"vocab_size": 8, "dim": 8, "initializer": "normal", "optimizer": dict(adam)},
    }
    one = {"max_ids": 1, "combiner": "sum", "weighted": False}
    features = {
        "member_id": {"table": "member", **one},
        "actor_id": {"table": "member", **one},
        "root_actor_id": {"table": "member", **one},
        "post_hashtags": {"table": "hashtag", "max_ids": max_tags, "combiner": "mean",
                          "weighted": False},
        "history_actors": {"table": "member", "max_ids": history, "combiner": "mean",
                           "weighted": False},
        "history_hashtags": {"table": "hashtag", "max_ids": history, "combiner": "mean",
                             "weighted": False},
        "position": {"table": "position", **one},
        "post_type": {"table": "post_type", **one},
    }
    return ml_collections.ConfigDict({"tables": tables, "features": features, "plan": {},
                                      "memory_budget_bytes": budget})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"size": "tiny"})
    size = args["size"]
    if size not in SIZES:
        raise ConfigError(f"config argument 'size' must be one of {sorted(SIZES)}, got {size!r}")
    members, hashtags, _, _, history, max_tags, batch, _ = SIZES[size]
    steps, eval_every, checkpoint_every, impressions = TRAIN[size]

    config = ml_collections.ConfigDict()
    config.size = size
    config.devices = 8
    config.mesh = ml_collections.ConfigDict({"data": 2, "model": -1})
    config.seed = 0
    config.batch_size = batch
    config.embedding = _embedding(size)
    config.model = ml_collections.ConfigDict({
        "tasks": ("click", "like", "comment", "share"),
        "num_dense_features": 16,
        "gatenet": True,
        "dcn_layers": 2,
        "dcn_low_rank": 0 if size == "tiny" else 64,  # 0: full-rank DCNv2
        "mlp_dims": (256, 128) if size == "tiny" else (1024, 512, 256),
    })
    config.train = ml_collections.ConfigDict({
        "steps": steps,
        "learning_rate": 1e-3,  # dense parameters (adam); tables use their own optimizers
        "warmup_steps": steps // 20,
        "grad_accum_steps": 1,
        "eval_every": eval_every,
        "eval_batches": 20,
        "checkpoint_every": checkpoint_every,
        "log_every": max(eval_every // 5, 1),
        "seed": 0,
    })
    config.data = ml_collections.ConfigDict({
        "num_members": members,
        "num_hashtags": hashtags,
        "num_impressions": impressions,
        "history_length": history,
        "max_post_hashtags": max_tags,
        "num_positions": 50,
        "num_post_types": 8,
        "random_session_fraction": 0.05,  # impressions shown in random order, for IPS weights
        "eval_fraction": 0.1,
        "seed": 1,
    })
    return config
