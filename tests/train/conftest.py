"""Session fixtures for trainer tests: the tiny feed_logs dataset and small configs."""

import pytest

from lf_jax.configuration import load_config


@pytest.fixture(scope="session")
def tiny_data_dir(feed_builder, feed_data_dir):
    """The session's tiny feed_logs build (tests/conftest.py), as a string path."""
    return str(feed_data_dir)


@pytest.fixture
def small_ranker_config(repo_root, tiny_data_dir):
    """The tiny ranker shrunk for tests: batch 64, a small MLP, checkpoints every 2 steps."""
    config = load_config(f"{repo_root}/configs/feed_ranker.py:size=tiny")
    with config.unlocked():
        config.batch_size = 64
        config.model.mlp_dims = (32,)
        config.model.dcn_layers = 1
        for name in ("history_actors", "history_hashtags"):
            config.embedding.features[name].max_ids = 10
        config.train.steps = 6
        config.train.eval_every = 0
        config.train.checkpoint_every = 2
        config.train.log_every = 1
        config.data.data_dir = tiny_data_dir
        config.data.eval_batch_size = 512
    return config
