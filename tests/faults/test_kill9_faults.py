"""kill -9 at a random moment of `lf-jax train` and `lf-jax export` (fresh processes): the
relaunched train ends bit-identical to an uninterrupted run, and an export leaves the
previous export readable, the next one cleaning up what the killed one left. (kill -9 of
one of two processes: tests/distributed/test_multihost_processes.py.)"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_probe import ranker_args

from lf_jax.cli import main
from lf_jax.export.embed_corpus import load_export
from lf_jax.testing.environment import child_env

SEED = int(os.environ.get("LF_JAX_FAULT_SEED", "0"))  # the kill moments; logged on failure


def lf_jax(args: list[str], repo_root) -> subprocess.Popen:
    env = child_env(CI="true")  # lf-jax simulates config.devices itself
    return subprocess.Popen(
        [sys.executable, "-m", "lf_jax.cli", "--verbosity", "warning", *args],
        env=env,
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILLs ``process`` after ``seconds`` unless it ended first; True when killed."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return True


def stored_arrays(step_dir) -> dict[str, np.ndarray]:
    arrays = {}
    for item in ("state", "embedding"):
        restored = ocp.PyTreeCheckpointer().restore(step_dir / item)
        arrays.update({f"{item}/{key}": np.asarray(value) for key, value in restored.items()})
    return arrays


@pytest.mark.nightly
def test_kill9_train_at_a_random_moment_resumes_bit_identical(
    repo_root, feed_builder, feed_data_dir, tmp_path
):
    reference = tmp_path / "reference"
    assert (
        main(["--verbosity", "warning", "train", *ranker_args(repo_root, feed_data_dir, reference)])
        == 0
    )
    moment = random.Random(SEED).uniform(5.0, 60.0)
    killed_run = tmp_path / "killed"
    args = ["train", *ranker_args(repo_root, feed_data_dir, killed_run)]
    killed = kill_after(lf_jax(args, repo_root), moment)
    relaunch = lf_jax(args, repo_root)
    assert relaunch.wait(600) == 0, f"kill at {moment:.1f} s: {relaunch.stderr.read()[-3000:]}"
    expected = stored_arrays(reference / "checkpoints" / "6")
    got = stored_arrays(killed_run / "checkpoints" / "6")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key}, killed={killed}")


@pytest.mark.nightly
def test_kill9_export_keeps_the_previous_export(repo_root, feed_data_dir, copy_workdir, tmp_path):
    output = tmp_path / "members"
    args = [
        "export",
        *ranker_args(repo_root, feed_data_dir, copy_workdir),
        "--entity",
        "members",
        "--output",
        str(output),
        "--kv",
    ]
    assert main(["--verbosity", "warning", *args]) == 0
    before = load_export(output)[2]["created_at"]
    moment = random.Random(SEED).uniform(3.0, 30.0)
    kill_after(lf_jax(args, repo_root), moment)
    ids, vectors, manifest = load_export(output)  # the old export, or the new one, whole
    assert vectors.shape == (ids.size, 16) and manifest["created_at"] >= before
    assert main(["--verbosity", "warning", *args]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".members.")] == []
