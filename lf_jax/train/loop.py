"""The training loop every model family shares: steps, eval, checkpoints, resume, signals.

A family plugs in through a ``TrainingTask`` (see lf_jax/train/ranker.py): it builds the
embedding collection, the dense model and optimizer, the data iterators and the loss;
this loop does the rest:

  * resumes from the latest checkpoint in ``workdir/checkpoints`` (params, tables, slots,
    step and data-iterator position), so a killed run continues as if never stopped;
  * stops with TrainingDivergedError naming the step and task on a NaN/Inf loss, before
    anything non-finite is saved;
  * on SIGTERM or Ctrl-C saves a checkpoint and returns cleanly (with several processes,
    all of them at the same step, agreed through JAX's preemption service);
  * restores the newest readable checkpoint (a damaged one is moved aside with one
    warning), after checking its shapes against the config (dynamic tables' keys written
    on another device count are rehashed to their new owners); a workdir already at
    train.steps trains nothing and leaves metrics.json as it was;
  * raises a failed background save as one CheckpointError at the next step;
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
from lf_jax.distributed.coordination import is_primary, preemption_notice
from lf_jax.errors import TrainingDivergedError, UserInputError
from lf_jax.train.checkpoint import Checkpointer
from lf_jax.train.dynamic_step import describe_scalars, make_dynamic_train_step
from lf_jax.train.dynamic_warm_start import is_static_checkpoint, warm_start_from_static
from lf_jax.train.families import family_class
from lf_jax.train.step import make_train_step
from lf_jax.workdir import ensure_writable_dir, reject_remote


class TrainingTask(Protocol):
    """``collection`` may be None (no sparse tables). A task whose ``dynamic`` attribute is a
    DynamicTables trains through lf_jax.train.dynamic_step (its state holds "dynamic",
    its batches KeyBatches). A task with ``grad_cache = True``
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
    """Creates ``workdir`` (error naming it when not writable); writes ``config`` as
    config.json when the workdir holds no checkpoint yet. Over checkpoints, config.json is
    written by ``write_run_config`` only once they are known to match the config."""
    workdir = ensure_writable_dir(workdir, "workdir")
    if config is not None and latest_checkpoint_step(workdir) is None:
        write_run_config(workdir, config, None)
    return workdir


def latest_checkpoint_step(workdir: str | Path) -> int | None:
    """The newest step in ``workdir/checkpoints``, or None; creates nothing."""
    if not (Path(workdir) / "checkpoints").is_dir():
        return None
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", create=False)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def write_run_config(workdir: Path, config, step: int | None) -> None:
    """Writes config.json (process 0). Resuming at ``step`` with a config that differs
    from the one there keeps the previous file as config.step<step>.json: a config.json
    describing existing checkpoints is never lost."""
    if jax.process_index() != 0:
        return
    path, text = Path(workdir) / "config.json", config.to_json_best_effort(indent=1)
    if path.is_file() and step is not None:
        if path.read_text() == text:
            return
        path.replace(path.with_name(f"config.step{step}.json"))
    path.write_text(text)


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
    on_start: Callable[[int | None], None] | None = None,
) -> dict:
    """Trains ``task`` for ``train_config.steps`` steps; returns the last eval metrics
    ({} when the workdir is already at train.steps: nothing is trained or written).

    ``train_config`` fields: steps, eval_every (0: never evaluate), checkpoint_every,
    log_every, keep_checkpoints, warm_start. ``on_start(resumed_step or None)`` runs once
    the checkpoint is restored (shape-checked), before the first step.
    """
    log = get_logger()
    workdir = Path(workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=train_config.keep_checkpoints)
    state = task.init_state()
    iterator = task.train_iterator()
    start, data_state = 0, {}
    if checkpointer.latest_step() is not None:
        try:
            state, data_state, start = checkpointer.restore_newest(
                state, task.collection, dynamic=getattr(task, "dynamic", None)
            )
        except BaseException:
            checkpointer.close()
            raise
        if start >= train_config.steps:
            checkpointer.close()
            log.warning(_already_done(workdir, start, train_config.steps))
            return {}
        if "train" in data_state:
            iterator.set_state(data_state["train"])
        log.info("resumed from checkpoint step %d in %s", start, checkpointer.directory)
    elif train_config.get("warm_start"):
        reject_remote(train_config.warm_start, "train.warm_start")
        source = Checkpointer(Path(train_config.warm_start) / "checkpoints")
        if source.latest_step() is None:
            raise UserInputError(
                f"train.warm_start='{train_config.warm_start}' holds no checkpoint"
            )
        dynamic, step = getattr(task, "dynamic", None), source.latest_step()
        if dynamic is not None and is_static_checkpoint(source, step, dynamic):
            warm = warm_start_from_static(dynamic, state, source, step)  # ids become keys
        else:
            warm, _ = source.restore(step, state, task.collection, dynamic)
        source.close()
        kept = ("params", "embedding", "dynamic")  # dynamic: the keys of dynamic tables
        state = {**state, **{k: warm[k] for k in kept if k in warm}}
        log.info(
            "warm start from %s step %d (new data window; dense optimizer restarts, table slots "
            "kept)",
            source.directory,
            source.latest_step(),
        )
    if on_start is not None:
        on_start(start or None)
    if getattr(task, "grad_cache", False):  # contrastive: every example a negative of all others
        from lf_jax.train.grad_cache import make_grad_cache_step

        train_step = make_grad_cache_step(
            task.graphdef, task.tx, task.embed_fn, task.contrastive_loss_fn
        )
    elif getattr(task, "dynamic", None) is not None:  # dynamic tables: keys resolved first
        train_step = make_dynamic_train_step(task.dynamic, task.graphdef, task.tx, task.loss_fn)
    else:
        train_step = make_train_step(task.graphdef, task.collection, task.tx, task.loss_fn)
    summaries = _Summaries(workdir / "tensorboard")
    metrics: dict = {}
    history_path = workdir / "history.jsonl"  # one JSON row per log/eval; a resumed run appends

    def record(row: dict) -> None:
        if jax.process_index() == 0:
            with open(history_path, "a") as out:
                out.write(json.dumps(row) + "\n")

    if "exchange_modes" in data_state and hasattr(train_step, "restore_exchange_modes"):
        train_step.restore_exchange_modes(data_state["exchange_modes"])

    def save(step: int) -> None:
        data = {"train": iterator.get_state()}
        if hasattr(train_step, "exchange_modes"):  # the modes "auto" exchange groups settled on
            data["exchange_modes"] = train_step.exchange_modes()
        checkpointer.save(step, state, task.collection, data)

    try:
        # SIGTERM / Ctrl-C: every process saves the same step (coordination.preemption_notice)
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
                checkpointer.raise_save_error()  # a failed background save stops here
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
                    extra = {k: float(v) for k, v in step_metrics.get("scalars", {}).items()}
                    scalars.update(extra)
                    summaries.scalars(step, scalars, "train")
                    record({"step": step, **scalars})
                    if bar.disable:
                        log.info(
                            "step %d/%d loss %.4f (%s ex/s)%s",
                            step,
                            train_config.steps,
                            loss,
                            f"{rate:,.0f}",
                            f"; {describe_scalars(extra)}" if extra else "",
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
                    log.warning(
                        "stop signal (SIGTERM or Ctrl-C): saved checkpoint at step %d, "
                        "exiting cleanly",
                        step,
                    )
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


def _already_done(workdir: Path, step: int, steps: int) -> str:
    return (
        f"workdir '{workdir}' is already at step {step} (train.steps={steps}): nothing to "
        "train, metrics.json is unchanged; raise --config.train.steps to train on"
    )


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the
    final eval metrics, also written to ``workdir/metrics.json`` once the run reaches
    train.steps (a run stopped by SIGTERM or Ctrl-C leaves it as it was). A workdir already at
    train.steps returns its metrics.json as it is, without building anything."""
    from lf_jax.config_checks import check_config

    ensure_logging()
    check_config(config, jax.device_count())
    workdir = prepare_workdir(workdir, config)
    latest = latest_checkpoint_step(workdir)
    if latest is not None and latest >= config.train.steps:
        get_logger().warning(_already_done(workdir, latest, config.train.steps))
        path = workdir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    task = build_task(config, workdir)
    metrics = run_training(
        task, config.train, workdir, on_start=lambda step: write_run_config(workdir, config, step)
    )
    finished = (workdir / "checkpoints" / str(config.train.steps)).is_dir()
    if jax.process_index() == 0 and finished:  # a run stopped by a signal keeps the old file
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def evaluate_checkpoint(config, workdir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """Restores ``step`` (default: latest) from ``workdir/checkpoints`` and evaluates it;
    returns (the step evaluated, metrics)."""
    reject_remote(workdir, "workdir")
    workdir = Path(workdir)
    if latest_checkpoint_step(workdir) is None:
        raise UserInputError(
            f"no checkpoint in '{(workdir / 'checkpoints').absolute()}': train first"
        )
    task = build_task(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", create=False)
    try:
        state, _, restored = checkpointer.restore_newest(
            task.init_state(), task.collection, step, dynamic=getattr(task, "dynamic", None)
        )
    finally:
        checkpointer.close()
    return restored, task.evaluate(state)
