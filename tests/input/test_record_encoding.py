"""RecordBatchEncoder against tfds's own per-example serialisation (parsed records equal)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.proto import tf_example_pb2

from lf_jax.data.feed_logs import simulator
from lf_jax.input.datasets import builder_class
from lf_jax.input.record_encoding import RecordBatchEncoder, RecordEncodingError

Example = tf_example_pb2.Example


def tfds_records(features, examples) -> list[bytes]:
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    return [serializer.serialize_example(features.encode_example(e)) for e in examples]


def assert_same_examples(got: list[bytes], want: list[bytes]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert Example.FromString(a) == Example.FromString(b), f"record {i}"


def test_feed_logs_chunk_encodes_like_tfds(tmp_path):
    builder = builder_class("feed_logs")(config="tiny", data_dir=str(tmp_path))
    sim = builder.builder_config.sim
    chunk = next(simulator.simulate_chunks(sim, "holdout_random", simulator.make_world(sim)))
    chunk = {name: value[:1500] for name, value in chunk.items()}
    chunk["history_actors"][:7] = -1  # members without history: empty lists
    examples = [example for _, example in simulator.chunk_examples(sim, chunk)]
    columns = dict(chunk)
    for name in simulator.LIST_FIELDS:
        columns[name] = (chunk[name], (chunk[name] >= 0).sum(axis=1))
    got = RecordBatchEncoder(builder.info.features)(columns)
    assert_same_examples(got, tfds_records(builder.info.features, examples))


def test_any_int64_value_list_lengths_and_floats_encode_like_tfds():
    features = tfds.features.FeaturesDict(
        {
            "big": tfds.features.Scalar(np.int64),
            "flag": tfds.features.Scalar(np.bool_),
            "ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "pair": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        }
    )
    rng = np.random.default_rng(0)
    n = 400
    big = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    big[:10] = [0, 1, 127, 128, 16383, 16384, -1, 2**63 - 1, -(2**63), 300]
    ids = [rng.integers(-5, 2**40, rng.integers(0, 40)) for _ in range(n)]  # 0..39 values
    pair = rng.normal(size=(n, 2)).astype(np.float32)
    flag = rng.random(n) < 0.5
    got = RecordBatchEncoder(features)({"big": big, "flag": flag, "ids": ids, "pair": pair})
    examples = [{"big": big[i], "flag": flag[i], "ids": ids[i], "pair": pair[i]} for i in range(n)]
    assert_same_examples(got, tfds_records(features, examples))


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"a": np.arange(3)}, r"columns lack feature\(s\) \['b'\]"),
        ({"a": np.arange(3), "b": np.ones((2, 2))}, "feature 'b' has 2 examples, expected 3"),
        ({"a": np.arange(3), "b": np.ones((3, 3))}, r"feature 'b' has shape \(3, 3\)"),
        ({"a": np.ones(3), "b": np.ones((3, 2))}, "integer feature 'a' got float values"),
    ],
)
def test_columns_that_disagree_with_the_features_are_named(columns, message):
    features = tfds.features.FeaturesDict(
        {
            "a": tfds.features.Scalar(np.int64),
            "b": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        }
    )
    with pytest.raises(RecordEncodingError, match=message):
        RecordBatchEncoder(features)(columns)


def test_unsupported_features_are_named():
    nested = tfds.features.FeaturesDict(
        {"grid": tfds.features.Tensor(shape=(2, 3), dtype=np.int64)}
    )
    with pytest.raises(RecordEncodingError, match=r"feature 'grid' \(Tensor, shape \(2, 3\)\)"):
        RecordBatchEncoder(nested)
    text = tfds.features.FeaturesDict({"title": tfds.features.Text()})
    with pytest.raises(RecordEncodingError, match="feature 'title'"):
        RecordBatchEncoder(text)
