"""Grain input pipelines over a built feed_logs dataset: training batches and eval passes.

Training (``train_iterator``): every process walks the same global order of a split
(all N records shuffled with ``seed``, a new permutation each epoch, repeated:
``num_epochs=None`` is forever) in global batches of ``global_batch_size`` (the last short
one dropped), and reads only its own rows of each global batch: rows
``shard_index::shard_count``, ``global_batch_size // shard_count`` examples. So the
examples of a step do not depend on the process count: 2 processes together read exactly
the batches 1 process reads, each example once per epoch over all processes. List fields
are padded to a fixed length with -1 (``max_lengths``, default the dataset's; longer lists
keep their first ids). The iterator's ``get_state()`` (the global batch position, the same
on every process) is a JSON-serialisable dict and ``set_state()`` resumes exactly, also in
a fresh process and with another process count.

Evaluation (``EvalReader``): every example of a split exactly once over all processes,
in order, the last batch padded and masked by a boolean ``valid`` field; every process
yields the same number of batches (some all-invalid), so sharded eval steps line up.

Batch fields (B = per-process batch size, int fields cast to ``int_dtype``, int32 default):
  member_id, actor_id, root_actor_id, post_id, session_id, position   [B]
  random_session                                                       [B] bool
  post_hashtags [B, 5], history_actors [B, 50], history_hashtags [B, 50]  (-1 padded)
  dense [B, 8] float32, labels [B, 4], true_probs / relevance_probs [B, 4] float32
  valid [B] bool (EvalReader only)

Example:
    >>> builder = build_dataset("feed_logs", "tiny", data_dir="/tmp/tfds")
    >>> it = train_iterator(builder, global_batch_size=256, seed=0)
    >>> batch = next(it); batch["history_actors"].shape        # (256 // processes, 50)
    >>> state = it.get_state()        # json.dumps-able; later: it.set_state(state)
    >>> for batch in EvalReader(builder, "holdout_random", global_batch_size=512): ...
"""

import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lf_jax.checks import check_int
from lf_jax.errors import UserInputError
from lf_jax.input.datasets import read_records
from lf_jax.input.record_decoding import PAD_ID, RecordBatchDecoder


class PipelineError(UserInputError):
    """Bad pipeline arguments or an iterator state that does not fit the pipeline."""


def pad_lists(example: Mapping, max_lengths: Mapping[str, int], int_dtype=np.int32) -> dict:
    """One example -> numpy arrays, each list field padded with -1 / cut to its max length.

    Example:
        >>> pad_lists({"post_hashtags": [4, 9]}, {"post_hashtags": 3})["post_hashtags"]
        array([ 4,  9, -1], dtype=int32)
    """
    return {name: value[0] for name, value in collate([example], max_lengths, int_dtype).items()}


def collate(
    examples: Sequence[Mapping], max_lengths: Mapping[str, int], int_dtype=np.int32
) -> dict[str, np.ndarray]:
    """Examples -> one batch: fixed fields stacked, list fields [B, max_len] padded with -1.

    Integer fields become ``int_dtype``, floats float32; lists keep their first max_len ids.
    """
    out = {}
    for name in examples[0]:
        if name in max_lengths:
            length = max_lengths[name]
            padded = np.full((len(examples), length), PAD_ID, dtype=int_dtype)
            for row, example in enumerate(examples):
                kept = np.asarray(example[name])[:length]
                padded[row, : kept.size] = kept
            out[name] = padded
            continue
        array = np.asarray([example[name] for example in examples])
        if array.dtype.kind in "iu":
            array = array.astype(int_dtype)
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        out[name] = array
    return out


class _ProcessRows:
    """Global batch of record indices -> this process's rows (``index::count``); picklable."""

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return indices[self.index :: self.count]


class _ReadBatch:
    """Record indices -> a padded batch: the raw records read with one ``__getitems__`` call,
    decoded together by ``RecordBatchDecoder`` (equal to ``collate`` of tfds-decoded examples).

    Pickles as (prepared dataset directory, split): a grain worker process reopens the
    source with tfds.builder_from_directory, without importing the builder's code. The source
    and decoder are opened when the object is made or unpickled (in the worker's main thread),
    never lazily in grain's read threads: concurrent first imports of tensorflow_datasets in
    several threads can deadlock on Python's import locks.
    """

    def __init__(self, builder_dir: str, split: str, max_lengths, int_dtype, source=None):
        self.builder_dir, self.split = builder_dir, split
        self.max_lengths, self.int_dtype = dict(max_lengths), int_dtype
        self._open(source)

    def _open(self, source=None) -> None:
        if source is None:
            import tensorflow_datasets as tfds

            source = tfds.builder_from_directory(self.builder_dir).as_data_source(self.split)
        self.source = source
        self.decoder = RecordBatchDecoder(
            source.dataset_info.features, self.max_lengths, self.int_dtype
        )

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k not in ("source", "decoder")}

    def __setstate__(self, state):
        vars(self).update(state)
        self._open()

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.decoder(read_records(self.source.data_source, indices))


def _max_lengths(builder, max_lengths: Mapping[str, int] | None) -> dict[str, int]:
    known = dict((builder.info.metadata or {}).get("max_lengths", {}))
    if max_lengths is not None:
        unknown = sorted(set(max_lengths) - set(known))
        if unknown:
            raise PipelineError(
                f"max_lengths names unknown list field(s) {unknown} (list fields: {sorted(known)})"
            )
        for name, length in max_lengths.items():
            check_int(f"max_lengths['{name}']", length, PipelineError)
        known.update(max_lengths)
    return known


def _shard_args(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    check_int("shard_count", shard_count, PipelineError)
    if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
        raise PipelineError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
    return shard_index, shard_count


def _per_process_batch(global_batch_size, shard_count) -> int:
    check_int("global_batch_size", global_batch_size, PipelineError)
    if global_batch_size % shard_count:
        raise PipelineError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"shard_count={shard_count} (one shard per process)"
        )
    return global_batch_size // shard_count


def _source(builder, split: str):
    splits = sorted(builder.info.splits)
    if split not in splits:
        raise PipelineError(
            f"split {split!r} is not in {builder.name}/{builder.builder_config.name} "
            f"(splits: {splits})"
        )
    return builder.as_data_source(split=split)


def _ensure_absl_flags() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1], known_only=True)


class FeedIterator(Iterator):
    """Training batches (dict of numpy arrays) with a checkpointable position.

    ``get_state()`` returns {"pipeline": <the arguments that fix the order>, "grain": ...};
    ``set_state()`` accepts that dict (or its JSON string) and raises PipelineError when it
    was saved by a pipeline with another split, seed, global batch size or worker count (grain
    keeps the position of worker processes in another form); the shard (process index and
    count) may differ, as the position is global. With Orbax, save it as
    ``ocp.args.JsonSave(it.get_state())`` next to the model (one copy, from process 0).
    """

    # Fields that only say which rows of a global batch this process reads.
    PER_PROCESS = ("shard_index", "shard_count", "batch_size")

    def __init__(self, iterator, signature: dict):
        self._iterator = iterator
        self.signature = signature

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def close(self) -> None:
        """Stops grain's prefetch threads / worker processes (also on ``with ... as it``)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "FeedIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def grain_iterator(self):
        """The underlying grain DatasetIterator (e.g. for grain's Orbax checkpoint handler)."""
        return self._iterator

    def get_state(self) -> dict:
        state = self._iterator.get_state()
        if isinstance(state, bytes):
            state = state.decode()
        return {"pipeline": dict(self.signature), "grain": state}

    def set_state(self, state: dict | str) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if not isinstance(state, Mapping) or set(state) != {"pipeline", "grain"}:
            raise PipelineError(
                "iterator state must be a dict with keys 'pipeline' and 'grain' "
                "as returned by get_state()"
            )
        saved = state["pipeline"]
        for key, value in self.signature.items():
            if key not in self.PER_PROCESS and saved.get(key) != value:
                raise PipelineError(
                    f"iterator state was saved with {key}={saved.get(key)!r} but this "
                    f"pipeline has {key}={value!r}; resume with the same settings"
                )
        self._iterator.set_state(state["grain"])


def train_iterator(
    builder,
    split: str = "train",
    *,
    global_batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    max_lengths: Mapping[str, int] | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    int_dtype=np.int32,
) -> FeedIterator:
    """Shuffled, repeated, sharded, padded batches of ``split`` (see the module docstring).

    Args:
      builder: a built tfds builder (lf_jax.input.datasets.build_dataset).
      global_batch_size: examples per step over all processes; each process yields
        ``global_batch_size // shard_count``.
      seed: shuffle seed (the same on every process; shards are disjoint rows of each
        global batch).
      num_epochs: passes over the split; None repeats forever, 1 is a single pass.
      max_lengths: per list field, e.g. {"history_actors": 20}; defaults to the dataset's
        max lengths (metadata["max_lengths"]); longer lists keep their first entries.
      shard_index, shard_count: default jax.process_index() / jax.process_count().
      worker_count: grain worker processes for decoding (0: threads in this process).
    Returns:
      a FeedIterator yielding {field: [B, ...] numpy array}.
    """
    import grain

    shard_index, shard_count = _shard_args(shard_index, shard_count)
    batch_size = _per_process_batch(global_batch_size, shard_count)
    if num_epochs is not None:
        check_int("num_epochs", num_epochs, PipelineError, hint=" (None: forever)")
    check_int(
        "worker_count", worker_count, PipelineError, minimum=0, hint=" (0: threads of this process)"
    )
    lengths = _max_lengths(builder, max_lengths)
    source = _source(builder, split)
    if len(source) < global_batch_size:
        raise PipelineError(
            f"split {split!r} has {len(source)} examples, fewer than one batch of "
            f"{global_batch_size}"
        )
    # Shuffle, repeat and batch record indices globally, keep this process's rows, read
    # them with one __getitems__ call (about 2x faster than per-record reads). grain's
    # state is the next global batch index.
    indices = grain.MapDataset.range(len(source))
    if shuffle:
        indices = indices.shuffle(seed=seed)
    batches = indices.repeat(num_epochs).batch(global_batch_size, drop_remainder=True)
    batches = batches.map(_ProcessRows(shard_index, shard_count))
    read = _ReadBatch(str(builder.data_dir), split, lengths, int_dtype, source)
    iter_dataset = batches.map(read).to_iter_dataset()
    if worker_count:
        _ensure_absl_flags()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count)
        )
    signature = {
        "dataset": f"{builder.name}/{builder.builder_config.name}",
        "split": split,
        "num_examples": len(source),
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "global_batch_size": global_batch_size,
        "batch_size": batch_size,
        "shard_index": shard_index,
        "shard_count": shard_count,
        "max_lengths": lengths,
        "worker_count": worker_count,
    }
    return FeedIterator(iter(iter_dataset), signature)


class EvalReader:
    """Every example of ``split`` exactly once (over all shards), padded batches with ``valid``.

    Shard ``i`` reads records i, i + shard_count, ...; each shard yields
    ``len(reader)`` = ceil(ceil(N / shard_count) / B) batches of B = global_batch_size //
    shard_count rows, so processes step together. Padding rows have valid=False, ids 0,
    lists -1, floats and labels 0. ``max_examples``: N is at most that many (the split's
    first records), for quick evaluations during training.

    Example:
        >>> reader = EvalReader(builder, "holdout_ranked", global_batch_size=512)
        >>> valid = sum(int(b["valid"].sum()) for b in reader)
        >>> valid == len(builder.as_data_source("holdout_ranked"))
        True
    """

    def __init__(
        self,
        builder,
        split: str = "holdout_ranked",
        *,
        global_batch_size: int,
        max_lengths: Mapping[str, int] | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        int_dtype=np.int32,
        max_examples: int | None = None,
    ):
        if max_examples is not None:
            check_int("max_examples", max_examples, PipelineError, minimum=1)
        self.shard_index, self.shard_count = _shard_args(shard_index, shard_count)
        self.batch_size = _per_process_batch(global_batch_size, self.shard_count)
        self.max_lengths = _max_lengths(builder, max_lengths)
        self.int_dtype = int_dtype
        self.split = split
        self._source = _source(builder, split)
        self._read = _ReadBatch(
            str(builder.data_dir), split, self.max_lengths, int_dtype, self._source
        )
        self.num_examples = min(len(self._source), max_examples or len(self._source))
        if self.num_examples == 0:
            raise PipelineError(f"split {split!r} is empty")
        self.num_batches = math.ceil(
            math.ceil(self.num_examples / self.shard_count) / self.batch_size
        )

    def __len__(self) -> int:
        return self.num_batches

    def batch_indices(self, index: int) -> np.ndarray:
        """Record indices of this shard's batch ``index`` (may be short or empty at the end)."""
        start = self.shard_index + index * self.batch_size * self.shard_count
        stop = min(self.num_examples, start + self.batch_size * self.shard_count)
        return np.arange(start, max(start, stop), self.shard_count)

    def _batch(self, index: int) -> dict[str, np.ndarray]:
        indices = self.batch_indices(index)
        rows = len(indices)
        batch = self._read(indices if rows else np.zeros(1, np.int64))  # template from record 0
        batch["valid"] = np.full(len(batch["member_id"]), rows > 0)
        if rows == self.batch_size:
            return batch
        out = {}
        for name, value in batch.items():
            fill = PAD_ID if name in self.max_lengths else 0
            pad = np.full((self.batch_size - rows, *value.shape[1:]), fill, dtype=value.dtype)
            out[name] = np.concatenate([value[:rows], pad])
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import grain

        return iter(grain.MapDataset.range(self.num_batches).map(self._batch).to_iter_dataset())
