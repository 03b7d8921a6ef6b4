"""Model parameters <-> one ``.npz`` file: what ``Ranker`` and ``Encoder`` save and load.

Keys are the parameter paths joined by "/" (``"layers/0/q_kernel"``); loading fills an
nnx.State of the same model, so a saved file of another architecture or size is one error
naming the first key that is missing or has another shape.

Example:
    >>> save_params(directory / "params.npz", params)              # an nnx.State
    >>> params = load_params(directory / "params.npz", fresh_params)
"""

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lf_jax.errors import UserInputError


def flat_params(tree) -> dict[str, Any]:
    """{"a/b/0": leaf} of a nested pure dict (the npz keys of the saved parameters)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in leaves
    }


def save_params(path: Path, params: nnx.State) -> None:
    """Writes every parameter of ``params`` as a host numpy array into ``path``."""
    arrays: dict[str, Any] = {
        k: np.asarray(v) for k, v in flat_params(nnx.to_pure_dict(params)).items()
    }
    np.savez(path, **arrays)


def load_params(path: Path, params: nnx.State) -> nnx.State:
    """``params`` (a freshly built model's state, updated in place and returned) with the
    values saved in ``path``; a missing key or another shape is a UserInputError."""
    if not path.is_file():
        raise UserInputError(f"'{path}' does not exist: the saved model is incomplete")
    pure = nnx.to_pure_dict(params)
    leaves, treedef = jax.tree_util.tree_flatten(pure)
    with np.load(path) as saved:
        values = []
        for key, leaf in zip(flat_params(pure), leaves, strict=True):
            if key not in saved.files:
                raise UserInputError(f"'{path}' holds no parameter {key!r}")
            if saved[key].shape != np.shape(leaf):
                raise UserInputError(
                    f"'{path}': parameter {key!r} has shape {saved[key].shape}, the model "
                    f"built from the manifest expects {np.shape(leaf)}"
                )
            values.append(saved[key])
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, values))
    return params
