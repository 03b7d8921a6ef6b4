"""Orbax checkpoints that restore onto any mesh and any embedding plan.

A checkpoint holds: dense params and optimizer state (flattened to "a.b.c" keys), every
embedding table and slot in its logical [vocab_size, dim] form (rows sharded over the
devices when they divide), the step, and the data-iterator state as JSON. Saves are
asynchronous; keep-last-n and kill -9 safety come from Orbax (an interrupted save never
becomes the latest step). A save that fails in the background (a full disk) is raised as
one CheckpointError by the next ``raise_save_error`` call (the loop calls it every step).

Dynamic tables' hash tables are saved per shard in the "state" item ([S, ...]); a run on
another device count restores them with ``dynamic=`` (keys rehashed to their new owners).

``restore_newest`` checks the checkpoint's shapes against the config first
(CheckpointMismatchError naming the first entry that differs), then restores; a step that
cannot be read is moved aside to ``<checkpoints>.damaged/<step>`` (never deleted), one
warning names the step and the file, and the next older step is tried. With an explicit
``step`` it stops with one CheckpointError instead.

Example:
    >>> ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    >>> ckpt.save(step, state, collection, data_state={"train": it.get_state()})
    >>> state, data_state, step = ckpt.restore_newest(template_state, collection)
"""

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.console import get_logger
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.checkpoint import rehash_logical
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.huge_pages import back_with_huge_pages
from lf_jax.errors import LfJaxError, UserInputError
from lf_jax.train.checkpoint_errors import (
    CheckpointError,
    CheckpointMismatchError,
    SaveErrors,
    damaged_file,
    one_line,
)


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
    """Saves and restores train states (see module docstring). ``create=False``: a
    missing directory is a UserInputError (eval and export never create one)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        create: bool = True,
    ):
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise UserInputError(f"no checkpoint: '{self.directory}' does not exist (train first)")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserInputError(
                f"checkpoint directory '{self.directory}' cannot be created: {error.strerror}"
            ) from None
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("state", "embedding"):
            registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
            registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
        registry.add("data", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add("data", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
            handler_registry=registry,
        )
        self._save_errors = SaveErrors()
        logging.getLogger("absl").addFilter(self._save_errors)
        self._pending_step: int | None = None
        self._reported = False  # a failed save was raised: close() does not raise it again

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
        self.raise_save_error()
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
        try:
            saved = self.manager.save(step, force=force, args=ocp.args.Composite(**items))
        except OSError as error:
            raise CheckpointError(
                f"checkpoint step {step} could not be written to '{self.directory}': "
                f"{error.strerror or error}; the last complete checkpoint is step "
                f"{self.latest_step()}"
            ) from None
        if saved:
            self._pending_step = step
            get_logger().info("checkpoint step %d -> %s", step, self.directory)
        return saved

    def raise_save_error(self) -> None:
        """Raises CheckpointError if a background save failed since the last call."""
        if not self._save_errors.errors:
            return
        error = self._save_errors.errors[0]
        self._save_errors.errors.clear()
        self._reported = True
        self.manager.reload()
        raise CheckpointError(
            f"checkpoint step {self._pending_step} could not be written to "
            f"'{self.directory}': {one_line(error)}; the last complete checkpoint is step "
            f"{self.latest_step()}"
        )

    def check_matches(self, step: int, template: Mapping, collection, dynamic=None) -> None:
        """Compares the array shapes stored at ``step`` with ``template`` (and ``collection``'s
        logical tables) before anything is restored; CheckpointMismatchError names the first
        entry that differs (the config describes another model than the checkpoint). With
        ``dynamic`` (the DynamicTables of ``collection``), hash tables written on another
        device count match: ``restore`` rehashes their keys."""
        saved = self.manager.item_metadata(step)
        expected = {}  # tables, then params, then slots and optimizer state: clearest first
        if collection is not None:
            expected["embedding"] = flatten_to_dict(
                jax.eval_shape(collection.to_logical, template["embedding"])
            )
        expected["state"] = flatten_to_dict({k: v for k, v in template.items() if k != "embedding"})
        for item, arrays in expected.items():
            expected[item] = dict(
                sorted(arrays.items(), key=lambda kv: not kv[0].startswith(("tables.", "params.")))
            )
        where = f"checkpoint step {step} in '{self.directory}'"
        for item, arrays in expected.items():
            stored = saved[item] if item in saved else None
            if stored is None:
                raise CheckpointMismatchError(
                    f"{where} has no '{item}' item: it was written by another model family"
                )
            stored = dict(getattr(stored, "tree", stored))
            for key, value in arrays.items():
                if key not in stored:
                    raise CheckpointMismatchError(
                        f"{where} lacks '{key}': the config describes a different model"
                    )
                if tuple(stored[key].shape) != tuple(value.shape) and key.startswith("dynamic."):
                    per_shard = key.endswith((".sketch", ".counters"))  # [S, ...]: policy sizes
                    if dynamic is not None and (
                        not per_shard or tuple(stored[key].shape[1:]) == tuple(value.shape[1:])
                    ):
                        continue  # keys rehashed onto this device count by restore
                    if dynamic is None:
                        raise CheckpointMismatchError(  # per-shard hash tables: [devices, ...]
                            f"{where} holds the dynamic tables' hash tables of "
                            f"{stored[key].shape[0]} devices ('{key}'), this run has "
                            f"{value.shape[0]}: restore with dynamic=<the DynamicTables> to "
                            "rehash the keys onto this device count"
                        )
                if tuple(stored[key].shape) != tuple(value.shape):
                    raise CheckpointMismatchError(
                        f"{where} does not match the config: '{key}' has shape "
                        f"{tuple(stored[key].shape)} in the checkpoint but {tuple(value.shape)} "
                        "in the config"
                    )
            extra = sorted(set(stored) - set(arrays))
            if extra:
                raise CheckpointMismatchError(
                    f"{where} holds '{extra[0]}', which the config's model lacks: the config "
                    "describes a different model"
                )
        has_tables = "embedding" in saved and saved["embedding"] is not None
        if collection is None and has_tables:
            raise CheckpointMismatchError(
                f"{where} holds embedding tables but the config's model has none"
            )

    def restore_newest(
        self, template: Mapping, collection, step: int | None = None, dynamic=None
    ) -> tuple[dict, dict, int]:
        """(state, data_state, step) of the newest readable step (or of ``step``).

        Each candidate is shape-checked (check_matches) then restored. A newest step that
        cannot be read is moved to ``<checkpoints>.damaged/<step>`` with one warning naming
        the step and the file, and the next older one is tried; an explicit ``step`` that
        cannot be read raises CheckpointError naming the file. ``dynamic``: see ``restore``.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if step is not None and step not in steps:
            raise UserInputError(
                f"checkpoint step {step} not found in '{self.directory}' (steps: {sorted(steps)})"
            )
        damaged: list[str] = []
        for candidate in [step] if step is not None else steps:
            try:
                self.check_matches(candidate, template, collection, dynamic)
                state, data_state = self.restore(candidate, template, collection, dynamic)
            except LfJaxError:
                raise
            except Exception as error:  # any read failure: the step is damaged
                file, why = damaged_file(error, self.directory / str(candidate))
                if step is not None:
                    raise CheckpointError(
                        f"checkpoint step {candidate} cannot be read: {file} is damaged "
                        f"({why}); steps: {sorted(steps)}"
                    ) from None
                moved = self._move_aside(candidate)
                damaged.append(f"{candidate} ({file})")
                get_logger().warning(
                    "checkpoint step %d cannot be read: %s is damaged (%s); the step is moved "
                    "to %s and the next older step is restored",
                    candidate,
                    file,
                    why,
                    moved,
                )
                continue
            return state, data_state, candidate
        raise CheckpointError(
            f"no readable checkpoint in '{self.directory}': damaged step(s) "
            f"{', '.join(damaged)} were moved to '{self._damaged_dir()}'"
        )

    def _damaged_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + ".damaged")

    def _move_aside(self, step: int) -> Path:
        """Moves step directory ``step`` out of Orbax's sight (process 0; kept, not deleted)."""
        target = self._damaged_dir() / str(step)
        suffix = 1
        while target.exists():
            target, suffix = self._damaged_dir() / f"{step}.{suffix}", suffix + 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), target)
        self.manager.reload()
        return target

    def restore(
        self,
        step: int,
        template: Mapping,
        collection: EmbeddingCollection | None,
        dynamic: DynamicTables | None = None,
    ) -> tuple[dict, dict]:
        """Restores ``step`` into ``template``'s structure and shardings (any mesh/plan).

        ``dynamic``, the DynamicTables of ``collection``: hash tables written on another
        device count (``state["dynamic"]``, [S_old, ...]) are read to the host with the
        logical tables, and every key moves with its rows and slots to its owner on this
        mesh (lf_jax.embedding.dynamic.checkpoint.rehash_logical; one process only)."""
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
        dense_abstract = _abstract(flatten_to_dict(dense_template))
        rehashed = []  # hash tables of another device count: read whole, replicated
        saved = self.manager.item_metadata(step)["state"] if dynamic is not None else {}
        for key, meta in dict(getattr(saved, "tree", saved)).items():
            if key.startswith("dynamic.") and tuple(meta.shape) != dense_abstract[key].shape:
                replicated = NamedSharding(collection.mesh, PartitionSpec())
                dense_abstract[key] = jax.ShapeDtypeStruct(
                    tuple(meta.shape), dense_abstract[key].dtype, sharding=replicated
                )
                rehashed.append(int(meta.shape[0]))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(dense_abstract),
                embedding=ocp.args.StandardRestore(flatten_to_dict(logical_abstract)),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = unflatten_like(dense_template, restored["state"])
        logical = unflatten_like(logical_template, restored["embedding"])
        if rehashed and dynamic is not None:
            if jax.process_count() > 1:  # the tables are read whole onto one host
                raise UserInputError(
                    f"checkpoint step {step} holds dynamic tables of {rehashed[0]} devices; "
                    f"resuming on {dynamic.num_devices} rehashes them in one process, this run "
                    f"has {jax.process_count()}: resume on {rehashed[0]} devices"
                )
            logical, state["dynamic"] = rehash_logical(
                dynamic, jax.device_get(logical), jax.device_get(state["dynamic"])
            )
            get_logger().info(
                "checkpoint step %d: dynamic tables' keys of %d devices rehashed onto %d",
                step,
                rehashed[0],
                dynamic.num_devices,
            )
        embedding_shardings = collection.state_shardings()
        state["embedding"] = jax.jit(collection.from_logical, out_shardings=embedding_shardings)(
            logical
        )
        # like EmbeddingCollection.init: a resumed CPU run's tables on 2 MiB pages too
        back_with_huge_pages((state["embedding"]["tables"], state["embedding"]["slots"]))
        return state, dict(restored["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save; a failure not raised yet is raised as CheckpointError."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as error:
            if not self._reported and not self._save_errors.errors:
                self._save_errors.errors.append(error)
        finally:
            logging.getLogger("absl").removeFilter(self._save_errors)
        if self._reported:
            self._save_errors.errors.clear()
        self.raise_save_error()
