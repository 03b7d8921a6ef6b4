"""The serving feature store: member and post rows of the feed world in one LMDB KV store.

The export writes every member ("m<id>") and post ("p<id>") row (feed_features.py
layouts, float32, zero padded to one width) into a ``KVStore`` with ``dtype="float32"``,
with ``update`` so that a later export (near-line: new counters, a new post, a new
history) rewrites only the rows that changed and tags them with its version. The layout
sits beside the store in ``layout.json``. The server reads a request's member and all its
candidates in one batched call (one LMDB read transaction); any number of server
processes may read while one writer updates.

Shapes: ``read`` -> member rows [Q, W], post rows [n, W] float32.

Example:
    >>> store = FeatureStore.write(path, world_config, prompts, version="v2", seed=0)
    >>> members_qw, posts_nw = FeatureStore.open(path).read(["m3"], ["p17", "p2"])
"""

import json
import os
from pathlib import Path

import numpy as np

from lf_jax import feed_world
from lf_jax.export.kv_inputs import KVStoreError
from lf_jax.export.kv_store import KVStore, UpdateCounts
from lf_jax.serving.feed_features import FeatureLayout, layout_for, member_rows, post_rows

LAYOUT_FILE = "layout.json"
FORMAT = "lf_jax.FeatureStore"


class FeatureStoreError(KVStoreError):
    """A missing or mismatched feature store, or ids it does not hold."""


class FeatureStore:
    """Read side of the store (see the module docstring); ``write`` creates or updates one."""

    def __init__(self, path: Path, store: KVStore, layout: FeatureLayout, meta: dict):
        self.path, self._store, self.layout, self.meta = path, store, layout, meta

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        """Opens the store at ``path`` read-only."""
        path = Path(path)
        if not (path / LAYOUT_FILE).is_file():
            raise FeatureStoreError(
                f"feature store '{path}' has no {LAYOUT_FILE}: write it with "
                "`lf-jax export --serving`"
            )
        meta = json.loads((path / LAYOUT_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise FeatureStoreError(f"'{path / LAYOUT_FILE}' is not a {FORMAT} layout")
        return cls(
            path,
            KVStore(path / "kv", readonly=True),
            FeatureLayout.from_json(meta["layout"]),
            meta,
        )

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        world_config: feed_world.SimConfig,
        prompts: np.ndarray,
        *,
        version: str,
        seed: int,
        batch_size: int = 4096,
    ) -> UpdateCounts:
        """Writes (first export) or updates (later ones) every member and post row of the
        world; ``prompts`` [num_members, L] are the dual encoder's token ids (-1 past the
        prompt; L = 0 without a dual encoder). Returns what the update did."""
        path = Path(path)
        layout = layout_for(world_config, prompts.shape[1])
        meta = {
            "format": FORMAT,
            "world": world_config.name,
            "num_members": world_config.num_members,
            "num_posts": world_config.num_posts,
            "seed": int(seed),
            "layout": layout.to_json(),
        }
        if (path / LAYOUT_FILE).is_file():
            old = json.loads((path / LAYOUT_FILE).read_text())
            if old.get("layout") != meta["layout"]:
                raise FeatureStoreError(
                    f"feature store '{path}' holds rows of another layout "
                    f"({old.get('layout')}); write to a new directory"
                )
        path.mkdir(parents=True, exist_ok=True)
        world = feed_world.make_world(world_config)
        written = unchanged = new = 0
        with KVStore(path / "kv", dims=layout.width, dtype="float32") as store:
            for kind, count in (("m", world_config.num_members), ("p", world_config.num_posts)):
                for start in range(0, count, batch_size):
                    ids = np.arange(start, min(start + batch_size, count))
                    rows = (
                        member_rows(layout, world, ids, prompts[ids], seed)
                        if kind == "m"
                        else post_rows(layout, world, ids, seed)
                    )
                    padded = np.zeros((len(ids), layout.width), np.float32)
                    padded[:, : rows.shape[1]] = rows
                    counts = store.update(
                        [f"{kind}{i}" for i in ids], padded, version, tolerance=0.0
                    )
                    written += counts.written
                    unchanged += counts.unchanged
                    new += counts.new
        tmp = path / (LAYOUT_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(path / LAYOUT_FILE)
        return UpdateCounts(written=written, unchanged=unchanged, new=new)

    def read(self, member_ids: list[str], post_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``member_ids`` [Q, W] and ``post_ids`` [n, W] in one batched read; an id
        the store does not hold is a FeatureStoreError naming it."""
        try:
            rows = self._store.get(list(member_ids) + list(post_ids))
        except KVStoreError as error:
            raise FeatureStoreError(f"feature store '{self.path}': {error}") from None
        return rows[: len(member_ids)], rows[len(member_ids) :]

    def member_ids(self) -> list[str]:
        """Every member id the store holds ("m<id>", as ``write`` names them)."""
        return [i for i in self._store.ids() if i.startswith("m")]

    def generation(self) -> int:
        """The store's last committed write (``KVStore.generation``): it changes on every
        update, so a server knows when to recompute what it derived from the rows."""
        return self._store.generation()

    def stats(self) -> dict:
        return self._store.stats()

    def close(self) -> None:
        self._store.close()
