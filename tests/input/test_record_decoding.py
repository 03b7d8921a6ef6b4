"""RecordBatchDecoder against tfds's own per-example decoding (collate of decoded examples)."""

import numpy as np
import pytest

from lf_jax.input import collate
from lf_jax.input.record_decoding import RecordBatchDecoder, RecordDecodingError


@pytest.mark.parametrize("split", ["train", "holdout_random", "holdout_ranked"])
@pytest.mark.parametrize(
    "lengths, int_dtype",
    [
        ({"post_hashtags": 5, "history_actors": 50, "history_hashtags": 50}, np.int32),
        (
            {"post_hashtags": 2, "history_actors": 3, "history_hashtags": 64},
            np.int64,
        ),  # cut and padded
    ],
)
def test_decoded_batch_equals_tfds_decoding(feed_builder, split, lengths, int_dtype):
    source = feed_builder.as_data_source(split)
    indices = [int(i) for i in np.random.default_rng(7).choice(len(source), 300, replace=False)]
    want = collate(source.__getitems__(indices), lengths, int_dtype)
    got = RecordBatchDecoder(feed_builder.info.features, lengths, int_dtype)(
        source.data_source.__getitems__(indices)
    )
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    assert (got["history_actors"][:, :3] >= -1).all() and got["random_session"].dtype == bool


def test_variable_length_feature_needs_a_max_length(feed_builder):
    with pytest.raises(RecordDecodingError, match="feature 'history_actors' has variable length"):
        RecordBatchDecoder(feed_builder.info.features, {"post_hashtags": 5, "history_hashtags": 50})


def test_unsupported_features_are_named():
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict(
        {
            "ok": tfds.features.Scalar(np.int64),
            "grid": tfds.features.Tensor(shape=(2, 3), dtype=np.int64),
        }
    )
    with pytest.raises(RecordDecodingError, match=r"feature 'grid' \(Tensor, shape \(2, 3\)\)"):
        RecordBatchDecoder(features, {})
    text = tfds.features.FeaturesDict({"title": tfds.features.Text()})
    with pytest.raises(RecordDecodingError, match="feature 'title'"):
        RecordBatchDecoder(text, {})


def test_a_record_with_the_wrong_width_is_named(feed_builder):
    from tensorflow_datasets.proto import tf_example_pb2

    source = feed_builder.as_data_source("holdout_ranked")
    records = source.data_source.__getitems__([0, 1, 2])
    broken = tf_example_pb2.Example.FromString(records[1])
    del broken.features.feature["dense"].float_list.value[3:]
    decode = RecordBatchDecoder(
        feed_builder.info.features,
        {"post_hashtags": 5, "history_actors": 50, "history_hashtags": 50},
    )
    with pytest.raises(
        RecordDecodingError, match="feature 'dense': record 1 of the batch has 3 values, expected 8"
    ):
        decode([records[0], broken.SerializeToString(), records[2]])


def test_malformed_or_incomplete_records_are_named():
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    features = tfds.features.FeaturesDict(
        {
            "a": tfds.features.Scalar(np.int64),
            "b": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        }
    )
    decode = RecordBatchDecoder(features, {}, int_dtype=np.int64)

    def record(**values) -> bytes:
        example = tf_example_pb2.Example()
        for name, (kind, items) in values.items():
            getattr(example.features.feature[name], kind).value.extend(items)
        return example.SerializeToString()

    good = record(a=("int64_list", [-7]), b=("float_list", [0.5, 2.0]))
    out = decode([good, record(b=("float_list", [1.0, 1.5]), a=("int64_list", [2**40]))])
    np.testing.assert_array_equal(out["a"], [-7, 2**40])
    np.testing.assert_array_equal(out["b"], [[0.5, 2.0], [1.0, 1.5]])
    with pytest.raises(RecordDecodingError, match="record 1 of the batch has no feature 'b'"):
        decode([good, record(a=("int64_list", [1]))])
    with pytest.raises(RecordDecodingError, match="record 1 of the batch: Example.features length"):
        decode([good, good[:-3]])
    with pytest.raises(RecordDecodingError, match="record 0 of the batch: feature 'a' is not a"):
        decode([record(a=("float_list", [1.0]), b=("float_list", [1.0, 2.0]))])
