"""build_dataset / dataset_metadata and the feed_logs tfds builder (tiny, built offline)."""

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest

from lf_jax.input import DatasetError, available_datasets, build_dataset, dataset_metadata
from lf_jax.input.datasets import DATA_ROOT, builder_class

SCALARS = ("member_id", "actor_id", "root_actor_id", "post_id", "session_id", "position")
LISTS = {"post_hashtags": (1, 5), "history_actors": (0, 50), "history_hashtags": (0, 50)}
FOURS = {"labels": np.int64, "true_probs": np.float32, "relevance_probs": np.float32}
FIELDS = set(SCALARS) | set(LISTS) | set(FOURS) | {"random_session", "dense"}


def _shrink_tiny(patch):
    """Patches tiny's simulator config to a 1,000-session world (20,000 train impressions)."""
    tiny = builder_class("feed_logs").builder_configs["tiny"]
    patch.setattr(
        tiny,
        "sim",
        dataclasses.replace(
            tiny.sim, train_sessions=1_000, holdout_ranked_sessions=50, holdout_random_sessions=100
        ),
    )
    return tiny


@pytest.fixture(scope="module")
def small_tiny_build(tmp_path_factory):
    """(tiny's config as shrunk, a feed_logs build of it): a complete build in seconds."""
    with pytest.MonkeyPatch.context() as patch:
        tiny = _shrink_tiny(patch)
        sim = tiny.sim
        builder = build_dataset(
            "feed_logs", config="tiny", data_dir=tmp_path_factory.mktemp("small_tiny")
        )
    return sim, builder


def test_tiny_builds_with_documented_splits_and_metadata(feed_builder):
    meta = dataset_metadata(feed_builder)
    assert meta["num_examples"] == {
        "train": 400_000,
        "holdout_ranked": 6_000,
        "holdout_random": 100_000,
    }
    assert meta["num_members"] == 300 and meta["num_hashtags"] == 100 and meta["num_posts"] == 1_000
    assert meta["max_lengths"] == {"post_hashtags": 5, "history_actors": 50, "history_hashtags": 50}
    assert meta["tasks"] == ["like", "comment", "share", "long_dwell"] and meta["dense_dim"] == 8
    assert meta["name"] == "feed_logs" and meta["config"] == "tiny"
    assert set(feed_builder.info.features) == FIELDS
    files = sorted(f.name for f in feed_builder.data_path.glob("*.array_record*"))
    for split in meta["num_examples"]:  # every split complete: shards 0..n-1 of n
        shards = [f for f in files if f.startswith(f"feed_logs-{split}.array_record-")]
        count = len(shards)
        assert shards == [
            f"feed_logs-{split}.array_record-{i:05d}-of-{count:05d}" for i in range(count)
        ]
    assert len(files) == sum(
        1
        for f in files
        if f.split(".array_record-")[0] in {f"feed_logs-{s}" for s in meta["num_examples"]}
    )


@pytest.mark.parametrize("split", ["train", "holdout_ranked", "holdout_random"])
def test_split_records_have_documented_fields(feed_builder, split):
    source = feed_builder.as_data_source(split)
    meta = dataset_metadata(feed_builder)
    rows = [source[i] for i in range(0, len(source), max(1, len(source) // 200))]
    for row in rows:
        assert set(row) == FIELDS
        for name in SCALARS:
            assert np.asarray(row[name]).shape == () and np.asarray(row[name]).dtype.kind == "i"
        assert np.asarray(row["random_session"]).dtype == np.bool_
        assert row["dense"].shape == (8,) and row["dense"].dtype == np.float32
        for name, dtype in FOURS.items():
            assert row[name].shape == (4,) and row[name].dtype == dtype, name
        for name, (low, high) in LISTS.items():
            ids = np.asarray(row[name])
            assert ids.ndim == 1 and low <= ids.size <= high, name
        assert 0 <= row["member_id"] < meta["num_members"]
        assert 0 < row["true_probs"].min() and row["true_probs"].max() < 1
        assert 0 <= row["position"] < meta["num_positions"]
    random = {bool(row["random_session"]) for row in rows}
    expected = {"train": {True, False}, "holdout_ranked": {False}, "holdout_random": {True}}[split]
    assert random == expected


def test_holdout_sessions_are_not_in_train(feed_builder):
    sessions = {}
    for split in ("train", "holdout_ranked", "holdout_random"):
        source = feed_builder.as_data_source(split)
        rows = source.__getitems__(list(range(0, len(source), max(1, len(source) // 6000))))
        sessions[split] = {int(row["session_id"]) for row in rows}
    assert not sessions["train"] & sessions["holdout_ranked"]
    assert not sessions["train"] & sessions["holdout_random"]
    assert not sessions["holdout_ranked"] & sessions["holdout_random"]


def test_rebuild_is_a_noop_and_metadata_reads_back(feed_builder, feed_data_dir):
    again = build_dataset("feed_logs", config="tiny", data_dir=feed_data_dir)
    assert again.is_prepared()
    assert dataset_metadata(again) == dataset_metadata(feed_builder)


def test_builder_file_can_be_imported_twice():
    path = DATA_ROOT / "feed_logs" / "feed_logs.py"
    spec = importlib.util.spec_from_file_location("feed_logs_second_copy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["feed_logs_second_copy"] = module
    try:
        spec.loader.exec_module(module)  # would raise "already registered" without the guard
    finally:
        del sys.modules["feed_logs_second_copy"]
    assert module.FeedLogs.name == builder_class("feed_logs").name == "feed_logs"


def test_errors_name_the_path(tmp_path):
    assert "feed_logs" in available_datasets()
    with pytest.raises(DatasetError, match=r"data/no_such_data/no_such_data\.py"):
        build_dataset("no_such_data", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="lower_snake_case"):
        build_dataset("../etc", data_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"no config 'huge'.*'large', 'small', 'tiny'"):
        build_dataset("feed_logs", config="huge", data_dir=tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with pytest.raises(DatasetError, match=f"{a_file}.* not a directory"):
        build_dataset("feed_logs", data_dir=a_file)
    with pytest.raises(DatasetError, match=f"{a_file / 'sub'}.* not writable"):
        build_dataset("feed_logs", data_dir=a_file / "sub")


def test_split_over_the_shuffle_buffer_builds_without_tensorflow(
    small_tiny_build, tmp_path, monkeypatch
):
    """tfds spills splits over 1 GB (here: 100 kB) to bucket files, through tf.io.gfile; the
    spilled build holds the same records in the same order as one shuffled in memory (a
    1,000-session tiny world keeps both builds short)."""
    from tensorflow_datasets.core import shuffle

    sim, want = small_tiny_build
    _shrink_tiny(monkeypatch)
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 100_000)
    spilled = build_dataset("feed_logs", config="tiny", data_dir=tmp_path / "spilled")
    assert not list(tmp_path.rglob("bucket_*.tmp"))  # cleaned up
    for split in ("train", "holdout_random"):
        want_source, got = want.as_data_source(split), spilled.as_data_source(split)
        assert len(got) == len(want_source) == sim.num_impressions(split)
        for i in range(0, len(want_source), 97):  # same records, same order
            assert got[i]["session_id"] == want_source[i]["session_id"]
            assert got[i]["position"] == want_source[i]["position"]
            np.testing.assert_array_equal(
                got[i]["history_actors"], want_source[i]["history_actors"]
            )


def test_train_stats_match_the_stored_records(small_tiny_build):
    """The builder's train_stats (dense standardisation, IPS counts) equal a pass over train
    (of a 1,000-session build: the pass decodes every record)."""
    from lf_jax.train.ips import position_counts
    from lf_jax.train.ranker_model import dense_feature_stats

    _, feed_builder = small_tiny_build
    stats = dataset_metadata(feed_builder)["train_stats"]
    source = feed_builder.as_data_source("train")
    rows = source.__getitems__(list(range(len(source))))
    assert stats["num_examples"] == len(rows)
    dense = np.asarray([row["dense"] for row in rows], np.float64)
    mean, std = dense_feature_stats(feed_builder)
    np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, dense.std(0), rtol=1e-4, atol=1e-6)
    counts = position_counts(
        np.asarray([row["position"] for row in rows]),
        np.asarray([row["random_session"] for row in rows]),
        np.asarray([row["labels"] for row in rows]),
        num_positions=dataset_metadata(feed_builder)["num_positions"],
    )
    for key, value in counts.items():
        np.testing.assert_array_equal(np.asarray(stats[key]), value, err_msg=key)


def test_built_dataset_opens_from_its_files_without_builder_code(feed_builder, feed_data_dir):
    from lf_jax.input.datasets import open_built_dataset

    built = open_built_dataset("feed_logs", "tiny", feed_data_dir)
    assert type(built) is not type(feed_builder)  # tfds read it back; data/ code not used
    want, got = dataset_metadata(feed_builder), dataset_metadata(built)
    for key in ("num_members", "num_posts", "tasks", "dense_dim", "train_stats", "num_examples"):
        assert got[key] == want[key], key
    assert len(built.as_data_source("train")) == len(feed_builder.as_data_source("train"))
    with pytest.raises(DatasetError, match="feed_logs/small is not built in"):
        open_built_dataset("feed_logs", "small", feed_data_dir)
