"""Abstract (ShapeDtypeStruct) embedding state: compile a step without materialising it.

Example:
    >>> state = abstract_state(collection)
    >>> jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
"""

import jax
import numpy as np


def abstract_state(collection) -> dict:
    """ShapeDtypeStructs, with shardings, of ``collection``'s state pytree."""
    shardings = collection.state_shardings()
    state = {
        "tables": {},
        "slots": {},
        "step": jax.ShapeDtypeStruct((), np.int32, sharding=shardings["step"]),
    }
    for group in collection.groups:
        state["tables"][group.name] = jax.ShapeDtypeStruct(
            group.shape, np.dtype(group.dtype), sharding=shardings["tables"][group.name]
        )
        state["slots"][group.name] = {
            name: jax.ShapeDtypeStruct(
                (group.num_slots, group.rows, *shape),
                np.float32,
                sharding=shardings["slots"][group.name][name],
            )
            for name, shape in group.optimizer.slot_shapes(group.dim).items()
        }
    return state
