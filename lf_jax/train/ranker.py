"""The feed ranker's TrainingTask: feed_logs data -> embedding collection -> FeedRanker.

Builds (offline) the feed_logs dataset of ``config.data``, plans the embedding tables
(hand plan entries win), computes or loads the IPS weights of the run, and provides the
loss (IPS-weighted multi-task BCE), device batches with a micro-batch axis, and the
evaluation on the ranked- and random-session holdouts (AUC, NE, calibration, oracle AUC).

Example:
    >>> task = RankerTask(config, make_mesh(dict(config.mesh)), workdir)
    >>> metrics = run_training(task, config.train, workdir)
"""

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.console import get_logger
from lf_jax.distributed.multihost import barrier, is_primary
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.config_specs import memory_budget_from_config, specs_from_config
from lf_jax.embedding.plan import save_plan
from lf_jax.errors import UserInputError
from lf_jax.input.datasets import build_dataset, dataset_metadata
from lf_jax.input.feed_pipeline import EvalReader, train_iterator
from lf_jax.losses import weighted_bce
from lf_jax.models.ranker import FeedRanker
from lf_jax.planner import plan_tables
from lf_jax.train.ips import IpsWeights, ips_weights_from_counts
from lf_jax.train.metrics import binary_metrics
from lf_jax.train.step import dense_optimizer, init_train_state, make_eval_step
from lf_jax.train.warm_start import snapshot_vocabulary

HOLDOUTS = ("holdout_ranked", "holdout_random")
OOV_TABLES = ("member", "hashtag", "post")
VOCAB_OF_TABLE = {
    "member": "num_members",
    "hashtag": "num_hashtags",
    "post": "num_posts",
    "position": "num_positions",
}


def _train_stats(builder) -> dict:
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
    stats = _train_stats(builder)
    mean_k, std_k = np.asarray(stats["dense_mean"]), np.asarray(stats["dense_std"])
    return mean_k.astype(np.float32), np.maximum(std_k, 1e-6).astype(np.float32)


def _gather(x: np.ndarray) -> np.ndarray:
    """Concatenates a per-process host array over processes (identity on one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def ips_weights_for_run(builder, tasks, clip, path: Path, fit: str = "power_law") -> IpsWeights:
    """Loads ``path`` or computes the weights from the train split's per-position counts
    (train_stats) and writes them there."""
    exists = path.exists()
    barrier("lf_jax.ips_weights")  # every process decides before process 0 writes the file
    if exists:
        return IpsWeights.load(path)
    stats = _train_stats(builder)
    ips = ips_weights_from_counts(
        **{
            key: stats[key]
            for key in ("count_random_p", "clicks_random_pt", "count_ranked_p", "clicks_ranked_pt")
        },
        tasks=tasks,
        clip=tuple(clip),
        fit=fit,
    )
    if is_primary():
        ips.save(path)
    get_logger().info(
        "IPS weights for %d positions x %d tasks (range %.2f-%.2f) -> %s",
        *ips.weights_pt.shape,
        ips.weights_pt.min(),
        ips.weights_pt.max(),
        path,
    )
    get_logger().debug("IPS weights per position\n%s", ips.format_table())
    return ips


class RankerTask:
    """TrainingTask of the feed ranker (see lf_jax.train.loop.TrainingTask)."""

    def __init__(self, config, mesh, workdir: str | Path):
        self.config, self.mesh, self.workdir = config, mesh, Path(workdir)
        log = get_logger()
        for builds_now in (is_primary(), not is_primary()):  # process 0 prepares, then the rest
            if builds_now:
                self.builder = build_dataset(
                    config.data.dataset, config.data.config, config.data.data_dir or None
                )
            barrier("lf_jax.dataset_prepared")
        self.meta = dataset_metadata(self.builder)
        self.tasks = tuple(self.meta["tasks"])
        self.aux_names = self.tasks
        self.dense_mean_k, self.dense_std_k = dense_feature_stats(self.builder)
        tables, features, hand_plan = specs_from_config(config.embedding)
        entities = {t.name: int(self.meta.get(VOCAB_OF_TABLE.get(t.name, ""), 0)) for t in tables}
        if config.train.get("warm_start"):
            tables, features, notes = snapshot_vocabulary(
                tables, features, config.train.warm_start, entities
            )
            for note in notes:
                get_logger().warning("warm start: %s", note)
            entities = {t.name: min(entities[t.name], t.vocab_size - 1) for t in tables}
        for table in tables:
            oov = table.name in OOV_TABLES  # id tables keep their last row for OOV
            if table.name in VOCAB_OF_TABLE and table.vocab_size < entities[table.name] + oov:
                raise UserInputError(
                    f"config embedding.tables.{table.name}.vocab_size={table.vocab_size} is too small "
                    f"for the dataset's {VOCAB_OF_TABLE[table.name]}={entities[table.name]}"
                    + (" plus the OOV row (the last row)" if oov else "")
                )
        devices = int(np.prod(list(mesh.shape.values())))
        self.num_micro = config.train.grad_accum_steps
        if self.num_micro < 1 or config.batch_size % (self.num_micro * devices):
            raise UserInputError(
                f"config batch_size={config.batch_size} must split into "
                f"train.grad_accum_steps={self.num_micro} micro-batches of a "
                f"multiple of the {devices} devices"
            )
        workers = config.data.worker_count
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise UserInputError(
                f"config data.worker_count={workers!r} must be an int >= 0 "
                "(grain worker processes; 0 decodes in this process)"
            )
        if config.train.ips_target not in ("all", "positives"):
            raise UserInputError(
                f"config train.ips_target={config.train.ips_target!r} must be 'all' or 'positives'"
            )
        result = plan_tables(
            tables,
            features,
            dict(mesh.shape),
            config.batch_size // self.num_micro,
            memory_budget_from_config(config.embedding),
            hand_plan,
            device_count=devices,
        )
        self.plan_table = result.format_table()
        log.info("embedding plan\n%s", self.plan_table)
        if jax.process_index() == 0:
            save_plan(result.plan, self.workdir / "plan.json")
        self.collection = EmbeddingCollection(tables, features, result.plan, mesh)
        self.max_lengths = {f.name: f.max_ids for f in features if f.max_ids > 1}
        field_dims = {f.name: self.collection.tables[f.table].dim for f in features}
        model = FeedRanker(
            field_dims=field_dims,
            num_dense=int(self.meta["dense_dim"]),
            tasks=self.tasks,
            mlp_hidden=tuple(config.model.mlp_dims),
            cross_layers=config.model.dcn_layers,
            cross_low_rank=config.model.dcn_low_rank,
            embedding_gate=config.model.gatenet,
            embedding_gate_vector=config.model.gatenet_vector,
            hidden_gate=config.model.hidden_gates,
            head_hidden=config.model.head_hidden,
            dot_interactions=config.model.dot_interactions,
            rngs=nnx.Rngs(config.seed),
        )
        self.graphdef, self._params = nnx.split(model)
        self.tx = dense_optimizer(config.train)
        self.examples_per_step = config.batch_size
        self.ips = (
            ips_weights_for_run(
                self.builder,
                self.tasks,
                config.train.ips_clip,
                self.workdir / "ips_weights.json",
                fit=config.train.ips_fit,
            )
            if config.train.ips
            else None
        )
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(None, tuple(mesh.axis_names)))
        self._eval_step = make_eval_step(self.graphdef, self.collection, self._predict)

    # ----- TrainingTask ---------------------------------------------------------------------
    def init_state(self) -> dict:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        params = jax.device_put(self._params, replicated)
        embedding = self.collection.init(jax.random.key(self.config.seed))
        return jax.jit(lambda p, e: init_train_state(p, self.tx, e), out_shardings=None)(
            params, embedding
        )

    def loss_fn(self, model, activations, micro_batch):
        logits_bt = model(activations, micro_batch["dense"])
        per_task_t = weighted_bce(logits_bt, micro_batch["labels"], micro_batch["weights"])
        return jnp.sum(per_task_t), per_task_t

    def train_iterator(self):
        return train_iterator(
            self.builder,
            "train",
            global_batch_size=self.config.batch_size,
            seed=self.config.data.seed,
            max_lengths=self._list_lengths(),
            worker_count=self.config.data.worker_count,
        )

    def _list_lengths(self) -> dict[str, int]:
        return {
            name: length
            for name, length in self.max_lengths.items()
            if name in self.meta["max_lengths"]
        }

    def model_inputs(self, host: Mapping[str, np.ndarray]) -> dict:
        """Host batch -> {"sparse", "dense", "labels", "weights"} numpy, validated."""
        sparse = self.collection.preprocess({name: host[name] for name in self.collection.features})
        labels = np.asarray(host["labels"], np.float32)
        weights = np.ones_like(labels)
        if self.ips is not None:
            weights = self.ips.batch_weights(host["position"], host["random_session"])
            if self.config.train.ips_target == "positives":  # re-rate responses, keep negatives
                weights = np.where(labels > 0, weights, 1.0).astype(np.float32)
        dense = (np.asarray(host["dense"], np.float32) - self.dense_mean_k) / self.dense_std_k
        return {"sparse": sparse, "dense": dense, "labels": labels, "weights": weights}

    def device_batch(self, host: Mapping[str, np.ndarray]) -> dict:
        """Global arrays [k, B/k, ...] split over every device on the example axis."""
        k = self.num_micro
        inputs = self.model_inputs(host)

        def place(x):
            local = x.reshape(k, x.shape[0] // k, *x.shape[1:])
            global_shape = (k, local.shape[1] * jax.process_count(), *x.shape[1:])
            return jax.make_array_from_process_local_data(self._batch_sharding, local, global_shape)

        return jax.tree.map(place, inputs)

    def _predict(self, model, activations, batch):
        return jax.nn.sigmoid(model(activations, batch["dense"]))

    def evaluate(self, state: Mapping) -> dict[str, float]:
        """Per split and task: auc, ne, calibration and oracle_auc (true probabilities)."""
        metrics = {}
        sharding = NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names)))
        for split in HOLDOUTS:
            reader = EvalReader(
                self.builder,
                split,
                global_batch_size=self.config.data.eval_batch_size,
                max_lengths=self._list_lengths(),
            )
            probs, labels, oracle, valid = [], [], [], []
            for host in reader:
                inputs = self.model_inputs(host)
                inputs.pop("weights")
                batch = jax.tree.map(
                    lambda x: jax.make_array_from_process_local_data(
                        sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:])
                    ),
                    inputs,
                )
                out = self._eval_step(state["params"], state["embedding"]["tables"], batch)
                probs.append(
                    np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))
                    if jax.process_count() > 1
                    else np.asarray(out)
                )
                labels.append(_gather(host["labels"]))
                oracle.append(_gather(host["true_probs"]))
                valid.append(_gather(host["valid"]))
            mask = np.concatenate(valid)
            split_metrics = binary_metrics(
                np.concatenate(probs)[mask],
                np.concatenate(labels)[mask],
                self.tasks,
                np.concatenate(oracle)[mask],
            )
            metrics.update({f"{split}/{name}": value for name, value in split_metrics.items()})
        return metrics
