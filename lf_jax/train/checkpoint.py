"""Orbax checkpoints that restore onto any mesh and any embedding plan.

A checkpoint holds: dense params and optimizer state (flattened to "a.b.c" keys), every
embedding table and slot in its logical [vocab_size, dim] form (rows sharded over the
devices when they divide), the step, and the data-iterator state as JSON. Saves are
asynchronous; keep-last-n and kill -9 safety come from Orbax (an interrupted save never
becomes the latest step).

Example:
    >>> ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    >>> ckpt.save(step, state, collection, data_state={"train": it.get_state()})
    >>> state, data_state = ckpt.restore(ckpt.latest_step(), template_state, collection)
"""

from collections.abc import Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from lf_jax.console import get_logger
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.errors import UserInputError


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_to_dict(tree) -> dict[str, jax.Array]:
    """{"params.mlp.layers.0.kernel": leaf, ...} for any pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(entry) for entry in path) or "value": leaf for path, leaf in leaves}


def unflatten_like(template, flat: Mapping[str, jax.Array]):
    """Inverse of flatten_to_dict, using ``template``'s structure."""
    keys = list(flatten_to_dict(template))
    missing = [key for key in keys if key not in flat]
    if missing:
        raise UserInputError(
            f"checkpoint lacks {len(missing)} entries, e.g. '{missing[0]}': it was "
            f"written by a different model config"
        )
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(template), [flat[key] for key in keys]
    )


def _abstract(tree, shardings=None):
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """Saves and restores train states (see module docstring)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserInputError(
                f"checkpoint directory '{self.directory}' cannot be created: {error.strerror}"
            ) from None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "embedding", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Mapping,
        collection: EmbeddingCollection | None,
        data_state: Mapping | None = None,
        force: bool = True,
    ) -> bool:
        """Starts an async save of ``state`` at ``step``; returns whether it saves.
        ``collection=None``: a model without tables (no "embedding" item is written)."""
        dense = flatten_to_dict({k: v for k, v in state.items() if k != "embedding"})
        items = {
            "state": ocp.args.StandardSave(dense),
            "data": ocp.args.JsonSave(dict(data_state or {})),
        }
        if collection is not None:
            logical = jax.jit(collection.to_logical, out_shardings=collection.logical_shardings())(
                state["embedding"]
            )
            items["embedding"] = ocp.args.StandardSave(flatten_to_dict(logical))
        saved = self.manager.save(step, force=force, args=ocp.args.Composite(**items))
        if saved:
            get_logger().info("checkpoint step %d -> %s", step, self.directory)
        return saved

    def restore(
        self, step: int, template: Mapping, collection: EmbeddingCollection | None
    ) -> tuple[dict, dict]:
        """Restores ``step`` into ``template``'s structure and shardings (any mesh/plan)."""
        if step not in self.all_steps():
            raise UserInputError(
                f"checkpoint step {step} not found in '{self.directory}' "
                f"(steps: {self.all_steps()})"
            )
        dense_template = {k: v for k, v in template.items() if k != "embedding"}
        if collection is None:  # a model without tables: template["embedding"] is kept as is
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(flatten_to_dict(dense_template))),
                    data=ocp.args.JsonRestore(),
                ),
            )
            state = unflatten_like(dense_template, restored["state"])
            state["embedding"] = template.get("embedding", {})
            return state, dict(restored["data"] or {})
        logical_template = jax.eval_shape(collection.to_logical, template["embedding"])
        logical_abstract = _abstract(logical_template, collection.logical_shardings())
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(flatten_to_dict(dense_template))),
                embedding=ocp.args.StandardRestore(flatten_to_dict(logical_abstract)),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = unflatten_like(dense_template, restored["state"])
        logical = unflatten_like(logical_template, restored["embedding"])
        embedding_shardings = collection.state_shardings()
        state["embedding"] = jax.jit(collection.from_logical, out_shardings=embedding_shardings)(
            logical
        )
        return state, dict(restored["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
