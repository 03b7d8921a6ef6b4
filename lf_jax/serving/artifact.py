"""Serving artifacts on disk: one self-contained directory per model, and its loader.

    <model>/manifest.json         format, model, version, jax version, table dtype, tasks,
                                  input and output signatures, buckets, feature layout,
                                  every file's bytes and sha256, total bytes, source
    <model>/weights.npz           the exported functions' weights (params leaves, tables)
    <model>/functions/*.jax       jax.export serializations (StableHLO), one per bucket;
                                  the ranker's posts.jax computes its post cache; the
                                  retrieval functions score every item ([Q, N]: the
                                  caller takes the top K, functions.top_k_rows)
    <model>/ids/<entity>/         string id -> row maps (embedding/ids.py minimal perfect hash)
    <model>/keys/<entity>.npy     row -> string id, where outputs name rows (retrieved items)

``write_artifact`` writes such a directory; ``ServedModel.load`` checks every checksum,
puts the weights on one device, deserializes every bucket's function and compiles it
(``warm_up``), so that no request compiles: a request of Q queries and K candidates runs
the smallest bucket that holds it, padded. Nothing here imports the training code.

Example:
    >>> model = ServedModel.load("runs/demo/serving/versions/v0001/ranker")
    >>> posts_nc = model.post_cache(store_rows_of(model.post_keys()))
    >>> model.warm_up(posts_nc)
    >>> fn, (q, k) = model.bucket(1, 500)          # the (1, 512) function
    >>> probs_qkt = fn(model.weights, posts_nc, member_qw, member_rows_q, post_rows_qk)
"""

import datetime
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from lf_jax.embedding.ids import IdMap
from lf_jax.errors import UserInputError
from lf_jax.export.index_files import file_sha256

FORMAT = "lf_jax.ServingArtifact"
# 2: the ranker computes a post cache (functions/posts.jax), its first input;
# 3: retrieval functions return every item's score [Q, N] (the server takes the top K)
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ROWS_SEEN = 1 << 20  # known ids per entity whose rows ServedModel.rows keeps in a dict


class ArtifactError(UserInputError):
    """A missing, incomplete or corrupt serving artifact, or a request beyond its buckets."""


def _flatten(weights: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in weights.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            out.update({f"{name}/{i:05d}": np.asarray(v) for i, v in enumerate(value)})
        else:
            out[name] = np.asarray(value)
    return out


def _unflatten(flat: dict[str, np.ndarray], lists: tuple[str, ...]) -> dict:
    out: dict = {}
    for name in sorted(flat):
        parts = name.split("/")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = flat[name]
    for key in lists:  # {"00000": a, ...} -> [a, ...]
        out[key] = [out[key][i] for i in sorted(out[key])] if key in out else []
    return out


def write_artifact(
    directory: Path,
    *,
    manifest: dict,
    weights: dict,
    functions: dict[str, bytes],
    id_maps: dict[str, IdMap],
    keys: dict[str, np.ndarray] | None = None,
) -> dict:
    """Writes one model's directory (new or empty); returns the manifest it wrote.

    functions: {bucket name "q<Q>_k<K>": serialized export}; weights: a dict whose
    "params" entry is a list of arrays (flattened with "/" in weights.npz)."""
    directory.mkdir(parents=True, exist_ok=False)
    flat: dict = _flatten(weights)
    np.savez(directory / "weights.npz", **flat)
    (directory / "functions").mkdir()
    for name, blob in functions.items():
        (directory / "functions" / f"{name}.jax").write_bytes(blob)
    for entity, id_map in id_maps.items():
        id_map.save(directory / "ids" / entity)
    if keys:
        (directory / "keys").mkdir()
        for entity, values in keys.items():
            np.save(directory / "keys" / f"{entity}.npy", np.asarray(values, dtype=str))
    files = {
        str(path.relative_to(directory)): {
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "files": files,
        "bytes": sum(f["bytes"] for f in files.values()),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"serving artifact '{directory}' has no {MANIFEST}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"'{path}' has format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"
        )
    return manifest


class ServedModel:
    """One loaded artifact on one device: weights, compiled bucket functions, id maps."""

    def __init__(
        self, directory: Path, manifest: dict, weights, functions, id_maps, keys, device, posts_fn
    ):
        self.directory, self.manifest, self.device = directory, manifest, device
        self.weights, self.functions = weights, functions
        self.id_maps, self.keys = id_maps, keys
        self.buckets = sorted(functions)  # (Q, K)
        self.compiles = 0
        self.posts_fn = posts_fn  # the ranker's post-cache function (None for retrieval)
        self._rows_seen: dict[str, dict[str, int]] = {}  # entity: {known id: row} (rows)

    @classmethod
    def load(cls, directory: str | os.PathLike, device=None, *, verify: bool = True):
        """Loads, checksums and compiles every bucket (see the module docstring)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        for name, entry in manifest["files"].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ArtifactError(
                    f"serving artifact '{directory}': {name} is missing or "
                    f"not {entry['bytes']} bytes"
                )
            if verify and file_sha256(path) != entry["sha256"]:
                raise ArtifactError(
                    f"serving artifact '{directory}': {name} does not match its sha256 in "
                    f"{MANIFEST} (corrupt or changed after export)"
                )
        device = device or jax.local_devices(backend="cpu")[0]
        with np.load(directory / "weights.npz") as npz:
            flat = {name: npz[name] for name in npz.files}
        weights = jax.device_put(_unflatten(flat, ("params",)), device)
        functions = {}
        for entry in manifest["functions"].values():
            blob = (directory / entry["file"]).read_bytes()
            exported = jax.export.deserialize(bytearray(blob))
            functions[(entry["queries"], entry["candidates"])] = jax.jit(exported.call)
        posts_fn = None
        if "post_cache" in manifest:
            blob = (directory / manifest["post_cache"]["file"]).read_bytes()
            posts_fn = jax.jit(jax.export.deserialize(bytearray(blob)).call)
        id_maps = {
            entity: IdMap.load(directory / "ids" / entity) for entity in manifest.get("id_maps", [])
        }
        keys = {
            entity: np.load(directory / "keys" / f"{entity}.npy")
            for entity in manifest.get("keys", [])
        }
        return cls(directory, manifest, weights, functions, id_maps, keys, device, posts_fn)

    def bucket(self, queries: int, candidates: int):
        """(function, (Q, K)) of the smallest bucket holding ``queries`` x ``candidates``."""
        fits = [b for b in self.buckets if b[0] >= queries and b[1] >= candidates]
        if not fits:
            largest = max(self.buckets)
            raise ArtifactError(
                f"{queries} queries x {candidates} candidates exceed the largest bucket of "
                f"{self.manifest['model']} ({largest[0]} x {largest[1]})"
            )
        shape = min(fits, key=lambda b: (b[0] * b[1], b))
        return self.functions[shape], shape

    def zeros(self, queries: int, candidates: int) -> list[np.ndarray]:
        """Zero inputs of the manifest's input signature for a Q x K bucket."""
        sizes = {"Q": queries, "K": candidates}
        return [
            np.zeros([sizes.get(d, d) for d in entry["shape"]], entry["dtype"])
            for entry in self.manifest["inputs"]
        ]

    def post_keys(self) -> list[str]:
        """The ranker's posts in post table order (row i is "p<i>", as the export maps ids)."""
        return [f"p{i}" for i in range(self.manifest["post_cache"]["num_posts"])]

    def post_cache(self, post_rows_nw: np.ndarray) -> jax.Array:
        """The ranker's post cache [N, C] on the device (every post-only part of the ranker)
        from the feature-store rows [N, W] of ``post_keys()``, ``rows_per_call`` per call."""
        spec = self.manifest["post_cache"]
        chunk, n = spec["rows_per_call"], spec["num_posts"]
        if self.posts_fn is None or post_rows_nw.shape[0] != n:
            raise ArtifactError(
                f"{self.manifest['model']}: post_cache needs the rows of its {n} posts, "
                f"got {post_rows_nw.shape[0]}"
            )
        parts = []
        for start in range(0, n, chunk):
            rows = np.zeros((chunk, post_rows_nw.shape[1]), np.float32)
            rows[: min(chunk, n - start)] = post_rows_nw[start : start + chunk]
            table_rows = np.arange(start, start + chunk, dtype=np.int32) % n
            parts.append(self.posts_fn(self.weights, rows, table_rows))
        return jax.device_put(np.concatenate(jax.device_get(parts))[:n], self.device)

    def warm_up(self, *leading) -> float:
        """Compiles every bucket (one call on zeros; ``leading``: the first inputs as
        requests will pass them, e.g. the ranker's device-resident post cache); returns
        the seconds it took."""
        start = time.perf_counter()
        for shape, fn in self.functions.items():
            # numpy inputs, as requests pass them (a committed array is another cache key)
            inputs = [*leading, *self.zeros(*shape)[len(leading) :]]
            jax.block_until_ready(fn(self.weights, *inputs))
        self.compiles = self.cache_size()
        return time.perf_counter() - start

    def cache_size(self) -> int:
        """Compiled executables across the buckets and the post-cache function (stays
        constant once warm)."""
        posts = self.posts_fn._cache_size() if self.posts_fn is not None else 0
        return posts + sum(fn._cache_size() for fn in self.functions.values())

    def remember_rows(self, entity: str, ids: list[str]) -> int:
        """Looks up ``ids`` in the ``entity`` id map in one vectorized call and keeps the
        known ones' rows in the dict ``rows`` answers from (up to ROWS_SEEN), so that a
        request's first sight of an id costs a dict lookup instead of the map's hash
        (~0.5 ms for one id); returns how many it kept."""
        seen = self._rows_seen.setdefault(entity, {})
        ids = list(ids)[: max(ROWS_SEEN - len(seen), 0)]
        if not ids:
            return 0
        id_map = self.id_maps[entity]
        found = id_map.lookup(np.asarray(ids, dtype=str))
        known = np.flatnonzero(found < id_map.num_keys)
        seen.update(zip([ids[j] for j in known], found[known].tolist(), strict=True))
        return len(known)

    def rows(self, entity: str, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n] int32, known [n] bool) of string ids in the ``entity`` id map.

        Known ids seen before are answered from a dict (up to ROWS_SEEN per entity: the
        id map's vectorized hash costs ~0.2 ms even for one id); the others from the map,
        all in one call."""
        id_map = self.id_maps[entity]
        seen = self._rows_seen.setdefault(entity, {})
        rows = np.fromiter((seen.get(i, -1) for i in ids), np.int32, len(ids))
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            keys = [ids[j] for j in missing]
            found = id_map.lookup(np.asarray(keys, dtype=str))
            rows[missing] = found
            if len(seen) < ROWS_SEEN:
                new = np.flatnonzero(found < id_map.num_keys)
                seen.update(zip([keys[j] for j in new], found[new].tolist(), strict=True))
        return rows, rows < id_map.num_keys
