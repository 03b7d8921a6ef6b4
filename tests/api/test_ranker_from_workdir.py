"""A feed ranker trained by `lf-jax train` (train_and_evaluate) opens as an lf_jax.Ranker that
scores a host batch as the run's evaluation does, and saves a directory Ranker.load opens."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lf_jax
from lf_jax.errors import UserInputError


@pytest.mark.slow
def test_a_cli_run_opens_as_a_ranker_that_scores_like_its_evaluation(
    shrunk_ranker_config, feed_builder, tmp_path
):
    from lf_jax.input.feed_pipeline import EvalReader
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import build_task, train_and_evaluate

    config = shrunk_ranker_config()
    with config.unlocked():
        config.train.ips = False
        config.train.steps = 4
        config.train.eval_every = 0
        config.train.checkpoint_every = 4
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)

    ranker = lf_jax.Ranker.from_workdir(workdir)
    assert ranker.steps_trained == 4 and ranker.tasks == tuple(feed_builder.info.metadata["tasks"])

    # the run's own scoring of one holdout batch: its task, its checkpoint, its eval step
    task = build_task(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", create=False)
    state, _, _ = checkpointer.restore_newest(task.init_state(), task.collection)
    checkpointer.close()
    reader = EvalReader(
        task.builder, "holdout_random", global_batch_size=64, max_lengths=task._list_lengths()
    )
    host = next(iter(reader))
    inputs = task.model_inputs(host)
    inputs.pop("weights")
    rows = NamedSharding(task.mesh, PartitionSpec(tuple(task.mesh.axis_names)))
    placed = jax.tree.map(lambda x: jax.device_put(x, rows), inputs)
    expected = np.asarray(task._eval_step(state["params"], state["embedding"]["tables"], placed))

    np.testing.assert_allclose(ranker.predict(host), expected, atol=1e-5)
    saved = ranker.save(tmp_path / "model")
    other_mesh = lf_jax.Ranker.load(saved, mesh={"data": 2, "model": 4})
    np.testing.assert_allclose(other_mesh.predict(host), expected, atol=1e-5)
    assert other_mesh.steps_trained == 4

    with pytest.raises(UserInputError, match="no checkpoint"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
        lf_jax.Ranker.from_workdir(tmp_path / "empty")
