"""Multi-task feed ranker on synthetic feed logs: size=tiny | small | large | production.

Command:  lf-jax train --config configs/feed_ranker.py:size=tiny --workdir runs/ranker_tiny
          lf-jax ips   --config configs/feed_ranker.py:size=tiny --workdir runs/ranker_tiny
          lf-jax plan  --config configs/feed_ranker.py:size=large --config.mesh.data=8 \\
                       --config.devices=64          (the embedding plan only; no devices)
          lf-jax plan  --config configs/feed_ranker.py:size=production --config.mesh.data=8 \\
                       --config.devices=64
Devices:  tiny, small: 8 simulated CPU devices, mesh data=2 x model=4.
          large: 64 accelerators, mesh data=8 x model=8 with the overrides above.
          production: the scale of the production feed ranker (3.2 billion parameters:
          member 16M x 64, post 12M x 64, post_text 4M x 256, hashtag 2M x 64,
          author_cluster 2M x 128), 64 devices (8 x 8), 16 GB per device. It has no
          synthetic dataset: it is for `lf-jax plan` and compile-only checks
          (bench/plan_vs_xla.py compiles its full train step on 64 simulated devices).
Time:     see README "Feed ranker" for measured times (tiny: a few minutes on 2 cores).
Metric:   per-task AUC on the random-session holdout next to the oracle AUC of the true
          probabilities (target: within 0.02 on tiny); NE and calibration per task.

Sizes follow data/feed_logs (members, hashtags, posts, positions): tiny 300 / 100 /
1e3 / 20, small 1e5 / 5e3 / 1e5 / 20, large 1e6 / 5e4 / 1e6 / 20. The member table is shared by
member_id,
actor_id, root_actor_id and history_actors; the hashtag table by post_hashtags and
history_hashtags. ``embedding.plan`` is empty, so the planner picks each strategy under
``embedding.memory_budget_bytes``; a hand plan may name some tables, e.g.
``--config.embedding.plan='{"member": {"strategy": "row_wise", "axes": ("data", "model")}}'``.
Dynamic tables: ``feed_ranker:size=tiny,dynamic=0.5`` makes member and post dynamic
tables (64-bit keys, lf_jax.embedding.dynamic) of half the dataset's ids each (rounded
down to a multiple of ``devices``), LRU eviction; their policy is the tables'
``dynamic`` section, e.g. ``--config.embedding.tables.post.dynamic.admit_after=2``;
``dynamic_tables=post`` makes only the post table dynamic (default ``member+post``).
Ids arriving over time: ``--config.data.config=tiny_arrivals --config.data.order=time``
(feed_logs' tiny whose posts and members arrive during the logs, read in time order).
The owner exchange of groups spread over every device (README "Rows, or pooled partial
bags"): ``--config.embedding.exchange=auto`` (default: the traffic picks rows or bags per
group), ``rows`` or ``bags``.
Ablations are one override: ``--config.model.dcn_layers=0``, ``--config.model.gatenet=false``,
``--config.train.ips=false``, ``--config.train.grad_accum_steps=5``.
"""

import ml_collections

from lf_jax.configuration import ConfigError, parse_config_arg

SIZES = {
    #        members    hashtags posts     dim  batch budget (bytes/device)
    "tiny": (300, 100, 1_000, 32, 512, 64_000_000),
    "small": (100_000, 5_000, 100_000, 32, 1_024, 512_000_000),
    "large": (1_000_000, 50_000, 1_000_000, 64, 16_384, 2_000_000_000),
    "production": (16_000_000, 2_000_000, 12_000_000, 64, 16_384, 16_000_000_000),
}
# production only: a post-text embedding table (wide) and member author clusters
PRODUCTION_EXTRA = {  # table: (rows, dim)
    "post_text": (4_000_000, 256),
    "author_cluster": (2_000_000, 128),
}
TRAIN = {  # steps, eval_every, checkpoint_every
    "tiny": (800, 400, 400),
    "small": (5_000, 1_000, 1_000),
    "large": (200_000, 5_000, 10_000),
    "production": (1_000_000, 10_000, 10_000),
}
NUM_POSITIONS = 20
HISTORY_LENGTH = 50
MAX_POST_HASHTAGS = 5


def _dynamic(entities: int, fraction: float, devices: int) -> tuple[int, dict]:
    """(capacity, dynamic section) of an id table holding ``fraction`` of its ids."""
    capacity = max(int(fraction * entities) // devices, 1) * devices
    policy = {
        "eviction": "lru",
        "probe_limit": 8,
        "admit_after": 1,
        "sketch_width": 4096,
        "sketch_depth": 2,
        "ttl_steps": 0,  # 0: keys stay until evicted
        "seed": 0,
        "expected_keys": entities,  # the plan's expected occupancy
    }
    return capacity, policy


DYNAMIC_TABLES = ("member", "post")  # the id tables ``dynamic=<fraction>`` may make dynamic


def _embedding(
    size: str, dynamic: float, devices: int, dynamic_tables: tuple[str, ...] = DYNAMIC_TABLES
) -> ml_collections.ConfigDict:
    members, hashtags, posts, dim, _, budget = SIZES[size]
    # initial_accumulator 0: with a per-example mean loss, row gradients are small and a
    # 0.1 start kept the tables almost frozen (bench/BENCHMARKS.md, feed ranker).
    adagrad = {"kind": "rowwise_adagrad", "learning_rate": 0.05, "initial_accumulator": 0.0}
    tables = {  # id tables: one row per id + a last OOV row (warm start's new ids go there)
        "member": {
            "vocab_size": members + 1,
            "dim": dim,
            "initializer": "normal",
            "optimizer": dict(adagrad),
        },
        "hashtag": {
            "vocab_size": hashtags + 1,
            "dim": dim,
            "initializer": "normal",
            "optimizer": dict(adagrad),
        },
        "post": {
            "vocab_size": posts + 1,
            "dim": dim,
            "initializer": "normal",
            "optimizer": dict(adagrad),
        },
        "position": {
            "vocab_size": NUM_POSITIONS,
            "dim": 8,
            "initializer": "normal",
            "optimizer": {"kind": "adam", "learning_rate": 0.01},
        },
    }
    if dynamic:  # member and post: keys are the dataset's ids, no OOV row
        for name, entities in (("member", members), ("post", posts)):
            if name not in dynamic_tables:
                continue
            capacity, policy = _dynamic(entities, dynamic, devices)
            tables[name].update(vocab_size=capacity, dynamic=policy)
    one = {"max_ids": 1, "combiner": "sum", "weighted": False}
    features = {
        "member_id": {"table": "member", **one},
        "actor_id": {"table": "member", **one},
        "root_actor_id": {"table": "member", **one},
        "post_id": {"table": "post", **one},
        "post_hashtags": {
            "table": "hashtag",
            "max_ids": MAX_POST_HASHTAGS,
            "combiner": "mean",
            "weighted": False,
        },
        "history_actors": {
            "table": "member",
            "max_ids": HISTORY_LENGTH,
            "combiner": "mean",
            "weighted": False,
        },
        "history_hashtags": {
            "table": "hashtag",
            "max_ids": HISTORY_LENGTH,
            "combiner": "mean",
            "weighted": False,
        },
        "position": {"table": "position", **one},
    }
    if size == "production":
        for name, (rows, width) in PRODUCTION_EXTRA.items():
            tables[name] = {
                "vocab_size": rows,
                "dim": width,
                "initializer": "normal",
                "optimizer": dict(adagrad),
            }
            features[name] = {"table": name, **one}
    return ml_collections.ConfigDict(
        {
            "tables": tables,
            "features": features,
            "plan": {},
            "memory_budget_bytes": budget,
            "exchange": "auto",
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"size": "tiny", "dynamic": 0.0, "dynamic_tables": "member+post"})
    size = args["size"]
    if size not in SIZES:
        raise ConfigError(f"config argument 'size' must be one of {sorted(SIZES)}, got {size!r}")
    if not 0.0 <= args["dynamic"] <= 1.0:
        raise ConfigError(
            f"config argument 'dynamic' must be a fraction in [0, 1] (0: static tables), "
            f"got {args['dynamic']!r}"
        )
    dynamic_tables = tuple(args["dynamic_tables"].split("+"))
    unknown = sorted(set(dynamic_tables) - set(DYNAMIC_TABLES))
    if unknown or not dynamic_tables:
        raise ConfigError(
            f"config argument 'dynamic_tables' must name tables of {DYNAMIC_TABLES} joined "
            f"by '+', got {args['dynamic_tables']!r}"
        )
    batch = SIZES[size][4]
    steps, eval_every, checkpoint_every = TRAIN[size]

    config = ml_collections.ConfigDict()
    config.model_family = "feed_ranker"
    config.size = size
    config.devices = 8
    config.mesh = ml_collections.ConfigDict({"data": 2, "model": -1})
    config.seed = 0
    config.batch_size = batch  # global examples per optimizer step (all micro-batches)
    config.embedding = _embedding(size, args["dynamic"], config.devices, dynamic_tables)
    config.model = ml_collections.ConfigDict(
        {
            "gatenet": True,  # GateNet embedding gates
            "gatenet_vector": False,  # one gate per field (False) or per dimension (True)
            "hidden_gates": True,  # GateNet hidden-layer gates in the wide MLP
            "dcn_layers": 2,  # DCNv2 cross layers; 0 switches the cross network off
            "dcn_low_rank": 0 if size == "tiny" else 64,  # 0: full-rank DCNv2
            "mlp_dims": (256, 128) if size == "tiny" else (1024, 512, 256),
            "head_hidden": 0,  # hidden units of each task head (0: linear head)
            "dot_interactions": True,  # pairwise dot products of same-width pooled fields
        }
    )
    config.train = ml_collections.ConfigDict(
        {
            "steps": steps,
            "learning_rate": 2e-3,  # dense parameters (AdamW, warmup + cosine decay)
            "weight_decay": 1e-5,
            "warmup_steps": max(steps // 20, 1),
            "grad_accum_steps": 1,  # micro-batches per step (batch_size is split k ways)
            "ips": True,  # IPS-weight ranked-session impressions
            "ips_clip": (0.2, 5.0),
            "ips_fit": "power_law",  # power_law | per_position (see lf_jax/train/ips.py)
            "ips_target": "all",  # all: weight every ranked impression; positives: only responses
            "eval_every": eval_every,
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": 3,
            "log_every": max(eval_every // 5, 1),
            "warm_start": "",  # workdir of a previous run: start from its last checkpoint
        }
    )
    config.data = ml_collections.ConfigDict(
        {
            "dataset": "feed_logs",
            "config": size,  # data/feed_logs builder config (tiny | tiny_arrivals | small | large)
            "data_dir": "",  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
            "eval_batch_size": 1_024,
            "eval_examples": 0,  # evaluate on each holdout's first N examples (0: all of them)
            "seed": 1,
            # shuffled: every epoch a new permutation; time: the train split as stored, which
            # for a dataset with arrivals (config tiny_arrivals) is time order: new posts and
            # members first appear part-way through training, as they would online
            "order": "shuffled",
            "worker_count": 0,  # grain worker processes decoding train batches (0: threads
            # of the training process); hosts with spare cores: 2-8
        }
    )
    return config
