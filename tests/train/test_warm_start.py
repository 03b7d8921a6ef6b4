"""Warm start on a new data window: snapshot tables restored, new ids -> the OOV row."""

import json

import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError
from lf_jax.train.checkpoint import Checkpointer
from lf_jax.train.loop import prepare_workdir, run_training
from lf_jax.train.ranker import RankerTask
from lf_jax.train.warm_start import snapshot_vocabulary


def _snapshot_config(directory, **rows):
    directory.mkdir(parents=True, exist_ok=True)
    tables = {name: {"vocab_size": count, "dim": 4} for name, count in rows.items()}
    (directory / "config.json").write_text(json.dumps({"embedding": {"tables": tables}}))
    return directory


def test_tables_keep_snapshot_rows_and_new_ids_go_to_the_last_row(tmp_path):
    snapshot = _snapshot_config(tmp_path / "w1", member=11, hashtag=6)
    tables = [
        TableSpec(name="member", vocab_size=21, dim=4),
        TableSpec(name="hashtag", vocab_size=6, dim=4),
    ]
    features = [
        FeatureSpec(name="member_id", table="member"),
        FeatureSpec(name="actor_id", table="member"),
        FeatureSpec(name="tags", table="hashtag", max_ids=3, combiner="mean"),
    ]
    new_tables, new_features, notes = snapshot_vocabulary(
        tables, features, snapshot, {"member": 20, "hashtag": 5}
    )
    assert [t.vocab_size for t in new_tables] == [11, 6]
    assert [f.oov_row for f in new_features] == [10, 10, None]
    assert notes == [
        "member: ids >= 10 (10 new since the snapshot) -> OOV row 10 until the "
        "vocabulary is rebuilt"
    ]


def test_bad_snapshots_name_the_problem(tmp_path):
    tables = [TableSpec(name="member", vocab_size=21, dim=4)]
    with pytest.raises(UserInputError, match="has no config.json"):
        snapshot_vocabulary(tables, [], tmp_path / "nowhere", {})
    with pytest.raises(UserInputError, match=r"no table\(s\) \['member'\]"):
        snapshot_vocabulary(tables, [], _snapshot_config(tmp_path / "w1", post=3), {})


@pytest.mark.slow
def test_warm_started_ranker_maps_ids_added_since_the_snapshot(
    small_ranker_config, static_ranker_run, tmp_path
):
    config = small_ranker_config
    snapshot_dir = static_ranker_run["workdir"]  # window 1: small_ranker_config, 6 steps
    snapshot_step = Checkpointer(snapshot_dir / "checkpoints").latest_step()
    assert snapshot_step == config.train.steps

    # The second window's data knows more members than the snapshot: pretend the snapshot
    # was taken when only the first 100 member ids existed (its config says 101 rows).
    small = _snapshot_config(
        tmp_path / "small_snapshot", member=101, hashtag=1_000, post=10_000, position=20
    )
    with config.unlocked():
        config.train.warm_start = str(small)
    task = RankerTask(
        config, make_mesh(dict(config.mesh)), prepare_workdir(tmp_path / "w2", config)
    )
    host = next(task.train_iterator())
    ids = task.model_inputs(host)["sparse"]
    member_ids = np.asarray(host["member_id"]).reshape(-1)
    assert member_ids.max() > 100, "the tiny data should hold member ids beyond the fake snapshot"
    mapped = np.asarray(ids.ids["member_id"]).reshape(-1)
    np.testing.assert_array_equal(mapped, np.minimum(member_ids, 100))

    # A real warm start from window 1 restores its tables and trains on.
    with config.unlocked():
        config.train.warm_start = str(snapshot_dir)
    workdir = tmp_path / "w2_real"
    task = RankerTask(config, make_mesh(dict(config.mesh)), prepare_workdir(workdir, config))
    run_training(task, config.train, workdir)
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    metrics_rows = [row for row in history if "loss" in row]
    assert metrics_rows and all(np.isfinite(row["loss"]) for row in metrics_rows)
