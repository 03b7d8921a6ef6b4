"""The feed ranker with member and post ids in dynamic tables (capacity below the ids):
trained by run_training, counters in the log, checkpoints with keys, exact resume,
find-only evaluation."""

import json

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.train.checkpoint import Checkpointer, flatten_to_dict
from lf_jax.train.loop import prepare_workdir, run_training
from lf_jax.train.ranker import RankerTask

POLICY = {"eviction": "lru", "probe_limit": 4, "admit_after": 1, "expected_keys": 1000}


@pytest.fixture
def dynamic_config(small_ranker_config):
    """small_ranker_config with member (144 rows for 300 ids) and post (64 rows for 1,000
    ids) as dynamic tables: every step inserts and evicts."""
    config = small_ranker_config
    with config.unlocked():
        for name, capacity in (("member", 144), ("post", 64)):
            config.embedding.tables[name].vocab_size = capacity
            config.embedding.tables[name].dynamic = dict(POLICY)
    return config


def _task(config, workdir, mesh=None):
    workdir = prepare_workdir(workdir, config)
    return RankerTask(config, mesh or make_mesh(dict(config.mesh)), workdir)


def _host(task, state) -> dict:
    out = {k: np.asarray(v) for k, v in flatten_to_dict(state["params"]).items()}
    out.update(task.collection.logical_tables(state["embedding"]))
    out.update({k: np.asarray(v) for k, v in flatten_to_dict(state["dynamic"]).items()})
    return out


def _restore(task, workdir, step):
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return ckpt.restore(step, task.init_state(), task.collection)[0]
    finally:
        ckpt.close()


def test_dynamic_ranker_trains_logs_counters_and_resumes_bit_exact(
    dynamic_config, tmp_path, kill_before_batch
):
    uninterrupted = _task(dynamic_config, tmp_path / "a")
    assert uninterrupted.dynamic is not None
    assert "dynamic post: 8 shards x 8 slots" in uninterrupted.plan_table
    run_training(uninterrupted, dynamic_config.train, tmp_path / "a")
    expected_state = _restore(uninterrupted, tmp_path / "a", 6)
    expected = _host(uninterrupted, expected_state)

    history = [json.loads(line) for line in open(tmp_path / "a" / "history.jsonl")]
    last = history[-1]
    assert last["step"] == 6
    for table in ("member", "post"):
        assert last[f"dynamic/{table}/inserts"] > 0
        assert last[f"dynamic/{table}/evictions"] > 0  # capacity below the ids seen
        assert 0.9 < last[f"dynamic/{table}/occupancy"] <= 1.0
        assert last[f"dynamic/{table}/hits"] > 0
    assert history[0]["dynamic/post/inserts"] < last["dynamic/post/inserts"]  # cumulative
    # the restored keys are the ones the counters describe
    counters = uninterrupted.dynamic.counters(
        {"embedding": expected_state["embedding"], "index": expected_state["dynamic"]}
    )
    assert counters["post"]["inserts"] == last["dynamic/post/inserts"]

    # killed after the step-4 checkpoint
    kill_before_batch(
        _task(dynamic_config, tmp_path / "b"), dynamic_config.train, tmp_path / "b", 5
    )
    resumed = _task(dynamic_config, tmp_path / "b")
    run_training(resumed, dynamic_config.train, tmp_path / "b")
    got = _host(resumed, _restore(resumed, tmp_path / "b", 6))
    assert got.keys() == expected.keys()
    for key in expected:  # params, tables, slots and every hash table field
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_evaluation_finds_keys_without_changing_them(dynamic_config, tmp_path):
    with dynamic_config.unlocked():
        dynamic_config.train.steps = 2
        dynamic_config.data.eval_batch_size = 4096  # 26 eval batches instead of 208
    task = _task(dynamic_config, tmp_path / "e")
    run_training(task, dynamic_config.train, tmp_path / "e")
    state = _restore(task, tmp_path / "e", 2)
    before = jax.device_get(state["dynamic"])
    metrics = task.evaluate(state)
    for split in ("holdout_ranked", "holdout_random"):
        assert 0.0 <= metrics[f"{split}/like/auc"] <= 1.0
    assert metrics["dynamic/post/occupancy"] > 0 and metrics["dynamic/member/inserts"] > 0
    after = jax.device_get(state["dynamic"])
    for key, value in flatten_to_dict(before).items():
        np.testing.assert_array_equal(flatten_to_dict(after)[key], value, err_msg=key)


def test_export_and_serving_refuse_a_dynamic_run(dynamic_config):
    """They read static tables only (the model without the dataset builder): one error."""
    from lf_jax.errors import UserInputError
    from lf_jax.train.ranker_model import RankerModel

    with pytest.raises(UserInputError, match=r"embedding.tables.member.dynamic: export, serving"):
        RankerModel.from_config(dynamic_config, make_mesh(dict(dynamic_config.mesh)), build=False)
