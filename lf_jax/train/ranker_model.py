"""The feed ranker apart from its training: dataset metadata, tables, plan, collection, model.

``RankerModel.from_config`` is everything training, export and serving share: it opens the
feed_logs dataset of ``config.data`` (process 0 builds it when missing), turns
``config.embedding`` into table and feature specs (warm start applied, vocab sizes checked
against the dataset), plans the tables on ``mesh`` (hand plan entries win) and builds the
FeedRanker of ``config.model``. It writes nothing; the training task adds the data
pipeline, IPS weights, optimizer and plan.json (lf_jax/train/ranker.py).

Example:
    >>> ranker = RankerModel.from_config(config, mesh)
    >>> state = ranker.init_state(dense_optimizer(config.train), seed=config.seed)
    >>> ranker.collection.tables["member"].vocab_size, ranker.tasks
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.console import get_logger
from lf_jax.distributed.coordination import barrier, is_primary
from lf_jax.embedding.bag_exchange import EXCHANGE_MODES
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.config_specs import memory_budget_from_config, specs_from_config
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.errors import UserInputError
from lf_jax.input.datasets import build_dataset, dataset_metadata, open_built_dataset
from lf_jax.losses import weighted_bce
from lf_jax.models.ranker import FeedRanker
from lf_jax.planner import plan_tables
from lf_jax.train.step import init_train_state
from lf_jax.train.warm_start import snapshot_vocabulary

OOV_TABLES = ("member", "hashtag", "post")
VOCAB_OF_TABLE = {
    "member": "num_members",
    "hashtag": "num_hashtags",
    "post": "num_posts",
    "position": "num_positions",
}


def ranker_loss(model: FeedRanker, activations, micro_batch) -> tuple[jax.Array, jax.Array]:
    """The feed ranker's loss for ``make_train_step``, ``lf-jax train`` and ``lf_jax.Ranker``
    alike: the sum over tasks of (IPS-)weighted BCE; aux the per-task losses [T]."""
    logits_bt = model(activations, micro_batch["dense"])
    per_task_t = weighted_bce(logits_bt, micro_batch["labels"], micro_batch["weights"])
    return jnp.sum(per_task_t), per_task_t


def ranker_probs(model: FeedRanker, activations, batch) -> jax.Array:
    """Probabilities [B, T] (``make_eval_step``'s predict_fn of both paths)."""
    return jax.nn.sigmoid(model(activations, batch["dense"]))


def train_stats(builder) -> dict:
    """The ``train_stats`` the feed_logs builder stores with the dataset (dense mean/std,
    per-position impressions and labels of random and ranked sessions)."""
    stats = dict(builder.info.metadata or {}).get("train_stats")
    if stats is None:
        raise UserInputError(
            f"dataset {builder.name}/{builder.builder_config.name} in "
            f"'{builder.data_dir}' has no train_stats in its metadata: "
            "rebuild it with this version of data/feed_logs"
        )
    return stats


def dense_feature_stats(builder) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std [K] of the dense features over the train split (from train_stats)."""
    stats = train_stats(builder)
    mean_k, std_k = np.asarray(stats["dense_mean"]), np.asarray(stats["dense_std"])
    return mean_k.astype(np.float32), np.maximum(std_k, 1e-6).astype(np.float32)


def open_feed_logs(config):
    """The tfds builder of ``config.data``: process 0 builds a missing dataset, then the rest."""
    builder = None
    for builds_now in (is_primary(), not is_primary()):
        if builds_now:
            builder = build_dataset(
                config.data.dataset, config.data.config, config.data.data_dir or None
            )
        barrier("lf_jax.dataset_prepared")
    return builder


def ranker_specs(config, meta: dict) -> tuple[list, list, dict]:
    """(tables, features, hand plan) of ``config.embedding`` for the dataset ``meta``:
    the warm start snapshot applied, each id table checked to hold the dataset's ids."""
    tables, features, hand_plan = specs_from_config(config.embedding)
    entities = {t.name: int(meta.get(VOCAB_OF_TABLE.get(t.name, ""), 0)) for t in tables}
    if config.train.get("warm_start"):
        tables, features, notes = snapshot_vocabulary(
            tables, features, config.train.warm_start, entities
        )
        for note in notes:
            get_logger().warning("warm start: %s", note)
        entities = {t.name: min(entities[t.name], t.vocab_size - 1) for t in tables}
    for table in tables:
        oov = table.name in OOV_TABLES  # id tables keep their last row for OOV
        if table.dynamic is not None:  # ids are keys; vocab_size is a capacity, any size
            continue
        if table.name in VOCAB_OF_TABLE and table.vocab_size < entities[table.name] + oov:
            raise UserInputError(
                f"config embedding.tables.{table.name}.vocab_size={table.vocab_size} is too "
                f"small for the dataset's {VOCAB_OF_TABLE[table.name]}={entities[table.name]}"
                + (" plus the OOV row (the last row)" if oov else "")
            )
    return tables, features, hand_plan


@dataclasses.dataclass(kw_only=True)
class RankerModel:
    """The feed ranker of a config on a mesh (see the module docstring)."""

    mesh: Any
    builder: Any  # the feed_logs tfds builder
    meta: dict  # dataset_metadata(builder)
    tasks: tuple[str, ...]
    dense_mean_k: np.ndarray
    dense_std_k: np.ndarray
    plan: Any  # PlanResult: .plan and .format_table()
    collection: EmbeddingCollection
    dynamic: DynamicTables | None  # the key -> row maps of dynamic tables, if any
    graphdef: Any
    params: Any  # the model's initial parameters (host)

    @classmethod
    def from_config(
        cls, config, mesh, *, micro_batches: int = 1, build: bool = True
    ) -> "RankerModel":
        """``build=False`` (export, serving, ``Ranker.from_workdir``): the dataset must be
        built already; it is read from its files, without the builder code in data/."""
        builder = (
            open_feed_logs(config)
            if build
            else open_built_dataset(
                config.data.dataset, config.data.config, config.data.data_dir or None
            )
        )
        meta = dataset_metadata(builder)
        tables, features, hand_plan = ranker_specs(config, meta)
        exchange = config.embedding.get("exchange", "auto")
        if exchange not in EXCHANGE_MODES:
            raise UserInputError(
                f"config embedding.exchange={exchange!r} must be one of {EXCHANGE_MODES}"
            )
        dynamic_names = [t.name for t in tables if t.dynamic is not None]
        devices = int(np.prod(list(mesh.shape.values())))
        plan = plan_tables(
            tables,
            features,
            dict(mesh.shape),
            config.batch_size // micro_batches,
            memory_budget_from_config(config.embedding),
            hand_plan,
            device_count=devices,
        )
        collection = EmbeddingCollection(tables, features, plan.plan, mesh, exchange=exchange)
        dynamic = DynamicTables(collection) if dynamic_names else None
        tasks = tuple(meta["tasks"])
        model = FeedRanker(
            field_dims={f.name: collection.tables[f.table].dim for f in features},
            num_dense=int(meta["dense_dim"]),
            tasks=tasks,
            **config.model.to_dict(),
            rngs=nnx.Rngs(config.seed),
        )
        graphdef, params = nnx.split(model)
        mean_k, std_k = dense_feature_stats(builder)
        return cls(
            mesh=mesh,
            builder=builder,
            meta=meta,
            tasks=tasks,
            dense_mean_k=mean_k,
            dense_std_k=std_k,
            plan=plan,
            collection=collection,
            dynamic=dynamic,
            graphdef=graphdef,
            params=params,
        )

    def init_state(self, tx, seed: int) -> dict:
        """A fresh train state: replicated params, ``tx`` slots, tables from ``seed``;
        with dynamic tables, their empty hash tables as ``state["dynamic"]``."""
        params = jax.device_put(self.params, NamedSharding(self.mesh, PartitionSpec()))
        if self.dynamic is None:
            embedding, index = self.collection.init(jax.random.key(seed)), None
        else:
            both = self.dynamic.init(jax.random.key(seed))
            embedding, index = both["embedding"], both["index"]
        state = jax.jit(lambda p, e: init_train_state(p, tx, e), out_shardings=None)(
            params, embedding
        )
        if index is not None:
            state["dynamic"] = index
        return state

    def preprocess(self, raw_ids):
        """The host ids of the collection's features: a SparseBatch, or a KeyBatch
        (dynamic features as 64-bit keys) when the model has dynamic tables."""
        if self.dynamic is None:
            return self.collection.preprocess(raw_ids)
        return self.dynamic.preprocess(raw_ids)

    def normalize_dense(self, dense_bk) -> np.ndarray:
        """Dense features [B, K] standardized with the train split's mean and std."""
        return (np.asarray(dense_bk, np.float32) - self.dense_mean_k) / self.dense_std_k
