"""``lf-jax export --delta``: bring an export of a dynamic table up to a newer checkpoint.

An export of an entity whose rows come from a dynamic table (``export_corpus``; its
manifest records ``dynamic_table`` and the ``checkpoint_step`` it was made from) is
updated with the table's increment since that step (lf_jax.export.delta): the keys
seen since are upserted, the exported names whose key is no longer alive deleted. The
user need not remember the step: the export keeps it. In order:

1. kv/ (when the export has one), in place, batch by batch: upserts put under version
   "<family>-step<step>", gone names deleted (LMDB transactions: a reader, e.g. a
   server holding the store open, sees a row's old or new vector, never a torn one);
2. index/ (when the export has one): loaded, upserted and deleted without a rebuild,
   saved atomically (lf_jax.export.scann_index; ``lf-jax export`` without ``--delta``
   rebuilds and retunes);
3. vectors.npy and ids.npy: the old rows still alive, the upserted ones replaced in
   place or appended (ascending keys), each file written aside then renamed;
4. manifest.json last: the new ``checkpoint_step``, ``count`` and a ``deltas`` list
   ({since_step, step, upserts, deletes} per update).

A delta that fails before step 4 leaves the recorded step as it was, and running it
again applies the whole increment again (puts and deletes are idempotent), so the export
ends as a full export at the new step would (same ids, vectors and KV rows; the index
holds the same vectors, tuned for the old ones). A crash inside step 3/4's renames (two
renames apart) leaves an export that ``load_export`` reports as incomplete: export it
in full again.

Example:
    >>> source = open_source(config, "runs/ranker_dyn")          # latest checkpoint
    >>> update_export(source, "posts", "runs/export/posts")    # tests/export/test_dynamic_export.py
    DeltaUpdate(entity='posts', since_step=3, step=5, upserts=25, deletes=10, count=205)
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from lf_jax.console import get_logger
from lf_jax.export.delta import apply_delta, table_delta
from lf_jax.export.embed_corpus import MANIFEST, ExportError, load_export
from lf_jax.export.index_files import MANIFEST_SHA256, manifest_timestamp, seal_manifest


@dataclasses.dataclass(frozen=True)
class DeltaUpdate:
    """What ``update_export`` changed: ``count`` rows now, ``step`` recorded."""

    entity: str
    since_step: int
    step: int
    upserts: int
    deletes: int
    count: int


def _replace_file(path: Path, write) -> None:
    """Writes ``path`` through ``write(binary file)`` aside, then renames it into place."""
    temp = path.with_name(f".{path.name}.delta")
    with open(temp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def update_export(source, entity: str, output: str | os.PathLike) -> DeltaUpdate:
    """Applies ``entity``'s increment since the export's recorded step to the export at
    ``output`` (see module docstring); ``source``: a CorpusSource restored at the newer
    checkpoint, whose entity is read from a dynamic table."""
    directory = Path(output)
    old_ids, old_vectors, manifest = load_export(directory)
    if manifest.get("entity") != entity or manifest.get("model") != source.family:
        raise ExportError(
            f"--delta: '{directory}' holds an export of {manifest.get('model')} "
            f"{manifest.get('entity')}, not {source.family} {entity}"
        )
    table = source.dynamic_table(entity)
    if table is None or manifest.get("dynamic_table") != table:
        raise ExportError(
            f"--delta: '{directory}' is not an export of dynamic table {table!r} "
            f"(its manifest says {manifest.get('dynamic_table')!r}); export it in full "
            "(without --delta)"
        )
    since, dims = int(manifest["checkpoint_step"]), int(manifest["dims"])
    if int(source.step) < since:
        raise ExportError(
            f"--delta: the checkpoint (step {source.step}) is older than the export at "
            f"'{directory}' (step {since}); pick --step {since} or later"
        )
    store = index = None
    if "kv" in manifest:
        from lf_jax.export.kv_store import KVStore

        store = KVStore(directory / manifest["kv"]["directory"], dims=dims)
    if "index" in manifest:
        from lf_jax.export.scann_index import VectorIndex

        index = VectorIndex.load(directory / manifest["index"]["directory"])
    try:
        exported = set(old_ids.tolist())
        exported |= set(store.ids()) if store is not None else set()
        exported |= set(index.ids.tolist()) if index is not None else set()
        names = source.key_names(entity)
        delta = table_delta(
            source.dynamic, source.table_state(), table, since, exported, names=names
        )
        upsert_names = names(delta.upsert_keys)
        version = f"{source.family}-step{delta.step}"
        apply_delta(delta, upsert_names, store=store, version=version, dims=dims)
        if index is not None:
            apply_delta(delta, upsert_names, index=index, version=version, dims=dims)
            index.save(directory / manifest["index"]["directory"])
    finally:
        if store is not None:
            store.close()
    gone = set(delta.delete_names)
    keep = np.asarray([name not in gone for name in old_ids.tolist()], bool)
    ids = old_ids[keep].tolist()
    vectors = old_vectors[keep]
    position = {name: i for i, name in enumerate(ids)}
    new_rows = delta.upsert_rows[:, :dims]
    fresh = [i for i, name in enumerate(upsert_names) if name not in position]
    known = [i for i, name in enumerate(upsert_names) if name in position]
    if known:
        vectors[[position[upsert_names[i]] for i in known]] = new_rows[known]
    ids += [upsert_names[i] for i in fresh]
    vectors = np.ascontiguousarray(np.concatenate([vectors, new_rows[fresh]]), np.float32)
    id_array = np.asarray(ids, dtype=str)
    try:
        _replace_file(directory / "vectors.npy", lambda f: np.save(f, vectors, allow_pickle=False))
        encoded = np.strings.encode(id_array, "utf-8")
        _replace_file(directory / "ids.npy", lambda f: np.save(f, encoded, allow_pickle=False))
        counts = {
            "since_step": since,
            "step": delta.step,
            "upserts": len(upsert_names),
            "deletes": len(delta.delete_names),
        }
        updated = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
        updated.update(
            checkpoint_step=delta.step,
            checkpoint_dir=str(source.checkpoint_dir),
            count=len(ids),
            updated_at=manifest_timestamp(),
            deltas=[*manifest.get("deltas", []), counts],
        )
        if "kv" in updated:
            updated["kv"] = {**updated["kv"], "version": version}
        text = json.dumps(seal_manifest(updated), indent=2)
        _replace_file(directory / MANIFEST, lambda f: f.write(text.encode()))
    except OSError as error:
        raise ExportError(
            f"--delta: '{directory}' could not be written: {error.strerror or error}; run the "
            "delta again (the export still records step "
            f"{since})"
        ) from None
    get_logger().info(
        "delta export %s: steps %d -> %d, %d upserts, %d deletes, %d rows",
        entity,
        since,
        delta.step,
        len(upsert_names),
        len(delta.delete_names),
        len(ids),
    )
    return DeltaUpdate(
        entity, since, delta.step, len(upsert_names), len(delta.delete_names), len(ids)
    )
