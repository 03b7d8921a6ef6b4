"""The training loop every model family shares: steps, eval, checkpoints, resume, signals.

A family plugs in through a ``TrainingTask`` (see lf_jax/train/ranker.py): it builds the
embedding collection, the dense model and optimizer, the data iterators and the loss;
this loop does the rest:

  * resumes from the latest checkpoint in ``workdir/checkpoints`` (params, tables, slots,
    step and data-iterator position), so a killed run continues as if never stopped;
  * stops with TrainingDivergedError naming the step and task on a NaN/Inf loss, before
    anything non-finite is saved;
  * on SIGTERM saves a checkpoint and returns cleanly (with several processes, all of
    them at the same step, agreed through JAX's preemption service);
  * logs to TensorBoard (``workdir/tensorboard``) and a tqdm bar (off in CI / non-TTY).

Example:
    >>> metrics = run_training(task, config.train, workdir)
"""

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from lf_jax.console import ensure_logging, get_logger, progress, progress_enabled
from lf_jax.distributed.multihost import is_primary, preemption_notice
from lf_jax.errors import TrainingDivergedError, UserInputError
from lf_jax.train.checkpoint import Checkpointer
from lf_jax.train.families import family_class
from lf_jax.train.step import make_train_step
from lf_jax.workdir import ensure_writable_dir, reject_remote


class TrainingTask(Protocol):
    """``collection`` may be None (no sparse tables). A task with ``grad_cache = True``
    provides ``embed_fn(model, micro_batch)`` and ``contrastive_loss_fn(reps)`` instead of
    using ``loss_fn`` (see lf_jax/train/grad_cache.py)."""

    collection: Any
    graphdef: Any
    tx: Any
    aux_names: tuple[str, ...]
    examples_per_step: int

    def init_state(self) -> dict: ...
    def loss_fn(self, model, activations, micro_batch): ...
    def train_iterator(self) -> Iterator: ...
    def device_batch(self, host_batch: Mapping) -> dict: ...
    def evaluate(self, state: Mapping) -> dict[str, float]: ...


def prepare_workdir(workdir: str | Path, config=None) -> Path:
    """Creates ``workdir`` (error naming it when not writable) and writes config.json."""
    workdir = ensure_writable_dir(workdir, "workdir")
    if config is not None and jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    return workdir


class _Summaries:
    """TensorBoard scalars from process 0; a no-op elsewhere."""

    def __init__(self, directory: Path):
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(directory))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_finite(step: int, loss: float, aux: np.ndarray, names: tuple[str, ...]) -> None:
    bad = [
        name
        for name, value in zip(names, np.atleast_1d(aux), strict=False)
        if not np.isfinite(value)
    ]
    if bad or not np.isfinite(loss):
        raise TrainingDivergedError(
            f"non-finite loss at step {step}: loss={loss}, task(s) {bad or ['total']}; "
            f"stopped without saving, the last good checkpoint is intact"
        )


def run_training(
    task: TrainingTask,
    train_config,
    workdir: str | Path,
    on_eval: Callable[[int, dict], None] | None = None,
) -> dict:
    """Trains ``task`` for ``train_config.steps`` steps; returns the last eval metrics.

    ``train_config`` fields: steps, eval_every (0: never evaluate), checkpoint_every,
    log_every, keep_checkpoints, warm_start.
    """
    log = get_logger()
    workdir = Path(workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=train_config.keep_checkpoints)
    state = task.init_state()
    iterator = task.train_iterator()
    start = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(latest, state, task.collection)
        if "train" in data_state:
            iterator.set_state(data_state["train"])
        start = latest
        log.info("resumed from checkpoint step %d in %s", latest, checkpointer.directory)
    elif train_config.get("warm_start"):
        reject_remote(train_config.warm_start, "train.warm_start")
        source = Checkpointer(Path(train_config.warm_start) / "checkpoints")
        if source.latest_step() is None:
            raise UserInputError(
                f"train.warm_start='{train_config.warm_start}' holds no checkpoint"
            )
        warm, _ = source.restore(source.latest_step(), state, task.collection)
        source.close()
        state = {**state, "params": warm["params"], "embedding": warm["embedding"]}
        log.info(
            "warm start from %s step %d (new data window; dense optimizer restarts, table slots "
            "kept)",
            source.directory,
            source.latest_step(),
        )
    if getattr(task, "grad_cache", False):  # contrastive: every example a negative of all others
        from lf_jax.train.grad_cache import make_grad_cache_step

        train_step = make_grad_cache_step(
            task.graphdef, task.tx, task.embed_fn, task.contrastive_loss_fn
        )
    else:
        train_step = make_train_step(task.graphdef, task.collection, task.tx, task.loss_fn)
    summaries = _Summaries(workdir / "tensorboard")
    metrics: dict = {}
    history_path = workdir / "history.jsonl"  # one JSON row per log/eval; a resumed run appends

    def record(row: dict) -> None:
        if jax.process_index() == 0:
            with open(history_path, "a") as out:
                out.write(json.dumps(row) + "\n")

    def save(step: int) -> None:
        checkpointer.save(step, state, task.collection, {"train": iterator.get_state()})

    try:
        # SIGTERM: every process saves the same step (multihost.preemption_notice) and returns
        with (
            preemption_notice() as preempted,
            progress(
                total=train_config.steps,
                initial=start,
                desc="train",
                unit="step",
                disable=not progress_enabled() or not is_primary(),
            ) as bar,
        ):
            tic, tic_step = time.perf_counter(), start
            for step in range(start + 1, train_config.steps + 1):
                state, step_metrics = train_step(state, task.device_batch(next(iterator)))
                loss = float(step_metrics["loss"])
                aux = np.asarray(jax.device_get(step_metrics["aux"]))
                _check_finite(step, loss, aux, task.aux_names)
                bar.update(1)
                if step % train_config.log_every == 0 or step == train_config.steps:
                    elapsed = time.perf_counter() - tic
                    rate = (step - tic_step) * task.examples_per_step / max(elapsed, 1e-9)
                    tic, tic_step = time.perf_counter(), step
                    bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}")
                    scalars = {
                        "loss": loss,
                        "examples_per_second": rate,
                        "grad_norm": float(step_metrics["grad_norm"]),
                        **{
                            f"loss_{n}": float(v)
                            for n, v in zip(task.aux_names, np.atleast_1d(aux), strict=False)
                        },
                    }
                    summaries.scalars(step, scalars, "train")
                    record({"step": step, **scalars})
                    if bar.disable:
                        log.info(
                            "step %d/%d loss %.4f (%s ex/s)",
                            step,
                            train_config.steps,
                            loss,
                            f"{rate:,.0f}",
                        )
                if train_config.eval_every and (
                    step % train_config.eval_every == 0 or step == train_config.steps
                ):
                    metrics = task.evaluate(state)
                    summaries.scalars(step, metrics, "eval")
                    record({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
                    if on_eval is not None:
                        on_eval(step, metrics)
                if step % train_config.checkpoint_every == 0 or step == train_config.steps:
                    save(step)
                if (
                    train_config.eval_every
                    and step % train_config.eval_every == 0
                    or step % train_config.checkpoint_every == 0
                ):
                    tic, tic_step = time.perf_counter(), step  # examples/s excludes eval and saves
                if preempted(step):
                    if step % train_config.checkpoint_every:
                        save(step)
                    log.warning("SIGTERM: saved checkpoint at step %d, exiting cleanly", step)
                    break
    finally:
        # waits for any async save: a crash or NaN stop never leaves a half-written latest step
        checkpointer.close()
        summaries.close()
        if hasattr(iterator, "close"):  # stops prefetch threads / grain worker processes
            iterator.close()
    return metrics


def build_task(config, workdir: str | Path) -> TrainingTask:
    """The TrainingTask of ``config.model_family`` on a mesh of ``config.mesh``."""
    from lf_jax.distributed.mesh import make_mesh

    task_class = family_class(config.get("model_family", ""), "task")
    return task_class(config, make_mesh(dict(config.mesh)), workdir)


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the
    final eval metrics, also written to ``workdir/metrics.json``."""
    ensure_logging()
    workdir = prepare_workdir(workdir, config)
    task = build_task(config, workdir)
    metrics = run_training(task, config.train, workdir)
    if jax.process_index() == 0:
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def evaluate_checkpoint(config, workdir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """Restores ``step`` (default: latest) from ``workdir/checkpoints`` and evaluates it;
    returns (the step evaluated, metrics)."""
    reject_remote(workdir, "workdir")
    workdir = Path(workdir)
    checkpointer = Checkpointer(workdir / "checkpoints")
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise UserInputError(f"no checkpoint in '{checkpointer.directory}': train first")
    task = build_task(config, workdir)
    state, _ = checkpointer.restore(step, task.init_state(), task.collection)
    checkpointer.close()
    return step, task.evaluate(state)
