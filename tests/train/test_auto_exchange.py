"""The trainer under ``embedding.exchange=auto`` (the feed ranker's default): a group
spread over every device is probed in rows and bags, settles on one mode (logged), the
checkpoint keeps it, and a resumed run takes it from its first step."""

import logging

import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.train import loop
from lf_jax.train import step as step_lib
from lf_jax.train.checkpoint import Checkpointer
from lf_jax.train.loop import prepare_workdir, run_training
from lf_jax.train.ranker import RankerTask

PROBE = 4  # CapacityChooser's probe_steps


def _task(config, workdir):
    return RankerTask(config, make_mesh(dict(config.mesh)), prepare_workdir(workdir, config))


def _recording(monkeypatch) -> list:
    """The TrainSteps run_training makes, in order."""
    made = []

    def make(*args, **kwargs):
        made.append(step_lib.make_train_step(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "make_train_step", make)
    return made


def _mode_used(capacities) -> str:
    names = [name for name, _ in capacities]
    return "bags" if any(name.endswith("/entries") for name in names) else "rows"


@pytest.mark.slow
def test_auto_settles_logs_and_resumes_in_its_mode(
    small_ranker_config, tmp_path, monkeypatch, caplog
):
    config = small_ranker_config
    with config.unlocked():
        config.embedding.plan = {"member": {"strategy": "row_wise", "axes": ("data", "model")}}
        config.train.steps = 2 * PROBE + 2
        config.train.checkpoint_every = 2 * PROBE + 2
    assert config.embedding.exchange == "auto"
    made = _recording(monkeypatch)
    calls: list = []
    original = step_lib.TrainStep.__call__

    def call(self, state, batch):  # records each step's capacities
        out = original(self, state, batch)
        calls.append(_mode_used(self.last_capacities))
        return out

    monkeypatch.setattr(step_lib.TrainStep, "__call__", call)
    task = _task(config, tmp_path)
    group = next(r.group.name for r in task.collection.routes if len(r.modes) > 1)
    with caplog.at_level(logging.INFO, logger="lf_jax.train.step"):
        run_training(task, config.train, tmp_path)
    # each step observes the previous steps' counts: PROBE rows steps, PROBE bag steps
    settled = made[0].exchange_modes()
    assert list(settled) == [group]
    mode = settled[group]
    assert calls == ["rows"] * PROBE + ["bags"] * PROBE + [mode] * 2
    assert f"owner exchange of shard group {group}: {mode} mode (probed per owner" in caplog.text
    ckpt = Checkpointer(tmp_path / "checkpoints")
    _, data_state = ckpt.restore(2 * PROBE + 2, task.init_state(), task.collection)
    ckpt.close()
    assert data_state["exchange_modes"] == {group: mode}

    calls.clear()  # resumed: the checkpoint's mode from the first step, no probe
    with config.unlocked():
        config.train.steps = 2 * PROBE + 4
    run_training(_task(config, tmp_path), config.train, tmp_path)
    assert made[1].exchange_modes() == {group: mode}
    assert calls == [mode, mode]
