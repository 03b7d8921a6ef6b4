"""Embed a corpus (members, posts or items) from a checkpoint and export it for serving.

A model family plugs in through a small ``CorpusSource`` protocol: which entities it
embeds, their string ids and records (``corpus``), and a batch embedder (``embed``) that
runs on the mesh from the restored checkpoint. ``export_corpus`` drives any source: it
embeds the corpus in batches with a progress bar, checks the vectors (width, NaN, unique
ids) and writes, into a temporary directory that then replaces ``output`` in one rename:

  vectors.npy     [N, D] float32 (the first ``dims`` columns when truncated: Matryoshka)
  ids.npy         [N] utf-8 bytes, the original string ids in row order
  manifest.json   model family, entity, checkpoint step and directory, dims, metric,
                  count, seconds, and what else was built (index recall, KV store size)
  index/          optional: a tuned ScaNN VectorIndex of the vectors (lf_jax.export)
  kv/             optional: an int8 LMDB KVStore, version "<family>-step<step>"

A failed export (bad input, crash, full disk) leaves any previous export at ``output``
as it was. Sources: ``feed_ranker`` (rows of the member and post id tables, ids
"m<id>" / "p<id>") and any TrainingTask with ``corpus(side)`` and ``embed(state, side,
records)`` (the encoder families, registered in lf_jax/train/families.py).

Example:
    >>> source = open_source(config, "runs/ranker_tiny")       # latest checkpoint
    >>> result = export_corpus(source, "posts", "runs/export/posts", build_index=True)
    >>> ids, vectors, manifest = load_export("runs/export/posts")   # [N] str, [N, D]
"""

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lf_jax.checks import check_int, first_duplicate
from lf_jax.console import get_logger, progress
from lf_jax.errors import UserInputError
from lf_jax.export.index_files import (
    check_manifest_seal,
    manifest_timestamp,
    replace_directory,
    seal_manifest,
)
from lf_jax.export.index_inputs import METRICS
from lf_jax.workdir import fsync_tree, replaceable_dir, temp_sibling

FORMAT = "lf_jax.EmbeddingExport"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ExportError(UserInputError):
    """Bad export input: checkpoint, corpus, dims, ids or output directory."""


class CorpusSource(Protocol):
    """What export_corpus needs from a model family (see corpus_sources.py)."""

    family: str  # model family, recorded in the manifest
    step: int  # checkpoint step the state was restored from
    checkpoint_dir: str
    metric: str  # default similarity of its vectors (METRICS)

    def entities(self) -> tuple[str, ...]: ...
    def dims(self, entity: str) -> int: ...
    def corpus(self, entity: str) -> tuple[Sequence[str], Any]: ...  # ids [N], records [N, ...]
    def embed(self, entity: str, records) -> np.ndarray: ...  # [b, D] float
    def dynamic_table(self, entity: str) -> str | None: ...  # its dynamic table, if any
    def close(self) -> None: ...  # frees what it holds


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it holds (the manifest as written)."""

    directory: Path
    manifest: dict


# ----------------------------------------------------------------------------- checks
def check_output(output: str | os.PathLike) -> Path:
    """``output`` as an absolute path that an export may (re)place; raised before device work."""
    target = replaceable_dir(output, MANIFEST, ExportError, "output")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{target.name}.probe-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ExportError(
            f"output '{target}' is not writable: cannot write in '{parent}' "
            f"({error.strerror or error})"
        ) from None
    return target


def check_ids_unique(ids: Sequence[str], entity: str) -> np.ndarray:
    """The ids as a '<U' array; an empty corpus or a duplicate id is an error naming it."""
    array = np.asarray(list(ids), dtype=str)
    if array.ndim != 1 or array.size == 0:
        raise ExportError(f"corpus '{entity}' is empty (0 ids); nothing to export")
    duplicate = first_duplicate(array)
    if duplicate is not None:
        key, first, second = duplicate
        raise ExportError(f"corpus '{entity}': duplicate id {key!r} at rows {first} and {second}")
    return array


def _check_dims(dims, width: int) -> int:
    if dims is None:
        return width
    dims = check_int("dims", dims, ExportError)
    if dims > width:
        raise ExportError(f"dims={dims} is more than the model's {width}-dim embeddings")
    return int(dims)


# ----------------------------------------------------------------------------- export
def embed_all(
    source: CorpusSource, entity: str, *, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds every record of ``source.corpus(entity)``: (ids [N] str, vectors [N, D] float32)."""
    if entity not in source.entities():
        raise ExportError(
            f"entity {entity!r} is not one of {source.family}'s {list(source.entities())}"
        )
    check_int("batch_size", batch_size, ExportError)
    raw_ids, records = source.corpus(entity)
    ids = check_ids_unique(raw_ids, entity)
    if len(records) != ids.size:
        raise ExportError(f"corpus '{entity}': {len(records)} records for {ids.size} ids")
    width = source.dims(entity)
    vectors = np.empty((ids.size, width), np.float32)
    with progress(total=ids.size, desc=f"embed {entity}", unit=entity[:-1] or entity) as bar:
        for start in range(0, ids.size, batch_size):
            stop = min(start + batch_size, ids.size)
            out = np.asarray(source.embed(entity, records[start:stop]), np.float32)
            if out.shape != (stop - start, width):
                raise ExportError(
                    f"{source.family}.embed({entity!r}) returned shape {out.shape} "
                    f"for {stop - start} records; expected ({stop - start}, {width})"
                )
            vectors[start:stop] = out
            bar.update(stop - start)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ExportError(
            f"corpus '{entity}': the vector of id {str(ids[row])!r} (row {row}) is not "
            f"finite; {int(bad.sum())} rows are NaN/Inf"
        )
    return ids, vectors


def export_corpus(
    source: CorpusSource,
    entity: str,
    output: str | os.PathLike,
    *,
    batch_size: int = 1024,
    dims: int | None = None,
    metric: str | None = None,
    build_index: bool = False,
    build_kv: bool = False,
    target_recall: float = 0.95,
    index_kwargs: dict | None = None,
) -> ExportResult:
    """Embeds ``entity`` and writes vectors, ids, manifest (+ index/, kv/) to ``output``.

    dims: keep the first ``dims`` columns (Matryoshka). metric: the index metric
    (default the source's). The output is written to a temporary sibling directory and
    swapped in only when complete.
    """
    metric = source.metric if metric is None else metric
    if metric not in METRICS:
        raise ExportError(f"metric must be one of {METRICS}, got {metric!r}")
    if entity not in source.entities():
        raise ExportError(
            f"entity {entity!r} is not one of {source.family}'s {list(source.entities())}"
        )
    dims = _check_dims(dims, source.dims(entity))
    target = check_output(output)
    start = time.perf_counter()
    ids, vectors = embed_all(source, entity, batch_size=batch_size)
    vectors = np.ascontiguousarray(vectors[:, :dims])
    embed_seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": source.family,
        "entity": entity,
        "checkpoint_step": int(source.step),
        "checkpoint_dir": str(source.checkpoint_dir),
        "model_dims": int(source.dims(entity)),
        "dims": int(dims),
        "metric": metric,
        "count": int(ids.size),
        "embed_seconds": round(embed_seconds, 3),
        "created_at": manifest_timestamp(),
        "files": {"vectors": "vectors.npy", "ids": "ids.npy"},
    }
    table = source.dynamic_table(entity)
    if table is not None:  # `lf-jax export --delta` updates it from checkpoint_step on
        manifest["dynamic_table"] = table
    temp = temp_sibling(target)
    try:
        temp.mkdir()
        np.save(temp / "vectors.npy", vectors, allow_pickle=False)
        np.save(temp / "ids.npy", np.strings.encode(ids, "utf-8"), allow_pickle=False)
        if build_index:
            manifest["index"] = _write_index(
                temp / "index", ids, vectors, metric, source, target_recall, index_kwargs or {}
            )
        if build_kv:
            manifest["kv"] = _write_kv(temp / "kv", ids, vectors, source)
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        manifest = seal_manifest(manifest)
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        fsync_tree(temp)
        replace_directory(temp, target)
    except OSError as error:
        raise ExportError(
            f"output '{target}' could not be written: {error.strerror or error}; "
            "any previous export there is unchanged"
        ) from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    get_logger().info(
        "exported %d %s x %d dims (%s, step %d) to %s in %.1f s",
        ids.size,
        entity,
        dims,
        source.family,
        source.step,
        target,
        manifest["seconds"],
    )
    return ExportResult(target, manifest)


def _write_index(directory: Path, ids, vectors, metric, source, target_recall, kwargs) -> dict:
    from lf_jax.export.scann_index import VectorIndex

    kwargs = dict(kwargs)
    num_neighbors = min(kwargs.pop("num_neighbors", 10), ids.size)
    index = VectorIndex.build(
        vectors,
        ids,
        metric=metric,
        target_recall=target_recall,
        num_neighbors=num_neighbors,
        model=source.family,
        checkpoint_step=int(source.step),
        **kwargs,
    )
    index.save(directory)
    recall = index.manifest.get("recall") or {}
    return {
        "directory": "index",
        "mode": index.params.mode,
        "recall": recall.get("recall"),
        "k": recall.get("k"),
        "target_recall": target_recall,
    }


def _write_kv(directory: Path, ids, vectors, source) -> dict:
    from lf_jax.export.kv_store import KVStore
    from lf_jax.export.quantize import quantization_error

    version = f"{source.family}-step{int(source.step)}"
    with KVStore(directory, dims=vectors.shape[1]) as store:
        store.put(list(ids), vectors, version=version)
        stats = store.stats()
    error = quantization_error(vectors)
    return {
        "directory": "kv",
        "version": version,
        "bytes_on_disk": stats.get("bytes_on_disk"),
        "quantization": error,
    }


def load_export(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads an export: (ids [N] str, vectors [N, dims] float32, manifest)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ExportError(f"'{directory}' holds no export ({MANIFEST} is missing)") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"'{directory / MANIFEST}' is not readable JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"'{directory / MANIFEST}' is not a {FORMAT} manifest")
    check_manifest_seal(manifest, directory / MANIFEST, ExportError)
    try:
        vectors = np.load(directory / "vectors.npy", allow_pickle=False)
        ids = np.strings.decode(np.load(directory / "ids.npy", allow_pickle=False), "utf-8")
    except (OSError, ValueError) as error:
        raise ExportError(f"export '{directory}' is incomplete: {error}") from None
    if vectors.shape != (manifest["count"], manifest["dims"]) or ids.shape != (manifest["count"],):
        raise ExportError(
            f"export '{directory}' holds vectors {vectors.shape} and {ids.shape[0]} ids; "
            f"its manifest says {manifest['count']} x {manifest['dims']}"
        )
    return ids, vectors, manifest


# ------------------------------------------------------------------------ sources
def find_checkpoint(workdir: str | os.PathLike, step: int | None) -> tuple[Path, int]:
    """(checkpoint directory, step) in ``workdir/checkpoints``: the latest when ``step`` is
    None. Cheap: call it before building a model, so a missing checkpoint fails fast."""
    from lf_jax.train.checkpoint import Checkpointer

    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise ExportError(
            f"no checkpoint: '{directory}' does not exist (train first, or pass the "
            "training --workdir)"
        )
    checkpointer = Checkpointer(directory)
    try:
        steps = checkpointer.all_steps()
    finally:
        checkpointer.close()
    if not steps:
        raise ExportError(f"no checkpoint in '{directory}' (train first)")
    if step is not None and step not in steps:
        raise ExportError(f"checkpoint step {step} not found in '{directory}' (steps: {steps})")
    return directory, max(steps) if step is None else int(step)


def restore_state(
    template: dict, collection, directory: Path, step: int | None, dynamic=None
) -> tuple[dict, int]:
    """(state, step): the state of ``template``'s structure (and of ``collection``'s tables,
    None for a model without tables) at checkpoint ``step`` of ``directory``, after a shape
    check; ``step=None``: the newest readable step (a damaged newer one is moved aside).
    ``dynamic``: the collection's DynamicTables (hash tables of another device count or
    placement are rehashed)."""
    from lf_jax.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, create=False)
    try:
        state, _, restored = checkpointer.restore_newest(template, collection, step, dynamic)
    finally:
        checkpointer.close()
    return state, restored


def open_source(config, workdir: str | os.PathLike, step: int | None = None) -> CorpusSource:
    """The CorpusSource of ``config.model_family``, restored from ``workdir`` (latest step)."""
    from lf_jax.train.families import family_class

    source_class = family_class(config.get("model_family", ""), "corpus", ExportError)
    return source_class(config, workdir, step)
