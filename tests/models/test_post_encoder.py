"""Post encoder: task-heterogeneous batches, sharded == unsharded, end-to-end train."""

import jax
import numpy as np
import pytest

from lf_jax.configuration import load_config
from lf_jax.distributed.mesh import make_mesh
from lf_jax.train.loop import prepare_workdir, train_and_evaluate
from lf_jax.train.post_encoder import PostEncoderTask, triplet_accuracy
from lf_jax.train.step import make_train_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_post_texts"))


@pytest.fixture
def config(repo_root, data_dir):
    config = load_config(f"{repo_root}/configs/post_encoder.py")
    with config.unlocked():
        config.model.update(
            pretrained="", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
        )
        config.batch_size = 16
        config.train.update(steps=2, eval_every=2, checkpoint_every=2, log_every=1)
        config.eval.baseline = False
        config.data.max_length = 16
        config.data.data_dir = data_dir
    return config


def _task(config, workdir, mesh=None):
    return PostEncoderTask(
        config, mesh or make_mesh(dict(config.mesh)), prepare_workdir(workdir, config)
    )


def _step(task, host):
    step = make_train_step(task.graphdef, None, task.tx, task.loss_fn, donate=False)
    state, metrics = step(task.init_state(), task.device_batch(host))
    return jax.tree.map(np.asarray, state["params"]), float(metrics["loss"])


@pytest.mark.slow
def test_each_data_group_draws_one_task_and_sharded_equals_unsharded(config, tmp_path):
    with config.unlocked():
        config.train.grad_accum_steps = 2
    sharded = _task(config, tmp_path / "sharded")
    host = next(sharded.train_iterator())
    placed = sharded.device_batch(host)
    assert placed["task"].shape == (2, 8)
    for shard in placed["task"].addressable_shards:  # data shard g holds one task
        assert len(np.unique(np.asarray(shard.data))) == 1
    one = _task(config, tmp_path / "one", make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert one.groups == 1
    # the same host rows, grouped for 1 device: the step must give the same update
    reference, loss_ref = _step(one, host)
    params, loss = _step(sharded, host)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=False):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_train_end_to_end_reports_triplet_accuracy_per_task(config, tmp_path):
    metrics = train_and_evaluate(config, tmp_path / "run")
    assert set(metrics) == {
        f"{task}/triplet_acc"
        for task in ("interests", "storylines", "hashtags", "queries", "intent")
    }
    task = _task(config, tmp_path / "run")
    ids, records = task.corpus("post")
    from lf_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    state, _ = ckpt.restore(ckpt.latest_step(), task.init_state(), None)
    ckpt.close()
    vectors = task.embed(state, "post", records[:3])
    assert vectors.shape == (3, 50) and ids[0] == "t0"


def test_triplet_accuracy_oracle():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert triplet_accuracy(a, a, -a) == 1.0
    assert triplet_accuracy(a, -a, a) == 0.0
