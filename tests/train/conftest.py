"""Session fixtures for trainer tests: the tiny feed_logs dataset and small configs."""

import pytest


@pytest.fixture(scope="session")
def tiny_data_dir(feed_builder, feed_data_dir):
    """The session's tiny feed_logs build (tests/conftest.py), as a string path."""
    return str(feed_data_dir)


def _small(shrunk_ranker_config):
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


@pytest.fixture
def small_ranker_config(shrunk_ranker_config, tiny_data_dir):
    """The tiny ranker shrunk for tests: batch 64, a small MLP, checkpoints every 2 steps."""
    return _small(shrunk_ranker_config)


@pytest.fixture(scope="session")
def static_ranker_run(shrunk_ranker_config, tiny_data_dir, tmp_path_factory):
    """small_ranker_config trained its 6 steps by run_training, uninterrupted (checkpoints
    at steps 2, 4 and 6): {"config", "workdir", "task"}. The reference run of the resume,
    grain-worker and warm-start tests, trained once per test process. Read-only: tests
    restore its checkpoints and write elsewhere."""
    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.train.loop import prepare_workdir, run_training
    from lf_jax.train.ranker import RankerTask

    config = _small(shrunk_ranker_config)
    workdir = tmp_path_factory.mktemp("static_ranker_run")
    task = RankerTask(config, make_mesh(dict(config.mesh)), prepare_workdir(workdir, config))
    run_training(task, config.train, workdir)
    return {"config": config, "workdir": workdir, "task": task}


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
