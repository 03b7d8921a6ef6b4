"""Fixtures of the fault-injection suite: a tiny trained ranker workdir (checkpoints at
steps 2, 4 and 6) made once per session through the CLI, copied by each test that damages
it, and the lf_jax log records of a test (helpers to run ``lf-jax``: cli_probe.py)."""

import logging
import shutil

import pytest
from cli_probe import ranker_args

from lf_jax.cli import main


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
    """A finished tiny ranker run (lf-jax train, in this process): checkpoints 2, 4, 6,
    config.json and metrics.json. Tests copy it with ``copy_workdir``."""
    workdir = tmp_path_factory.mktemp("faults") / "trained"
    assert (
        main(["--verbosity", "warning", "train", *ranker_args(repo_root, feed_data_dir, workdir)])
        == 0
    )
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
    return workdir


@pytest.fixture
def copy_workdir(trained_workdir, tmp_path):
    """A fresh copy of the trained workdir for a test to damage."""
    target = tmp_path / "run"
    shutil.copytree(trained_workdir, target)
    return target
