"""Input: tfds datasets built from data/<name>/<name>.py and grain pipelines over them.

Importing this package imports neither tensorflow_datasets nor grain; they load on first use.

Example:
    >>> from lf_jax.input import build_dataset, train_iterator
    >>> builder = build_dataset("feed_logs", config="tiny", data_dir="/tmp/tfds")
    >>> batch = next(train_iterator(builder, global_batch_size=256))
"""

from lf_jax.input.datasets import DatasetError, available_datasets, build_dataset, dataset_metadata
from lf_jax.input.feed_pipeline import (
    EvalReader,
    FeedIterator,
    PipelineError,
    collate,
    pad_lists,
    train_iterator,
)
from lf_jax.input.record_decoding import RecordBatchDecoder, RecordDecodingError

__all__ = [
    "DatasetError",
    "available_datasets",
    "build_dataset",
    "dataset_metadata",
    "EvalReader",
    "FeedIterator",
    "PipelineError",
    "RecordBatchDecoder",
    "RecordDecodingError",
    "collate",
    "pad_lists",
    "train_iterator",
]
