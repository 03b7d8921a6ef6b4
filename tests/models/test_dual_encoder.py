"""Dual encoder: GradCache accumulation == one batch, sharded == unsharded, end-to-end train."""

import json

import jax
import numpy as np
import pytest

from lf_jax.configuration import load_config
from lf_jax.distributed.mesh import make_mesh
from lf_jax.train.dual_encoder import DualEncoderTask, recall_at_k
from lf_jax.train.grad_cache import make_grad_cache_step
from lf_jax.train.loop import prepare_workdir, train_and_evaluate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_member_items"))


@pytest.fixture
def config(repo_root, data_dir):
    config = load_config(f"{repo_root}/configs/dual_encoder.py")
    with config.unlocked():
        config.batch_size = 32
        config.model.update(
            hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32
        )
        config.loss.matryoshka_dims = (4, 8, 16)
        config.train.update(steps=2, eval_every=2, checkpoint_every=2, log_every=1)
        config.data.data_dir = data_dir
    return config


def _task(config, workdir, mesh=None):
    return DualEncoderTask(
        config, mesh or make_mesh(dict(config.mesh)), prepare_workdir(workdir, config)
    )


def _step(task, host):
    step = make_grad_cache_step(
        task.graphdef, task.tx, task.embed_fn, task.contrastive_loss_fn, donate=False
    )
    state, metrics = step(task.init_state(), task.device_batch(host))
    return jax.tree.map(np.asarray, state["params"]), float(metrics["loss"])


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_grad_cache_chunks_and_sharding_equal_one_unsharded_batch(config, tmp_path):
    one = _task(config, tmp_path / "one", make_mesh({"data": 1}, devices=jax.devices()[:1]))
    host = next(one.train_iterator())
    reference, loss_ref = _step(one, host)
    with config.unlocked():
        config.train.grad_accum_steps = 2
    chunked = _task(config, tmp_path / "chunked")  # 8 devices, 2 GradCache chunks
    assert chunked.device_batch(host)["member_ids"].shape[:2] == (2, 16)
    params, loss = _step(chunked, host)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    _assert_close(reference, params)


@pytest.mark.slow
def test_train_end_to_end_reports_recall_per_dim_and_popularity(config, tmp_path):
    metrics = train_and_evaluate(config, tmp_path / "run")
    assert set(metrics) == {
        "recall@10/dim4",
        "recall@10/dim8",
        "recall@10/dim16",
        "recall@10/popularity",
    }
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (tmp_path / "run" / "tokenizer.json").exists()
    # export hook
    task = _task(config, tmp_path / "run")
    from lf_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    state, _ = ckpt.restore(ckpt.latest_step(), task.init_state(), None)
    ckpt.close()
    ids, records = task.corpus("item")
    assert ids[:2] == ["p0", "p1"] and len(ids) == 1000  # the posts of the feed_logs tiny world
    vectors = task.embed(state, "item", records[:5], dim=8)
    assert vectors.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors, task.embed(state, "item", dim=8)[:5], rtol=1e-5, atol=1e-6)


def test_recall_at_k_oracle():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]])
    train = np.array([[0, 0]])  # member 0's train item is excluded
    test = np.array([[0, 1], [0, 3], [1, 0]])
    # member 0: top-1 after excluding item 0 is item 1 -> 1/2; member 1: top-1 is 3 -> 0
    assert recall_at_k(scores, test, train, k=1) == pytest.approx(0.25)
