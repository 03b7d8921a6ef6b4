"""Locate, build and describe the shipped tfds datasets (lf_jax/data/<name>/<name>.py).

Builders ship in the ``lf_jax.data`` package, so an installed wheel builds them as a
checkout does; each is imported by its file (see import_by_path). Building is offline:
the generators are synthetic, and the array_record files are what grain reads.

Example:
    >>> builder = build_dataset("feed_logs", config="tiny", data_dir="/tmp/tfds")
    >>> dataset_metadata(builder)["num_members"], len(builder.as_data_source("train"))
    (2000, 36000)
"""

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import lf_jax
from lf_jax.console import get_logger, progress_enabled
from lf_jax.errors import UserInputError
from lf_jax.workdir import reject_remote

DATA_ROOT = Path(lf_jax.__file__).resolve().parent / "data"
DEFAULT_DATA_DIR_ENV = "TFDS_DATA_DIR"


class DatasetError(UserInputError):
    """A dataset name, config, builder file or data_dir that cannot be used."""


def available_datasets() -> list[str]:
    """Names with a builder file lf_jax/data/<name>/<name>.py."""
    if not DATA_ROOT.is_dir():
        return []
    return sorted(p.name for p in DATA_ROOT.iterdir() if (p / f"{p.name}.py").is_file())


def builder_file(name: str) -> Path:
    """The path of the builder file of ``name`` (raises DatasetError when absent)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DatasetError(f"dataset name must be a lower_snake_case string, got {name!r}")
    path = DATA_ROOT / name / f"{name}.py"
    if not path.is_file():
        raise DatasetError(
            f"no builder file for dataset '{name}': expected {path} "
            f"(available: {available_datasets() or 'none'})"
        )
    return path


def import_by_path(module_name: str, path: str | Path):
    """Imports the Python file ``path`` as ``module_name`` once per process.

    Builders are imported under a name without dots (``lf_jax_data_feed_logs``): tfds
    resolves the code path of a builder in a dotted module through importlib_resources,
    which is not a dependency. Their simulators are ordinary modules of lf_jax.data.

    Example:
        >>> module = import_by_path("lf_jax_data_feed_logs", builder_file("feed_logs"))
    """
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return module


def builder_class(name: str):
    """Imports lf_jax/data/<name>/<name>.py by path (once per process, see import_by_path)
    and returns its builder class."""
    import tensorflow_datasets as tfds

    path = builder_file(name)
    module_name = f"lf_jax_data_{name}"
    try:
        module = import_by_path(module_name, path)
    except Exception as error:
        raise DatasetError(
            f"cannot import the builder file {path}: {type(error).__name__}: {error}"
        ) from error
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, tfds.core.DatasetBuilder)
            and value.__module__ == module_name
            and getattr(value, "name", None) == name
        ):
            return value
    raise DatasetError(f"{path} defines no tfds builder class named '{name}'")


def _resolve_data_dir(data_dir) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DEFAULT_DATA_DIR_ENV, "~/tensorflow_datasets")
    if isinstance(data_dir, (str, os.PathLike)):
        reject_remote(data_dir, "data_dir")
    try:
        return Path(os.fspath(data_dir)).expanduser().resolve()
    except TypeError:
        raise DatasetError(f"data_dir must be a path, got {data_dir!r}") from None


def _check_writable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise DatasetError(f"data_dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lf_jax_write_check"):
            pass
    except OSError as error:
        raise DatasetError(
            f"data_dir {path} is not writable ({error.strerror or error}); "
            f"pass data_dir= a writable directory or set "
            f"{DEFAULT_DATA_DIR_ENV}"
        ) from None


class _NeverRaised(Exception):
    pass


# The part of tf.io.gfile that tfds' shuffler uses to spill a split over 1 GB to disk
# (local files only). tfds otherwise builds array_record without TensorFlow, but that
# spill imports it; with this stand-in the large feed_logs config builds without it.
_TF_STAND_IN = SimpleNamespace(
    io=SimpleNamespace(gfile=SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)),
    errors=SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


@contextlib.contextmanager
def _shuffle_without_tensorflow():
    """Lets tfds' shuffler spill to local disk when TensorFlow is not installed."""
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    import resource

    from tensorflow_datasets.core import shuffle

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = shuffle.BUCKETS_NUMBER + 1024  # one open file per bucket
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    previous = shuffle.tf
    shuffle.tf = _TF_STAND_IN
    try:
        yield
    finally:
        shuffle.tf = previous


def build_dataset(
    name: str = "feed_logs", config: str = "tiny", data_dir=None, *, prepare: bool = True
):
    """Returns the tfds builder of ``name``/``config`` in ``data_dir``, prepared offline.

    ``data_dir`` defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets. Preparing is a no-op
    when the dataset is already there (a read-only data_dir is then fine). Files are
    array_record, readable with ``builder.as_data_source(split)`` and grain. Splits over
    1 GB are shuffled through temporary files on local disk, without TensorFlow.

    Raises DatasetError naming the path when the builder file is missing or broken, the
    config is unknown, or data_dir cannot be written.
    """
    import tensorflow_datasets as tfds

    cls = builder_class(name)
    configs = sorted(getattr(cls, "builder_configs", {}) or {})
    if configs and config not in configs:
        raise DatasetError(f"dataset '{name}' has no config {config!r} (configs: {configs})")
    root = _resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data_dir {root} exists and is not a directory")
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns about the folder it is to fill
    try:
        builder = cls(config=config, data_dir=str(root), file_format="array_record")
        if prepare and not builder.is_prepared():
            _check_writable(root)
            if not progress_enabled():
                tfds.disable_progress_bar()
            get_logger().info("building %s/%s into %s", name, config, root)
            with _shuffle_without_tensorflow():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
    finally:
        absl_logging.set_verbosity(verbosity)
    return builder


def open_built_dataset(name: str, config: str, data_dir=None):
    """The tfds builder of an already built ``name``/``config`` in ``data_dir`` (its newest
    version), read from the dataset's own files: no builder code from data/ is imported,
    so export and serving run from the installed package. DatasetError when not built."""
    import tensorflow_datasets as tfds

    directory = _resolve_data_dir(data_dir) / name / config
    versions = sorted(
        (path for path in directory.glob("*") if (path / "dataset_info.json").is_file()),
        key=lambda path: tuple(int(part) for part in path.name.split(".") if part.isdigit()),
    )
    if not versions:
        raise DatasetError(
            f"dataset {name}/{config} is not built in '{directory}' (train first, or pass "
            "the training run's data_dir)"
        )
    return tfds.builder_from_directory(str(versions[-1]))


def dataset_metadata(builder) -> dict:
    """Metadata of a built dataset: vocab sizes, max list lengths, tasks, split sizes.

    For feed_logs: num_members, num_hashtags, num_posts, num_positions, dense_dim,
    dense_features, tasks, max_lengths {post_hashtags, history_actors, history_hashtags},
    random_share, num_examples {split: count}.
    """
    metadata = dict(builder.info.metadata or {})
    metadata["num_examples"] = {
        split: info.num_examples for split, info in builder.info.splits.items()
    }
    metadata["name"], metadata["config"] = builder.name, builder.builder_config.name
    metadata["data_dir"] = str(builder.data_dir)
    return metadata


def read_records(source, indices) -> list:
    """``source.__getitems__(indices)`` for a tfds/array_record data source, where a
    truncated or corrupt shard is one DatasetError naming the shard's file (Riegeli's own
    error names none).

    Example:
        >>> read_records(builder.as_data_source("train").data_source, [0, 1, 2])
    """
    keys = [int(i) for i in indices]
    try:
        return source.__getitems__(keys)
    except UserInputError:
        raise
    except Exception as error:
        raise DatasetError(
            f"dataset file '{_failing_file(source, keys)}' cannot be read "
            f"({type(error).__name__}: {' '.join(str(error).split())[:160]}); it is truncated "
            "or corrupt: rebuild the dataset (delete its directory under data_dir)"
        ) from None


def _failing_file(source, keys: list[int]) -> str:
    """The shard holding the first of ``keys`` that cannot be read, found by reading each
    shard's keys on their own (array_record's ArrayRecordDataSource)."""
    records = getattr(source, "data_source", source)
    try:
        files: dict[int, list[int]] = {}
        for key in keys:
            files.setdefault(records._reader_idx_and_position(key)[0], []).append(key)
        for reader, shard_keys in files.items():
            try:
                records.__getitems__(shard_keys)
            except Exception:
                return str(records._read_instructions[reader].filename)
    except AttributeError:  # another kind of source
        pass
    return f"one of the shards of {getattr(source, 'split', 'the split')}"
