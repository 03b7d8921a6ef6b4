"""Fixtures of the fault-injection suite: a tiny ranker workdir (checkpoints at steps 2, 4
and 6) made once per session, copied by each test that damages it, and the lf_jax log
records of a test (helpers to run ``lf-jax``: cli_probe.py)."""

import json
import logging
import shutil

import pytest
from cli_probe import STEPS, ranker_args


@pytest.fixture
def lf_jax_log():
    """The lf_jax logger's records while the test runs (its handler writes to the stderr
    of the first test that configured it, so capsys cannot see them)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.DEBUG)
    logger = logging.getLogger("lf_jax")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture(scope="session")
def trained_workdir(repo_root, feed_builder, feed_data_dir, tmp_path_factory):
    """A workdir as `lf-jax train` leaves it (config.json, plan.json, metrics.json,
    checkpoints 2, 4 and 6 of the shrunk tiny ranker), made without compiling a train step:
    the checkpoints hold the initial state (about 10 s instead of a minute). Tests copy it
    with ``copy_workdir``."""
    from lf_jax.configuration import apply_overrides, load_config, split_override_args
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import build_task, prepare_workdir

    workdir = tmp_path_factory.mktemp("faults") / "trained"
    args = ranker_args(repo_root, feed_data_dir, workdir)
    overrides, _ = split_override_args(args)
    config = apply_overrides(load_config(args[1]), overrides)  # what `lf-jax train` loads
    task = build_task(config, prepare_workdir(workdir, config))
    state = task.init_state()
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    for step in (2, 4, STEPS):
        checkpointer.save(step, state, task.collection, {})
    checkpointer.close()
    (workdir / "metrics.json").write_text(json.dumps({"holdout_random/like/auc": 0.5}))
    return workdir


@pytest.fixture
def copy_workdir(trained_workdir, tmp_path):
    """A fresh copy of the trained workdir for a test to damage."""
    target = tmp_path / "run"
    shutil.copytree(trained_workdir, target)
    return target
