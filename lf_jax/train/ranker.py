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
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.checks import check_int
from lf_jax.console import get_logger
from lf_jax.distributed.coordination import barrier, is_primary
from lf_jax.embedding.config_specs import dynamic_expected_keys
from lf_jax.embedding.dynamic.report import explain, format_rows
from lf_jax.embedding.plan import save_plan
from lf_jax.errors import UserInputError
from lf_jax.input.feed_pipeline import EvalReader, train_iterator
from lf_jax.train.batch import check_micro_batches, place_batch
from lf_jax.train.dynamic_step import dynamic_eval_metrics, make_dynamic_resolve
from lf_jax.train.ips import IpsWeights, ips_weights_from_counts
from lf_jax.train.metrics import binary_metrics
from lf_jax.train.ranker_model import RankerModel, ranker_loss, ranker_probs, train_stats
from lf_jax.train.step import dense_optimizer, make_eval_step

HOLDOUTS = ("holdout_ranked", "holdout_random")


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
    stats = train_stats(builder)
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


def check_training_config(config, devices: int) -> None:
    """The training settings of ``config`` that the model does not check itself."""
    check_micro_batches(
        config.batch_size, config.train.grad_accum_steps, devices, f"the {devices} devices"
    )
    check_int(
        f"config data.worker_count={config.data.worker_count!r}",
        config.data.worker_count,
        minimum=0,
        hint=" (grain worker processes; 0 decodes in this process)",
    )
    if config.train.ips_target not in ("all", "positives"):
        raise UserInputError(
            f"config train.ips_target={config.train.ips_target!r} must be 'all' or 'positives'"
        )


class RankerTask:
    """TrainingTask of the feed ranker (see lf_jax.train.loop.TrainingTask)."""

    def __init__(self, config, mesh, workdir: str | Path):
        self.config, self.mesh, self.workdir = config, mesh, Path(workdir)
        self.num_micro = config.train.grad_accum_steps
        check_training_config(config, int(np.prod(list(mesh.shape.values()))))
        self.ranker = RankerModel.from_config(config, mesh, micro_batches=self.num_micro)
        self.builder, self.meta = self.ranker.builder, self.ranker.meta
        if config.data.order == "time" and "arrivals" not in self.meta:
            raise UserInputError(
                f"config data.order='time' needs a dataset stored in time order (feed_logs "
                f"config tiny_arrivals), got feed_logs/{config.data.config}, whose records "
                "are stored shuffled"
            )
        self.tasks = self.aux_names = self.ranker.tasks
        self.collection, self.graphdef = self.ranker.collection, self.ranker.graphdef
        self.dynamic = self.ranker.dynamic  # DynamicTables or None (run_training's step)
        self.plan_table = self.ranker.plan.format_table()
        if self.dynamic is not None:
            rows = explain(self.dynamic, expected_keys=dynamic_expected_keys(config.embedding))
            self.plan_table += "\n" + format_rows(rows)
            self._find = make_dynamic_resolve(self.dynamic)
        get_logger().info("embedding plan\n%s", self.plan_table)
        if jax.process_index() == 0:
            save_plan(self.ranker.plan.plan, self.workdir / "plan.json")
        self.max_lengths = {
            n: f.max_ids for n, f in self.collection.features.items() if f.max_ids > 1
        }
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
        self._eval_step = make_eval_step(self.graphdef, self.collection, ranker_probs)

    # ----- TrainingTask ---------------------------------------------------------------------
    def init_state(self) -> dict:
        return self.ranker.init_state(self.tx, self.config.seed)

    loss_fn = staticmethod(ranker_loss)

    def train_iterator(self):
        return train_iterator(
            self.builder,
            "train",
            global_batch_size=self.config.batch_size,
            seed=self.config.data.seed,
            shuffle=self.config.data.order == "shuffled",
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
        sparse = self.ranker.preprocess({name: host[name] for name in self.collection.features})
        labels = np.asarray(host["labels"], np.float32)
        weights = np.ones_like(labels)
        if self.ips is not None:
            weights = self.ips.batch_weights(host["position"], host["random_session"])
            if self.config.train.ips_target == "positives":  # re-rate responses, keep negatives
                weights = np.where(labels > 0, weights, 1.0).astype(np.float32)
        dense = self.ranker.normalize_dense(host["dense"])
        return {"sparse": sparse, "dense": dense, "labels": labels, "weights": weights}

    def device_batch(self, host: Mapping[str, np.ndarray]) -> dict:
        """Global arrays [k, B/k, ...] split over every device on the example axis."""
        inputs = self.model_inputs(host)
        return place_batch(inputs, self.num_micro, self._batch_sharding, rows="local")

    def evaluate(self, state: Mapping) -> dict[str, float]:
        """Per split and task: auc, ne, calibration and oracle_auc (true probabilities);
        with dynamic tables also their counters and occupancy (``dynamic/<table>/...``)."""
        metrics = {}
        sharding = NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names)))
        for split in HOLDOUTS:
            reader = EvalReader(
                self.builder,
                split,
                global_batch_size=self.config.data.eval_batch_size,
                max_lengths=self._list_lengths(),
                max_examples=self.config.data.get("eval_examples", 0) or None,
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
                if self.dynamic is not None:  # keys found, none inserted
                    batch["sparse"] = self._find(state, batch["sparse"])
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
        if self.dynamic is not None:
            metrics.update(dynamic_eval_metrics(self.dynamic, state))
        return metrics
