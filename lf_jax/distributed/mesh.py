"""Named device meshes built from a shape dict such as ``{"data": 2, "model": 4}``.

Example:
    >>> mesh = make_mesh({"data": -1, "model": 2})   # 8 devices -> data=4, model=2
    >>> mesh.shape
    OrderedDict([('data', 4), ('model', 2)])
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lf_jax.errors import UserInputError


class MeshShapeError(UserInputError):
    """A mesh shape that cannot be laid over the available devices."""


def resolve_mesh_shape(shape: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Replaces a single -1 entry so the product equals ``device_count``.

    Raises MeshShapeError naming the axis and value for zero/negative sizes, more than
    one -1, or a product that does not divide ``device_count``.
    """
    if not shape:
        raise MeshShapeError("mesh shape is empty; give at least one axis, e.g. {'data': -1}")
    sizes = dict(shape)
    free = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if (
            not isinstance(size, (int, np.integer))
            or isinstance(size, bool)
            or (size < 1 and size != -1)
        ):
            raise MeshShapeError(
                f"mesh axis '{name}' has size {size!r}; sizes are positive ints or -1"
            )
    if len(free) > 1:
        raise MeshShapeError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise MeshShapeError(
                f"mesh shape {dict(shape)}: fixed axes multiply to {fixed}, which does not "
                f"divide the {device_count} available devices"
            )
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        raise MeshShapeError(
            f"mesh shape {dict(shape)} needs {fixed} devices but {device_count} are available"
        )
    return {name: int(size) for name, size in sizes.items()}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a named Mesh; axis order follows the dict order (outermost first).

    Uses jax.sharding.Mesh (Auto axis types), so shardings propagate the classic way.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def describe_mesh(mesh: Mesh) -> str:
    """One readable line: axes, sizes, device kind and process count."""
    axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    first = mesh.devices.flat[0]
    processes = len({device.process_index for device in mesh.devices.flat})
    return (
        f"mesh({axes}) over {mesh.devices.size} {first.platform} device(s) "
        f"[{first.device_kind}], {processes} process(es)"
    )
