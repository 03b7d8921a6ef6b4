import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.errors import TrainingDivergedError, UserInputError
from lf_jax.testing.environment import child_env
from lf_jax.train.checkpoint import Checkpointer, flatten_to_dict
from lf_jax.train.loop import prepare_workdir, run_training
from lf_jax.train.ranker import RankerTask


def _task(config, workdir, mesh=None):
    workdir = prepare_workdir(workdir, config)
    return RankerTask(config, mesh or make_mesh(dict(config.mesh)), workdir)


def _host_state(task, state):
    dense = {k: np.asarray(v) for k, v in flatten_to_dict(state["params"]).items()}
    return dense, task.collection.logical_tables(state["embedding"])


def _restored_host_state(task, workdir, step=6):
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return _host_state(task, ckpt.restore(step, task.init_state(), task.collection)[0])
    finally:
        ckpt.close()


def _assert_states(a, b, exact, rtol=2e-5, atol=2e-6):
    for part_a, part_b in zip(a, b, strict=False):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            if exact:
                np.testing.assert_array_equal(part_a[key], part_b[key], err_msg=key)
            else:
                np.testing.assert_allclose(
                    part_a[key], part_b[key], rtol=rtol, atol=atol, err_msg=key
                )


def _one_step(task, host_batch):
    from lf_jax.train.step import make_train_step

    step = make_train_step(task.graphdef, task.collection, task.tx, task.loss_fn)
    state, metrics = step(task.init_state(), task.device_batch(host_batch))
    return _host_state(task, state), float(metrics["loss"])


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_big_batch(small_ranker_config, tmp_path):
    big = _task(small_ranker_config, tmp_path / "big")
    host_batch = next(big.train_iterator())
    with small_ranker_config.unlocked():
        small_ranker_config.train.grad_accum_steps = 4
    accumulated = _task(small_ranker_config, tmp_path / "acc")
    assert accumulated.device_batch(host_batch)["labels"].shape[:2] == (4, 16)
    state_big, loss_big = _one_step(big, host_batch)
    state_acc, loss_acc = _one_step(accumulated, host_batch)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    _assert_states(state_big, state_acc, exact=False)


@pytest.mark.slow
def test_bag_exchange_trains_like_the_rows_exchange(small_ranker_config, tmp_path):
    with small_ranker_config.unlocked():  # member and hashtag rows over all 8 devices
        small_ranker_config.embedding.plan = {
            name: {"strategy": "row_wise", "axes": ("data", "model")}
            for name in ("member", "hashtag")
        }
        small_ranker_config.embedding.exchange = "rows"
    rows = _task(small_ranker_config, tmp_path / "rows")
    host_batch = next(rows.train_iterator())
    with small_ranker_config.unlocked():
        small_ranker_config.embedding.exchange = "bags"
    bags = _task(small_ranker_config, tmp_path / "bags")
    assert [r.modes for r in bags.collection.routes].count(("bags",)) >= 1
    state_rows, loss_rows = _one_step(rows, host_batch)
    state_bags, loss_bags = _one_step(bags, host_batch)
    assert loss_bags == pytest.approx(loss_rows, rel=1e-5)
    _assert_states(state_rows, state_bags, exact=False)


@pytest.mark.slow
def test_sharded_model_equals_unsharded(small_ranker_config, tmp_path):
    sharded = _task(small_ranker_config, tmp_path / "sharded")
    host_batch = next(sharded.train_iterator())
    with small_ranker_config.unlocked():
        small_ranker_config.embedding.plan = {
            "member": {"strategy": "row_wise", "axes": ("data", "model")},
            "hashtag": {"strategy": "table_wise_row_wise", "group": 1},
        }
    hand_planned = _task(small_ranker_config, tmp_path / "hand")
    with small_ranker_config.unlocked():
        small_ranker_config.embedding.plan = {}
    one_device = _task(
        small_ranker_config,
        tmp_path / "one",
        mesh=make_mesh({"data": 1}, devices=jax.devices()[:1]),
    )
    reference, loss_ref = _one_step(one_device, host_batch)
    for task in (sharded, hand_planned):
        state, loss = _one_step(task, host_batch)
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        _assert_states(reference, state, exact=False)


@pytest.mark.slow
def test_killed_run_resumes_bit_exact(
    small_ranker_config, static_ranker_run, tmp_path, kill_before_batch
):
    expected = _restored_host_state(static_ranker_run["task"], static_ranker_run["workdir"])

    # killed after the step-4 checkpoint
    kill_before_batch(
        _task(small_ranker_config, tmp_path / "b"), small_ranker_config.train, tmp_path / "b", 5
    )
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 4

    resumed = _task(small_ranker_config, tmp_path / "b")
    run_training(resumed, small_ranker_config.train, tmp_path / "b")
    ckpt = Checkpointer(tmp_path / "b" / "checkpoints")
    state, data_state = ckpt.restore(6, resumed.init_state(), resumed.collection)
    ckpt.close()
    _assert_states(expected, _host_state(resumed, state), exact=True)
    assert "train" in data_state


@pytest.mark.slow
def test_grain_worker_processes_train_the_same_model(
    small_ranker_config, static_ranker_run, tmp_path
):
    """data.worker_count=2 decodes train batches in 2 grain processes: same batches, same
    model as the threads of worker_count=0 (static_ranker_run)."""
    assert static_ranker_run["config"].data.worker_count == 0
    states = [_restored_host_state(static_ranker_run["task"], static_ranker_run["workdir"])]
    with small_ranker_config.unlocked():
        small_ranker_config.data.worker_count = 2
    task = _task(small_ranker_config, tmp_path / "w2")
    run_training(task, small_ranker_config.train, tmp_path / "w2")
    states.append(_restored_host_state(task, tmp_path / "w2"))
    _assert_states(*states, exact=True)
    with small_ranker_config.unlocked():
        small_ranker_config.data.worker_count = -1
    with pytest.raises(UserInputError, match=r"config data.worker_count=-1 must be an int >= 0"):
        _task(small_ranker_config, tmp_path / "bad")


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_task(small_ranker_config, tmp_path):
    task = _task(small_ranker_config, tmp_path / "nan")
    real_inputs, calls = task.model_inputs, []

    def poison_step_3(host):
        inputs = real_inputs(host)
        calls.append(1)
        if len(calls) == 3:
            inputs["labels"][:, 1] = np.nan  # task 'comment'
        return inputs

    task.model_inputs = poison_step_3
    with pytest.raises(TrainingDivergedError, match=r"step 3.*comment"):
        run_training(task, small_ranker_config.train, tmp_path / "nan")
    ckpt = Checkpointer(tmp_path / "nan" / "checkpoints")
    assert ckpt.latest_step() == 2
    state, _ = ckpt.restore(2, task.init_state(), task.collection)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(repo_root, tiny_data_dir, tmp_path):
    env = child_env(CI="true")
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lf_jax.cli",
            "train",
            "--config",
            f"{repo_root}/configs/feed_ranker.py:size=tiny",
            "--workdir",
            str(workdir),
            f"--config.data.data_dir={tiny_data_dir}",
            "--config.train.steps=100000",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=100000",
            "--config.batch_size=64",
            "--config.model.mlp_dims=(32,)",
        ],
        env=env,
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    for line in process.stdout:
        if "step 3/" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out[-3000:]
    assert "stop signal (SIGTERM or Ctrl-C): saved checkpoint at step" in out
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    assert len(steps) == 1 and 3 <= steps[0] < 100000
    history = [json.loads(line) for line in open(workdir / "history.jsonl")]
    assert history[-1]["step"] >= 3


def test_evaluate_reports_each_split_and_task_with_the_oracle(small_ranker_config, tmp_path):
    task = _task(small_ranker_config, tmp_path / "eval")
    metrics = task.evaluate(task.init_state())
    for split in ("holdout_ranked", "holdout_random"):
        for name in task.tasks:
            key = f"{split}/{name}"
            assert 0.0 <= metrics[f"{key}/auc"] <= 1.0
            assert metrics[f"{key}/oracle_auc"] > 0.7  # the true probabilities rank well
            assert metrics[f"{key}/ne"] > 0 and metrics[f"{key}/calibration"] > 0
