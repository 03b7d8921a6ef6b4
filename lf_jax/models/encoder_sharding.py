"""Places text-encoder parameters (BERT, Llama) on a device mesh by their logical names.

Modes (rule tables in lf_jax/distributed/rules.py, ``encoder_param_rules``):
  "replicated"   a full copy on every device;
  "tensor"       heads, kv heads, MLP units and vocab rows split over mesh axis "model";
  "fsdp"         the embed dim of every weight split over mesh axis "data";
  "fsdp_tensor"  both.
A dim whose size the mesh axis does not divide (e.g. MiniLM's 30522 vocab rows over 4
devices) stays whole on each device; ``strict=True`` raises instead, and every such
dim is logged at INFO level and returned by ``encoder_shardings``.

Example:
    >>> mesh = make_mesh({"data": 4, "model": 2})
    >>> model = shard_encoder(model, mesh, mode="tensor")
    >>> model = init_sharded_encoder(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0)), mesh, "fsdp")
"""

import logging
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lf_jax.distributed.rules import ENCODER_PARAM_MODES, encoder_param_rules, logical_to_mesh_axes
from lf_jax.errors import UserInputError

log = logging.getLogger(__name__)


def check_mode(mode: str) -> str:
    """``mode`` if it names a placement, else UserInputError listing the modes."""
    if mode not in ENCODER_PARAM_MODES:
        raise UserInputError(f"sharding mode={mode!r} is not one of {ENCODER_PARAM_MODES}")
    return mode


def _divisible_spec(spec: PartitionSpec, shape, mesh: Mesh) -> tuple[PartitionSpec, list[int]]:
    """``spec`` with every dim the mesh cannot split evenly set to None; the dims dropped."""
    out, dropped = [], []
    for dim, (size, axes) in enumerate(
        zip(shape, tuple(spec) + (None,) * len(shape), strict=False)
    ):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = 1
        for name in names:
            ways *= mesh.shape[name]
        if names and size % ways:
            dropped.append(dim)
            out.append(None)
        else:
            out.append(axes)
    return PartitionSpec(*out), dropped


def encoder_shardings(
    model: nnx.Module, mesh: Mesh, mode: str = "fsdp", *, strict: bool = False
) -> tuple[nnx.State, list[str]]:
    """(NamedSharding for every parameter, notes on dims left whole) for ``model``.

    ``model`` may be abstract (``nnx.eval_shape``). Parameters without logical names
    are replicated. Raises UserInputError for an unknown mode, and with ``strict`` for
    a dim the mesh cannot split evenly.
    """
    check_mode(mode)
    rules = encoder_param_rules(mode)
    notes: list[str] = []
    placed = []
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        shape = variable.get_value().shape
        names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = logical_to_mesh_axes(names, rules, mesh)
        spec, dropped = _divisible_spec(spec, shape, mesh)
        for dim in dropped:
            axes = tuple(logical_to_mesh_axes(names, rules, mesh))[dim]
            note = (
                f"{'.'.join(map(str, path))}: dim {dim} ({names[dim]}, size {shape[dim]}) "
                f"is not divisible by mesh axes {axes}; kept whole"
            )
            if strict:
                raise UserInputError(f"shard_encoder(mode={mode!r}, strict=True): {note}")
            notes.append(note)
        placed.append((path, variable.replace(value=NamedSharding(mesh, spec))))
    for note in notes:
        log.info("encoder sharding %s: %s", mode, note)
    return nnx.from_flat_state(placed), notes


def shard_encoder(
    model: nnx.Module, mesh: Mesh, mode: str = "fsdp", *, strict: bool = False
) -> nnx.Module:
    """Moves ``model``'s parameters onto ``mesh`` per ``mode``, in place; returns the model.

    Example:
        >>> shard_encoder(model, make_mesh({"data": -1, "model": 2}), mode="fsdp_tensor")
    """
    shardings, _ = encoder_shardings(model, mesh, mode, strict=strict)
    state = nnx.state(model)
    # Values this process holds whole go through host memory: a plain scatter of numpy
    # slices, where device-to-device resharding would compile one program per shape.
    state = jax.tree.map(lambda x: jax.device_get(x) if _fully_addressable(x) else x, state)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def _fully_addressable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def init_sharded_encoder(
    make_model: Callable[[], nnx.Module], mesh: Mesh, mode: str = "fsdp", *, strict: bool = False
) -> nnx.Module:
    """Builds ``make_model()`` with every parameter created directly in its sharding.

    eval_shape -> shardings -> jit(init, out_shardings): no device ever holds a full
    copy of a sharded weight. ``make_model`` must build its own nnx.Rngs.
    """
    abstract = nnx.eval_shape(make_model)
    shardings, _ = encoder_shardings(abstract, mesh, mode, strict=strict)
    state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
    return nnx.merge(nnx.graphdef(abstract), state)
