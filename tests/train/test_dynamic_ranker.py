"""The feed ranker with member and post ids in dynamic tables (capacity below the ids):
trained by run_training, counters in the log, find-only evaluation, checkpoints with keys,
exact resume (also on 4 devices after a checkpoint on 8), warm start from a static run."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest

from lf_jax.console import get_logger
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import table_wise_row_wise
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


@pytest.mark.slow
def test_dynamic_ranker_trains_logs_counters_evaluates_and_resumes_bit_exact(
    dynamic_config, tmp_path, kill_before_batch
):
    """One 6-step run: its counters, a find-only evaluation of its last checkpoint (no key
    inserted, nothing changed), and a run killed after step 4 that resumes to the same
    step-6 state bit for bit."""
    with dynamic_config.unlocked():
        dynamic_config.data.eval_batch_size = 4096
        dynamic_config.data.eval_examples = 20_000  # 5 batches of each holdout
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

    before = jax.device_get(expected_state["dynamic"])
    metrics = uninterrupted.evaluate(expected_state)
    for split in ("holdout_ranked", "holdout_random"):
        assert 0.0 <= metrics[f"{split}/like/auc"] <= 1.0
    assert metrics["dynamic/post/occupancy"] > 0 and metrics["dynamic/member/inserts"] > 0
    after = jax.device_get(expected_state["dynamic"])
    for key, value in flatten_to_dict(before).items():  # evaluation finds, never inserts
        np.testing.assert_array_equal(flatten_to_dict(after)[key], value, err_msg=key)

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


@pytest.mark.slow
def test_dynamic_run_checkpointed_on_8_devices_continues_on_4_like_on_8(
    dynamic_config, tmp_path, kill_before_batch
):
    """Step 4 on the (2, 4) mesh -> resume on a (2, 2) mesh -> step 6 equals steps 5-6 on
    (2, 4): the same keys with the same last/freq and counters, rows, slots and params
    equal up to float summation order. Capacities leave room on both meshes (no eviction
    or refusal): which key a full window evicts depends on the mesh, so under capacity
    pressure the two runs differ by design. The 8-device run stops before batch 5 (after
    the step-4 checkpoint), so its resume compiles the same step (compilation cache)."""
    with dynamic_config.unlocked():
        for name, capacity in (("member", 1024), ("post", 4096)):
            dynamic_config.embedding.tables[name].vocab_size = capacity
            dynamic_config.embedding.tables[name].dynamic.probe_limit = 16
    assert dynamic_config.train.steps == 6
    eight, four = tmp_path / "eight", tmp_path / "four"
    kill_before_batch(_task(dynamic_config, eight), dynamic_config.train, eight, 5)
    shutil.copytree(eight, four)
    task8 = _task(dynamic_config, eight)
    run_training(task8, dynamic_config.train, eight)
    mesh4 = make_mesh({"data": 2, "model": -1}, devices=jax.devices()[:4])
    task4 = _task(dynamic_config, four, mesh4)
    run_training(task4, dynamic_config.train, four)  # rehashes the step-4 keys onto 4

    states = [_restore(task, path, 6) for task, path in ((task8, eight), (task4, four))]
    assert states[1]["dynamic"]["post"]["key_hi"].shape == (4, 1024)
    views = [{"embedding": s["embedding"], "index": s["dynamic"]} for s in states]
    counters = [t.dynamic.counters(v) for t, v in zip((task8, task4), views, strict=True)]
    for table in ("member", "post"):
        c8, c4 = counters[0][table], counters[1][table]
        assert c8["refused"] == c8["evictions"] == c4["refused"] == c4["evictions"] == 0
        assert c8["inserts"] == c4["inserts"] > 50 and c8["hits"] == c4["hits"] > 0
        a, b = (t.dynamic.snapshot(v)[table] for t, v in zip((task8, task4), views, strict=True))
        assert a["keys"].tolist() == b["keys"].tolist()
        assert a["last"].tolist() == b["last"].tolist() and a["freq"].tolist() == b["freq"].tolist()
        np.testing.assert_allclose(a["rows"], b["rows"], rtol=1e-5, atol=1e-6, err_msg=table)
        for slot in a["slots"]:
            np.testing.assert_allclose(a["slots"][slot], b["slots"][slot], rtol=1e-5, atol=1e-7)
    params = [flatten_to_dict(s["params"]) for s in states]
    for key, value in params[0].items():
        np.testing.assert_allclose(params[1][key], value, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_static_run_warm_starts_a_dynamic_run(small_ranker_config, static_ranker_run, tmp_path):
    """train.warm_start of a static run into dynamic member/post tables: params and static
    tables as saved, row r of a static id table -> key r with its optimizer slots; post's
    64 slots take the rows that fit (one warning), the loop trains on from there. post is
    planned table_wise_row_wise over "model" in group 1 (devices 4..7 of the 2 x 4 mesh,
    4 shards of 16 slots): its keys stay on those devices through the warm start and a
    training step. The static run is static_ranker_run (small_ranker_config, 6 steps),
    shared with the other static-run tests."""
    from lf_jax.train.dynamic_warm_start import warm_start_from_static

    config = small_ranker_config
    static, static_task = static_ranker_run["workdir"], static_ranker_run["task"]
    saved = _restore(static_task, static, 6)
    tables = static_task.collection.logical_tables(saved["embedding"])
    slots = static_task.collection.logical_slots(saved["embedding"])
    with config.unlocked():
        for name, capacity in (("member", 1024), ("post", 64)):
            config.embedding.tables[name].vocab_size = capacity
            config.embedding.tables[name].dynamic = {**POLICY, "probe_limit": 16}
        config.train.warm_start = str(static)
        config.train.steps = 1
        config.embedding.plan = {"post": table_wise_row_wise(1, "model")}
    task = _task(config, tmp_path / "dynamic")
    assert "dynamic post: 4 shards x 16 slots" in task.plan_table
    assert task.dynamic.layouts["post"].devices == (4, 5, 6, 7)
    source, warnings = Checkpointer(static / "checkpoints"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    get_logger().addHandler(handler)
    try:
        state = warm_start_from_static(task.dynamic, task.init_state(), source, 6)
    finally:
        get_logger().removeHandler(handler)
        source.close()
    for key, value in flatten_to_dict(saved["params"]).items():
        np.testing.assert_array_equal(flatten_to_dict(state["params"])[key], value, err_msg=key)
    logical = task.collection.logical_tables(state["embedding"])
    for name in set(tables) - {"member", "post"}:
        np.testing.assert_array_equal(logical[name], tables[name], err_msg=name)
    snap = task.dynamic.snapshot({"embedding": state["embedding"], "index": state["dynamic"]})
    assert snap["member"]["keys"].tolist() == list(range(tables["member"].shape[0] - 1))
    assert snap["post"]["keys"].size == 64  # 999 ids for 64 slots: every slot taken
    assert len(warnings) == 1 and "dynamic table post holds" in warnings[0]
    for name in ("member", "post"):
        keys = snap[name]["keys"].astype(np.int64)
        np.testing.assert_array_equal(snap[name]["rows"], tables[name][keys], err_msg=name)
        for slot, value in snap[name]["slots"].items():
            want = slots[name][slot][keys]
            np.testing.assert_array_equal(value, want if value.ndim == 2 else want[:, 0])
        assert set(snap[name]["last"].tolist()) == {6}  # stamped with the snapshot's step

    run_training(task, config.train, tmp_path / "dynamic")  # the loop's warm start
    trained = _restore(task, tmp_path / "dynamic", 1)
    view = {"embedding": trained["embedding"], "index": trained["dynamic"]}
    member = task.dynamic.snapshot(view)["member"]
    assert member["keys"].tolist() == snap["member"]["keys"].tolist()  # nothing new to insert
    assert task.dynamic.counters(view)["member"]["inserts"] == 0
    for post_state in (state["dynamic"]["post"], trained["dynamic"]["post"]):
        taken = (np.asarray(post_state["last"]) >= 0).sum(axis=1)  # keys per device
        assert taken[:4].tolist() == [0, 0, 0, 0] and taken[4:].sum() == 64, taken
    assert task.dynamic.counters(view)["post"]["inserts"] > 0  # the step's new posts


def test_time_order_needs_a_dataset_stored_in_time_order(small_ranker_config, tmp_path):
    """data.order='time' on feed_logs/tiny (records stored shuffled) is one clear error."""
    from lf_jax.errors import UserInputError

    with small_ranker_config.unlocked():
        small_ranker_config.data.order = "time"
    with pytest.raises(UserInputError, match="data.order='time' needs a dataset stored in time"):
        _task(small_ranker_config, tmp_path / "t")
