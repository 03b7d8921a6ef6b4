"""Session fixtures for trainer tests: the tiny feed_logs dataset and small configs."""

import pytest


@pytest.fixture(scope="session")
def tiny_data_dir(feed_builder, feed_data_dir):
    """The session's tiny feed_logs build (tests/conftest.py), as a string path."""
    return str(feed_data_dir)


@pytest.fixture
def small_ranker_config(shrunk_ranker_config, tiny_data_dir):
    """The tiny ranker shrunk for tests: batch 64, a small MLP, checkpoints every 2 steps."""
    config = shrunk_ranker_config()
    with config.unlocked():
        for name in ("history_actors", "history_hashtags"):
            config.embedding.features[name].max_ids = 10
        config.train.steps = 6
        config.train.eval_every = 0
        config.train.checkpoint_every = 2
        config.train.log_every = 1
        config.data.eval_batch_size = 512
    return config


class SimulatedKill(Exception):
    """Raised by ``kill_before_batch`` in place of a killed process."""


@pytest.fixture
def kill_before_batch():
    """``kill_before_batch(task, train_config, workdir, batch)``: runs training until the
    task is asked for its ``batch``-th device batch (1-based) and stops it there, as a kill
    would (checkpoints already written stay)."""
    from lf_jax.train.loop import run_training

    def run(task, train_config, workdir, batch: int) -> None:
        real_batch, calls = task.device_batch, []

        def device_batch(host):
            calls.append(1)
            if len(calls) == batch:
                raise SimulatedKill(f"simulated kill before device batch {batch}")
            return real_batch(host)

        task.device_batch = device_batch
        with pytest.raises(SimulatedKill):
            run_training(task, train_config, workdir)

    return run
