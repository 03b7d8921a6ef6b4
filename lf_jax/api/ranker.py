"""Train the multi-task ranker on your own numpy batches: no config file, no TrainingTask.

Describe the id tables and features (``lf_jax.embedding.TableSpec`` / ``FeatureSpec``),
hand in any iterable of batches, then save a directory that ``Ranker.load`` turns back
into a scoring model on any mesh, without the training code's config or simulator. The
pieces are the ones ``lf-jax train`` uses: the planner, ``EmbeddingCollection``, the
``FeedRanker`` model and the jitted train step with sparse row updates.

A batch is a dict of numpy arrays (B examples): one entry per feature (ids [B] or [B, L]
padded with -1, or any form ``EmbeddingCollection.preprocess`` takes), ``"dense"`` [B, K]
float features, and for ``fit`` ``"labels"`` [B, T] in {0, 1} (or {task: [B]}) plus
optional ``"weights"`` [B, T]. Every training batch holds ``batch_size`` examples.

Example:
    >>> import lf_jax
    >>> from lf_jax import embedding as emb
    >>> ranker = lf_jax.Ranker(
    ...     tables=[emb.TableSpec(name="user", vocab_size=1000, dim=16)],
    ...     features=[emb.FeatureSpec(name="user", table="user")],
    ...     num_dense=2, tasks=("click",), batch_size=256)
    >>> history = ranker.fit(batches, steps=200)     # a list of batch dicts, or a generator
    >>> probs_bt = ranker.predict(batch)              # [B, T] probabilities
    >>> ranker.save("my_ranker")
    >>> lf_jax.Ranker.load("my_ranker").predict(batch)
"""

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lf_jax
from lf_jax.api.params_npz import load_params, save_params
from lf_jax.api.ranker_dynamic import find_rows, fresh_state, load_dynamic, save_dynamic
from lf_jax.console import ensure_logging, get_logger, progress
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.sparse_optim import from_config as optimizer_from_config
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError
from lf_jax.models.ranker import FeedRanker
from lf_jax.workdir import ensure_writable_dir, reject_remote

MANIFEST = "ranker.json"
SMALL_MODEL = {"mlp_dims": (64, 32), "dcn_layers": 1, "dot_interactions": True}


def _table_json(table: TableSpec) -> dict:
    values = dataclasses.asdict(table)
    values["optimizer"] = {"kind": table.optimizer.kind, **dataclasses.asdict(table.optimizer)}
    return values


def _table_from_json(values: Mapping) -> TableSpec:
    optimizer = dict(values["optimizer"])
    dynamic = values.get("dynamic")
    return TableSpec(
        **{
            **values,
            "optimizer": optimizer_from_config(optimizer.pop("kind"), **optimizer),
            "dynamic": None if dynamic is None else DynamicPolicy(**dynamic),
        }
    )


class Ranker:
    """A multi-task ranker over sparse id features and dense features (see the module
    docstring). ``model`` holds FeedRanker options (``mlp_dims``, ``dcn_layers``,
    ``gatenet``, ...); ``plan`` a partial hand plan; ``mesh`` a shape like
    ``{"data": -1}`` over every device of the process; ``dense_mean``/``dense_std`` [K]
    standardise the dense features before the model (``from_workdir`` sets them to the
    training run's). Tables with ``dynamic=DynamicPolicy(...)`` take 64-bit keys
    (``lf_jax.api.ranker_dynamic``): ``index`` holds their hash tables, ``fit`` inserts
    keys as ``lf-jax train`` does and ``predict`` reads a key the tables do not hold as
    padding, as evaluation does."""

    def __init__(
        self,
        tables: Sequence[TableSpec],
        features: Sequence[FeatureSpec],
        *,
        num_dense: int,
        tasks: Sequence[str],
        batch_size: int,
        mesh: Mapping[str, int] | None = None,
        model: Mapping[str, Any] | None = None,
        plan: Mapping[str, Mapping] | None = None,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-5,
        memory_budget_bytes: int = 2_000_000_000,
        seed: int = 0,
        dense_mean: Sequence[float] | None = None,
        dense_std: Sequence[float] | None = None,
    ):
        from lf_jax.distributed.mesh import make_mesh
        from lf_jax.planner import plan_tables

        if jax.process_count() > 1:
            raise UserInputError(
                "lf_jax.Ranker drives the devices of one process; for several processes "
                "train with `lf-jax train` (lf_jax.train.loop.train_and_evaluate)"
            )
        self.tables, self.features = list(tables), list(features)
        self.num_dense, self.tasks = int(num_dense), tuple(tasks)
        self.model_options = {**SMALL_MODEL, **dict(model or {})}
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.learning_rate, self.weight_decay = float(learning_rate), float(weight_decay)
        self.dense_stats = None
        if (dense_mean is None) != (dense_std is None):
            raise UserInputError("Ranker: pass dense_mean and dense_std together (or neither)")
        if dense_mean is not None and dense_std is not None:
            stats = np.asarray(dense_mean, np.float32), np.asarray(dense_std, np.float32)
            if any(x.shape != (self.num_dense,) for x in stats) or stats[1].min() <= 0:
                raise UserInputError(
                    f"Ranker: dense_mean and dense_std must be [{self.num_dense}] "
                    f"(std > 0), got shapes {stats[0].shape} and {stats[1].shape}"
                )
            self.dense_stats = stats
        self.mesh = make_mesh(dict(mesh or {"data": -1}))
        devices = int(np.prod(list(self.mesh.shape.values())))
        if self.batch_size % devices:
            raise UserInputError(
                f"batch_size={self.batch_size} must be a multiple of the {devices} devices"
            )
        self.plan = plan_tables(
            self.tables,
            self.features,
            dict(self.mesh.shape),
            self.batch_size,
            memory_budget_bytes,
            plan,
            device_count=devices,
        )
        self.collection = EmbeddingCollection(self.tables, self.features, self.plan.plan, self.mesh)
        network = FeedRanker(
            field_dims={f.name: self.collection.tables[f.table].dim for f in self.features},
            num_dense=self.num_dense,
            tasks=self.tasks,
            **self.model_options,
            rngs=nnx.Rngs(self.seed),
        )
        self.graphdef, params = nnx.split(network)
        self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        # with dynamic tables: their DynamicTables and hash tables [S, ...] (else None)
        self.dynamic, self.embedding, self.index = fresh_state(self.collection, self.seed)
        self._rows = NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names)))
        self._micro_rows = NamedSharding(
            self.mesh, PartitionSpec(None, tuple(self.mesh.axis_names))
        )
        self._predict: Callable | None = None
        self._find: Callable | None = None  # dynamic tables: jit(find keys)
        self.steps_trained = 0

    # ----- inputs ---------------------------------------------------------------------------
    def _inputs(self, batch: Mapping, *, labels: bool) -> dict:
        missing = [f.name for f in self.features if f.name not in batch] + [
            key for key in ("dense", *(("labels",) if labels else ())) if key not in batch
        ]
        if missing:
            raise UserInputError(f"batch has no {missing} (keys: {sorted(batch)})")
        dense = np.asarray(batch["dense"], np.float32)
        if dense.ndim != 2 or dense.shape[1] != self.num_dense:
            raise UserInputError(
                f"batch 'dense' must be [B, {self.num_dense}], got shape {dense.shape}"
            )
        if self.dense_stats is not None:  # standardised as in training
            dense = (dense - self.dense_stats[0]) / self.dense_stats[1]
        ids = {f.name: batch[f.name] for f in self.features}
        inputs = {
            "sparse": self.collection.preprocess(ids)
            if self.dynamic is None
            else self.dynamic.preprocess(ids),  # a KeyBatch: dynamic features as keys
            "dense": dense,
        }
        if labels:
            raw = batch["labels"]
            if isinstance(raw, Mapping):
                raw = np.stack([np.asarray(raw[task]) for task in self.tasks], axis=1)
            labels_bt = np.asarray(raw, np.float32).reshape(len(dense), -1)
            if labels_bt.shape[1] != len(self.tasks):
                raise UserInputError(
                    f"batch 'labels' must be [B, {len(self.tasks)}] for tasks {self.tasks}, "
                    f"got shape {np.shape(batch['labels'])}"
                )
            inputs["labels"] = labels_bt
            weights = batch.get("weights")
            inputs["weights"] = (
                np.ones_like(labels_bt) if weights is None else np.asarray(weights, np.float32)
            )
        return inputs

    # ----- training ------------------------------------------------------------------------
    def fit(
        self,
        batches: Iterable[Mapping],
        steps: int,
        *,
        warmup_steps: int | None = None,
        log_every: int | None = None,
    ) -> list[dict]:
        """Trains ``steps`` steps (a list or other re-iterable is cycled; an exhausted
        iterator is an error); returns one row per ``log_every`` steps (default steps/10)
        with the loss of each task. Shows a progress bar (Jupyter included) and about ten
        INFO lines."""
        from lf_jax.train.dynamic_step import make_dynamic_train_step
        from lf_jax.train.ranker_model import ranker_loss
        from lf_jax.train.step import dense_optimizer, init_train_state, make_train_step

        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserInputError(f"fit: steps must be an integer >= 1, got {steps!r}")
        log_every = log_every or max(steps // 10, 1)
        info_every = log_every * max((steps // 10) // log_every, 1)  # about 10 INFO lines
        ensure_logging()
        train = SimpleNamespace(
            steps=steps,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_steps=max(steps // 20, 1) if warmup_steps is None else warmup_steps,
        )
        tx = dense_optimizer(train)
        state = jax.jit(lambda p, e: init_train_state(p, tx, e))(self.params, self.embedding)
        step_fn: Callable
        if self.dynamic is None:
            step_fn = make_train_step(self.graphdef, self.collection, tx, ranker_loss)
        else:  # keys found, admitted, inserted or evicted first, as in `lf-jax train`
            state["dynamic"] = self.index
            step_fn = make_dynamic_train_step(self.dynamic, self.graphdef, tx, ranker_loss)
        history: list[dict] = []
        iterator = iter(batches)
        done = 0
        try:
            with progress(total=steps, desc="fit", unit="step") as bar:
                for step in range(1, steps + 1):
                    placed = self._next_train_batch(batches, iterator, step, steps)
                    if placed is None:  # a re-iterable (a list): a new epoch
                        iterator = iter(batches)
                        placed = self._next_train_batch(batches, iterator, step, steps)
                    if placed is None:
                        raise UserInputError("fit: batches holds no batch")
                    state, metrics = step_fn(state, placed)  # state donated
                    done = step
                    bar.update(1)
                    if step % log_every == 0 or step == steps:
                        history.append(self._row(self.steps_trained + step, metrics))
                        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                        if step % info_every == 0 or step == steps:
                            get_logger().info(
                                "fit step %d/%d loss %.4f", step, steps, history[-1]["loss"]
                            )
        finally:  # the latest state, also when a bad batch stops the run half way
            self.params, self.embedding = state["params"], state["embedding"]
            self.index = state.get("dynamic")
            self.steps_trained += done
        return history

    def _next_train_batch(self, batches, iterator, step: int, steps: int) -> dict | None:
        """The next batch placed on the mesh [1, B, ...]; None when a re-iterable ran out."""
        batch = next(iterator, None)
        if batch is None:
            if iter(batches) is not batches:
                return None
            raise UserInputError(
                f"fit: the batches ran out after {step - 1} steps of {steps}; pass "
                "fewer steps or a list (lists are cycled)"
            )
        inputs = self._inputs(batch, labels=True)
        if len(inputs["dense"]) != self.batch_size:
            raise UserInputError(
                f"fit: batch {step} holds {len(inputs['dense'])} examples; every "
                f"training batch must hold batch_size={self.batch_size}"
            )
        return jax.tree.map(lambda x: jax.device_put(x[None], self._micro_rows), inputs)

    def _row(self, step: int, metrics) -> dict:
        aux = np.atleast_1d(np.asarray(metrics["aux"]))
        row = {"step": step, "loss": float(metrics["loss"])}
        row.update({f"loss_{t}": float(v) for t, v in zip(self.tasks, aux, strict=True)})
        row.update({k: float(v) for k, v in metrics.get("scalars", {}).items()})  # dynamic/...
        return row

    # ----- scoring -------------------------------------------------------------------------
    def predict(self, batch: Mapping) -> np.ndarray:
        """Probabilities [B, T] (column t: task ``tasks[t]``) of a batch of any size."""
        from lf_jax.train.ranker_model import ranker_probs
        from lf_jax.train.step import make_eval_step

        if self._predict is None:
            self._predict = make_eval_step(self.graphdef, self.collection, ranker_probs)
        inputs = self._inputs(batch, labels=False)
        size = len(inputs["dense"])
        devices = self.mesh.size
        pad = -size % devices

        def padded(path, x):  # ids with -1 (padding); weights, keys, validity, dense 0
            fill = -1 if any(getattr(k, "name", None) == "ids" for k in path) else 0
            x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return jax.device_put(x, self._rows)

        placed = jax.tree_util.tree_map_with_path(padded, inputs)
        if self.dynamic is not None:  # keys -> rows of the keys held (others: padding)
            placed["sparse"] = find_rows(self, placed["sparse"])
        out = self._predict(self.params, self.embedding["tables"], placed)
        return np.asarray(out)[:size]

    # ----- save / load ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Writes ranker.json (specs, tasks, model options), params.npz and tables.npz
        (logical [vocab, dim] tables), with dynamic tables dynamic.npz (their hash tables
        and optimizer slots): everything ``Ranker.load`` needs."""
        reject_remote(directory, "save directory")
        directory = ensure_writable_dir(directory, "save directory")
        manifest = {
            "lf_jax_version": lf_jax.__version__,
            "tables": [_table_json(t) for t in self.tables],
            "features": [dataclasses.asdict(f) for f in self.features],
            "num_dense": self.num_dense,
            "tasks": list(self.tasks),
            "batch_size": self.batch_size,
            "model": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.model_options.items()
            },
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "steps_trained": self.steps_trained,
            "dense_stats": None
            if self.dense_stats is None
            else [x.tolist() for x in self.dense_stats],
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        save_params(directory / "params.npz", self.params)
        tables: dict[str, Any] = self.collection.logical_tables(self.embedding)
        if self.dynamic is not None:  # hash tables [S, ...] and the tables' slots
            save_dynamic(self, directory / "dynamic.npz")
        np.savez(directory / "tables.npz", **tables)
        return directory

    @classmethod
    def from_workdir(
        cls,
        workdir: str | Path,
        *,
        step: int | None = None,
        mesh: Mapping[str, int] | None = None,
    ) -> "Ranker":
        """The feed ranker trained by ``lf-jax train`` in ``workdir`` (newest checkpoint or
        ``step``) as a Ranker; see ``lf_jax.api.ranker_run``."""
        from lf_jax.api.ranker_run import ranker_from_workdir

        return ranker_from_workdir(workdir, step=step, mesh=mesh)

    @classmethod
    def load(cls, directory: str | Path, *, mesh: Mapping[str, int] | None = None) -> "Ranker":
        """The ranker saved in ``directory``, placed on ``mesh`` (default: every device on
        one "data" axis; tables are re-planned for it)."""
        reject_remote(directory, "load directory")
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UserInputError(f"'{directory}' holds no {MANIFEST}: not a saved Ranker")
        manifest = json.loads(path.read_text())
        ranker = cls(
            [_table_from_json(t) for t in manifest["tables"]],
            [FeatureSpec(**f) for f in manifest["features"]],
            num_dense=manifest["num_dense"],
            tasks=manifest["tasks"],
            batch_size=manifest["batch_size"],
            mesh=mesh,
            model={k: tuple(v) if isinstance(v, list) else v for k, v in manifest["model"].items()},
            learning_rate=manifest["learning_rate"],
            weight_decay=manifest["weight_decay"],
            seed=manifest["seed"],
            dense_mean=(manifest.get("dense_stats") or [None, None])[0],
            dense_std=(manifest.get("dense_stats") or [None, None])[1],
        )
        params = load_params(Path(directory) / "params.npz", ranker.params)
        ranker.params = jax.device_put(params, NamedSharding(ranker.mesh, PartitionSpec()))
        with np.load(Path(directory) / "tables.npz") as saved:
            tables = {name: saved[name] for name in saved.files}
        if ranker.dynamic is None:
            ranker.embedding = ranker.collection.state_from_logical(tables)
        else:  # hash tables as saved, or rehashed onto this mesh's shards
            load_dynamic(ranker, Path(directory) / "dynamic.npz", tables)
        ranker.steps_trained = int(manifest["steps_trained"])
        return ranker
