"""Fixtures for serving tests: a feed ranker checkpoint (its initial state) on the tiny
feed_logs build, and factories of serving artifact directories exported from it."""

import pytest

BUCKETS = {"queries": (1, 2), "candidates": (64,)}


@pytest.fixture(scope="session")
def ranker_workdir(shrunk_ranker_config, feed_builder, tmp_path_factory):
    """(config, workdir) of a feed ranker whose checkpoint holds its initial state."""
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import build_task

    config = shrunk_ranker_config()
    with config.unlocked():
        config.train.ips = False
    workdir = tmp_path_factory.mktemp("serving_ranker")
    task = build_task(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(1, task.init_state(), task.collection, {})
    checkpointer.close()
    return config, workdir


@pytest.fixture(scope="session")
def export_version(ranker_workdir):
    """``export_version(root, dtype)``: one more version of the ranker under ``root``."""
    from lf_jax.serving.export_serving import export_serving

    config, workdir = ranker_workdir

    def export(root, dtype="float32", version=None):
        return export_serving(config, workdir, root, dtype=dtype, version=version, **BUCKETS)

    return export


@pytest.fixture(scope="session")
def serving_root(export_version, tmp_path_factory):
    """An artifacts directory with version v0001 (float32 tables) of the ranker."""
    root = tmp_path_factory.mktemp("serving")
    result = export_version(root, "float32")
    return root, result
