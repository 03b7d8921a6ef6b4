"""Checkpoint and run faults on a copy of a trained tiny ranker workdir (steps 2, 4, 6):
a damaged newest step, a changed model, a finished workdir, a disk that fills during a
background save, and Ctrl-C."""

import errno
import json
import os
import signal

import pytest
from cli_probe import STEPS, cli, damage, one_error_line, ranker_args, steps_of

from lf_jax.train.checkpoint import Checkpointer


@pytest.mark.nightly
def test_damaged_newest_step_falls_back_and_is_kept(
    repo_root, feed_data_dir, copy_workdir, capsys, lf_jax_log
):
    damaged = damage(copy_workdir / "checkpoints" / "6", "truncate")
    size = damaged.stat().st_size
    old_config = (copy_workdir / "config.json").read_text()
    args = ranker_args(repo_root, feed_data_dir, copy_workdir, "--config.train.steps=8")
    code, _, err = cli(capsys, "train", *args)
    assert code == 0, err
    warnings = [r.getMessage() for r in lf_jax_log if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint step 6 cannot be read" in warnings[0]
    assert damaged.name in warnings[0]  # names the file
    kept = copy_workdir / "checkpoints.damaged" / "6"  # moved aside, never deleted
    assert (kept / damaged.relative_to(copy_workdir / "checkpoints" / "6")).stat().st_size == size
    assert steps_of(copy_workdir) == [4, 6, 8]  # resumed from step 4
    # config.json now describes the resumed run; the one it replaced is kept
    assert json.loads((copy_workdir / "config.json").read_text())["train"]["steps"] == 8
    assert (copy_workdir / "config.step4.json").read_text() == old_config


def test_damaged_explicit_step_is_one_line(repo_root, feed_data_dir, copy_workdir, capsys):
    damage(copy_workdir / "checkpoints" / "6", "delete")
    args = ranker_args(repo_root, feed_data_dir, copy_workdir)
    code, out, err = cli(capsys, "eval", *args, "--step", "6")
    line = one_error_line(err, "eval")
    assert code == 2 and "checkpoint step 6 cannot be read" in line
    # a deleted content-addressed data file: the database and the array it held are named
    assert f"{copy_workdir}/checkpoints/6/state/ (array " in line and "is damaged" in line
    assert steps_of(copy_workdir) == [2, 4, 6] and not out  # nothing moved for an explicit step


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--config.embedding.tables.post.dim=8",
            "'tables.post' has shape (1001, 16) in the checkpoint but (1001, 8) in the config",
        ),
        ("--config.model.dcn_layers=2", "lacks 'params.cross.layers.1.full.bias.value'"),
    ],
)
def test_changed_model_is_refused_before_config_json(
    repo_root, feed_data_dir, copy_workdir, capsys, override, message
):
    before = {p.name: p.read_bytes() for p in copy_workdir.iterdir() if p.is_file()}
    args = ranker_args(repo_root, feed_data_dir, copy_workdir, "--config.train.steps=8", override)
    code, _, err = cli(capsys, "train", *args)
    line = one_error_line(err, "train")
    assert code == 2 and message in line and "checkpoint step 6 in" in line
    after = {p.name: p.read_bytes() for p in copy_workdir.iterdir() if p.is_file()}
    assert after["config.json"] == before["config.json"]  # still describes the checkpoints
    assert set(after) - set(before) <= {"plan.json"} and steps_of(copy_workdir) == [2, 4, 6]


@pytest.mark.parametrize("steps", [STEPS, 4])
def test_finished_workdir_trains_nothing(
    repo_root, feed_data_dir, copy_workdir, capsys, lf_jax_log, steps
):
    metrics = copy_workdir / "metrics.json"
    before = (metrics.read_bytes(), metrics.stat().st_mtime_ns)
    args = ranker_args(repo_root, feed_data_dir, copy_workdir, f"--config.train.steps={steps}")
    code, _, err = cli(capsys, "train", *args)
    assert code == 0, err
    assert any("is already at step 6" in r.getMessage() for r in lf_jax_log)
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before
    assert not (copy_workdir / "config.step6.json").exists()


@pytest.mark.nightly
def test_disk_full_during_background_save_is_one_line(
    repo_root, feed_data_dir, tmp_path, capsys, monkeypatch
):
    """The save of step 4 fails in Orbax's background thread (ENOSPC): the run stops with
    one line naming the step and the last complete checkpoint; step 2 is intact."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    original = async_checkpointer._background_wait_for_commit_futures
    calls = []

    def disk_fills(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_fills)
    workdir = tmp_path / "full"
    code, _, err = cli(capsys, "train", *ranker_args(repo_root, feed_data_dir, workdir))
    line = one_error_line(err, "train")
    assert code == 2 and "No space left on device" in line, err
    assert "checkpoint step 4 could not be written" in line
    assert "the last complete checkpoint is step 2" in line
    assert steps_of(workdir) == [2] and not (workdir / "metrics.json").exists()
    checkpointer = Checkpointer(workdir / "checkpoints", create=False)
    assert checkpointer.all_steps() == [2]
    checkpointer.close()


@pytest.mark.nightly
def test_ctrl_c_saves_like_sigterm(repo_root, feed_data_dir, tmp_path, capsys, monkeypatch):
    from lf_jax.train.ranker import RankerTask

    original = RankerTask.device_batch
    calls = []

    def interrupted_at_step_3(self, host_batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3
        return original(self, host_batch)

    monkeypatch.setattr(RankerTask, "device_batch", interrupted_at_step_3)
    workdir = tmp_path / "ctrl_c"
    code, _, err = cli(capsys, "train", *ranker_args(repo_root, feed_data_dir, workdir))
    assert code == 0, err
    assert steps_of(workdir) == [2, 3]  # saved at the step it was interrupted in
    assert not (workdir / "metrics.json").exists()  # an interrupted run writes no metrics
