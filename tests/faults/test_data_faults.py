"""Data faults: mean bags whose weights sum to <= 0, and dataset shards that are truncated
or bit-flipped (one line naming the file)."""

import os
import shutil

import numpy as np
import pytest
from cli_probe import cli, one_error_line, ranker_args

from lf_jax.embedding.preprocess import InvalidIdsError, preprocess
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.input.datasets import DatasetError, read_records


def mean_bag():
    tables = {"t": TableSpec(name="t", vocab_size=5, dim=2)}
    features = {"f": FeatureSpec(name="f", table="t", max_ids=3, combiner="mean", weighted=True)}
    return features, tables


@pytest.mark.parametrize(
    ("weights", "total"), [([[1.0, -2.0]], "-1"), ([[1.0, -1.0]], "0"), ([[-0.5]], "-0.5")]
)
def test_weighted_mean_bag_needs_a_positive_weight_sum(weights, total):
    features, tables = mean_bag()
    ids = [[1, 2]] if len(weights[0]) == 2 else [[3]]
    with pytest.raises(InvalidIdsError, match=f"example 0 has weights summing to {total}; "):
        preprocess(features, tables, {"f": ids}, {"f": weights})


def test_weighted_mean_bag_accepts_positive_sums_empty_and_all_zero_bags():
    features, tables = mean_bag()
    batch = preprocess(features, tables, {"f": [[1, 2], [], [4]]}, {"f": [[3.0, -1.0], [], [0.0]]})
    assert batch.weights["f"].sum(axis=1).tolist() == [2.0, 0.0, 0.0]


def shard_copy(feed_data_dir, tmp_path) -> tuple:
    """A copy of the built tiny feed_logs (shards hard-linked) whose train shard 0 is a
    real copy to damage: (data_dir, version directory, that shard)."""
    source = next((feed_data_dir / "feed_logs" / "tiny").iterdir())
    data_dir = tmp_path / "tfds"
    version = data_dir / "feed_logs" / "tiny" / source.name
    shutil.copytree(feed_data_dir / "feed_logs", data_dir / "feed_logs", copy_function=os.link)
    shard = next(version.glob("feed_logs-train.array_record-00000-of-*"))
    shard.unlink()
    shutil.copyfile(next(source.glob(shard.name)), shard)
    return data_dir, version, shard


def test_truncated_shard_is_one_line_naming_it(
    repo_root, feed_builder, feed_data_dir, tmp_path, capsys
):
    data_dir, _, shard = shard_copy(feed_data_dir, tmp_path)
    with open(shard, "r+b") as file:
        file.truncate(shard.stat().st_size // 3)
    workdir = tmp_path / "run"
    code, _, err = cli(capsys, "train", *ranker_args(repo_root, data_dir, workdir))
    line = one_error_line(err, "train")
    assert code == 2 and f"dataset file '{shard}' cannot be read" in line, err


def test_bit_flipped_shard_names_it(feed_builder, feed_data_dir, tmp_path):
    import tensorflow_datasets as tfds

    _, version, shard = shard_copy(feed_data_dir, tmp_path)
    data = bytearray(shard.read_bytes())
    for offset in range(len(data) // 4, len(data) // 2, 4096):  # flip a bit in many chunks
        data[offset] ^= 0x10
    shard.write_bytes(bytes(data))
    records = tfds.builder_from_directory(str(version)).as_data_source("train").data_source
    with pytest.raises(DatasetError, match=f"dataset file '{shard}' cannot be read"):
        read_records(records, np.arange(len(records)))
