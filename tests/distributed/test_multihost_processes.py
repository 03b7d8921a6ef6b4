"""2 processes x 4 CPU devices: same training as 1 x 8, collective checkpoints, failures.

The issue's "done when": equal parameters and every example once; a 2-process checkpoint
restored in 1 process on another mesh; a killed process stops its peer within the
configured bound and the relaunch finishes like an uninterrupted run; SIGTERM saves on
every process and exits 0. Each start is bounded by an outer time limit.
"""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lf_jax.configuration import apply_overrides, load_config
from lf_jax.distributed.mesh import make_mesh
from lf_jax.testing.environment import child_env
from lf_jax.testing.multiprocess import (
    ProcessGroup,
    restored_arrays,
    small_ranker_overrides,
    train_in_processes,
)
from lf_jax.train.checkpoint import Checkpointer
from lf_jax.train.loop import prepare_workdir, run_training
from lf_jax.train.ranker import RankerTask

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
WORKER = str(Path(__file__).with_name("mp_train_worker.py"))
HEARTBEAT_S = 4  # the configured failure-detection bound of these runs
LIMIT_S = 420  # outer time limit of one multi-process start
BUDGET = "1000000"  # bytes per device: the planner splits member, post, hashtag rows


def _overrides(data_dir, **extra) -> dict[str, str]:
    values = {
        "embedding.memory_budget_bytes": BUDGET,
        "train.steps": "6",
        "train.checkpoint_every": "2",
    }
    return small_ranker_overrides(data_dir, **{**values, **extra})


def _args(repo_root, workdir, overrides) -> list[str]:
    return [
        "--config",
        f"{repo_root}/configs/feed_ranker.py:size=tiny",
        "--workdir",
        str(workdir),
    ] + [f"--config.{k}={v}" for k, v in overrides.items()]


def _env():
    return child_env(CI="true")


def _cli(repo_root, workdir, overrides) -> list[str]:
    return [sys.executable, "-m", "lf_jax.cli", "train", *_args(repo_root, workdir, overrides)]


def _restored(config, workdir, mesh_shape, step=None):
    """({"params/..", "embedding/.."} host arrays, data state) of a checkpoint restored in
    this process."""
    task = RankerTask(config, make_mesh(mesh_shape), prepare_workdir(workdir / "restore", config))
    return restored_arrays(task, workdir, step)


def _compare(expected, got, exact):
    assert sorted(expected) == sorted(got)
    for key in expected:
        if exact:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)


@pytest.fixture(scope="module")
def two_process_run(repo_root, feed_builder, feed_data_dir, tmp_path_factory):
    """The tiny ranker trained 6 steps by 2 processes x 4 devices (checkpoints every 2)."""
    root = tmp_path_factory.mktemp("mp2")
    t0 = time.monotonic()
    final, _ = train_in_processes(
        WORKER,
        root,
        f"{repo_root}/configs/feed_ranker.py:size=tiny",
        _overrides(feed_data_dir),
        limit_s=LIMIT_S,
        heartbeat_s=HEARTBEAT_S,
        cwd=repo_root,
    )
    print(f"2-process run: {time.monotonic() - t0:.1f} s")
    return root, final


def _config(repo_root, data_dir, **extra):
    return apply_overrides(
        load_config(f"{repo_root}/configs/feed_ranker.py:size=tiny"), _overrides(data_dir, **extra)
    )


def test_two_processes_train_like_one_and_read_each_example_once(
    two_process_run, repo_root, feed_data_dir, tmp_path
):
    root, final_2p = two_process_run
    config = _config(repo_root, feed_data_dir)
    workdir = prepare_workdir(tmp_path / "one", config)
    task = RankerTask(config, make_mesh(dict(config.mesh)), workdir)  # 1 process x 8 devices
    consumed, make_iterator = [], task.train_iterator

    def recording():
        it = make_iterator()
        real_next = it.__next__

        class Recording(type(it)):
            def __next__(self):
                batch = real_next()
                consumed.append(batch["session_id"].astype(np.int64) * 20 + batch["position"])
                return batch

        it.__class__ = Recording
        return it

    task.train_iterator = recording
    run_training(task, config.train, workdir)
    one_process, _ = _restored(config, workdir, dict(config.mesh))
    _compare(final_2p, one_process, exact=False)

    keys = [np.load(root / f"consumed_p{p}.npy") for p in range(2)]
    assert keys[0].shape == keys[1].shape == (6, 32)
    for step in range(6):  # per step: disjoint halves of the 1-process batch
        assert not set(keys[0][step]) & set(keys[1][step])
        assert sorted(np.concatenate([keys[0][step], keys[1][step]])) == sorted(consumed[step])
    everything = np.concatenate([k.ravel() for k in keys])
    assert len(set(everything)) == everything.size == 6 * 64  # each example exactly once


def test_two_process_checkpoint_restores_in_one_process_on_another_mesh(
    two_process_run, repo_root, feed_data_dir
):
    root, final_2p = two_process_run
    config = _config(
        repo_root,
        feed_data_dir,  # another plan: every table replicated
        **{"embedding.memory_budget_bytes": "64000000"},
    )
    restored, data_state = _restored(config, root / "run", {"data": 4, "model": 2})
    _compare(final_2p, restored, exact=True)
    assert data_state["train"]["pipeline"]["global_batch_size"] == 64


def test_killed_process_stops_its_peer_in_bound_and_relaunch_resumes(
    two_process_run, repo_root, feed_data_dir, tmp_path
):
    _, final_2p = two_process_run
    overrides = _overrides(feed_data_dir)
    argv = _cli(repo_root, tmp_path / "run", overrides)
    with ProcessGroup(
        argv,
        2,
        4,
        env=_env(),
        cwd=repo_root,
        heartbeat_timeout=HEARTBEAT_S,
        shutdown_timeout=2 * HEARTBEAT_S,
    ) as group:
        group.wait_for(r"checkpoint step 2 ->", process=0, timeout=LIMIT_S)
        group.kill(1)  # during / right after the step-2 save
        killed_at = time.monotonic() - group.start_time
        results = group.wait(60)
    survivor, victim = results
    took = survivor.elapsed_s - killed_at
    print(f"survivor stopped {took:.1f} s after the kill (heartbeat {HEARTBEAT_S} s)")
    assert victim.signal_name == "SIGKILL" and group.first_failure() == 1
    assert survivor.returncode != 0 and not survivor.stopped_by_limit
    assert took <= HEARTBEAT_S + 6, survivor.output[-2000:]  # bound: heartbeat + slack
    assert "stopped sending heartbeats" in survivor.output and "\n1\n" in survivor.output
    latest = Checkpointer(tmp_path / "run" / "checkpoints").latest_step()
    assert latest in (None, 2, 4)  # never a half-written step

    with ProcessGroup(
        argv, 2, 4, env=_env(), cwd=repo_root, heartbeat_timeout=HEARTBEAT_S
    ) as group:
        results = group.wait(LIMIT_S)
    for r in results:
        assert r.returncode == 0, f"process {r.process}:\n{r.output[-3000:]}"
    if latest is not None:
        assert f"resumed from checkpoint step {latest}" in results[0].output
    config = _config(repo_root, feed_data_dir)
    resumed, _ = _restored(config, tmp_path / "run", dict(config.mesh), step=6)
    _compare(final_2p, resumed, exact=False)


def test_sigterm_to_the_launcher_saves_on_every_process_and_exits_0(
    repo_root, feed_builder, feed_data_dir, tmp_path
):
    overrides = _overrides(
        feed_data_dir, **{"train.steps": "100000", "train.checkpoint_every": "100000"}
    )
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.local",
            "-n",
            "2",
            "-d",
            "4",
            "--heartbeat-timeout",
            str(HEARTBEAT_S),
            "--",
            *_cli(repo_root, tmp_path / "run", overrides),
        ],
        cwd=repo_root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, seen = [], threading.Event()

    def pump():
        for line in launcher.stdout:
            lines.append(line)
            if "[p0]" in line and "step 3/" in line:
                seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert seen.wait(LIMIT_S), "".join(lines)[-3000:]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(10)
    out = "".join(lines)
    assert launcher.returncode == 0, out[-3000:]
    assert "[launch] process 0: exit 0" in out and "[launch] process 1: exit 0" in out
    saved = {
        p: [
            line
            for line in lines
            if line.startswith(f"[p{p}]") and "saved checkpoint at step" in line
        ]
        for p in (0, 1)
    }
    assert saved[0] and saved[1], out[-3000:]
    step = int(saved[0][0].split("at step ")[1].split(",")[0])
    assert f"at step {step}," in saved[1][0]  # both processes saved the same step
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == step >= 3
