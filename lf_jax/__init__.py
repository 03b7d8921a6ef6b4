"""lf_jax: JAX-first training of large-embedding feed models on a device mesh.

Example:
    >>> import lf_jax
    >>> lf_jax.simulate_cpu_devices(8)      # before any jax computation
    >>> mesh = lf_jax.make_mesh({"data": 2, "model": 4})
"""

from lf_jax.distributed.devices import simulate_cpu_devices
from lf_jax.distributed.mesh import describe_mesh, make_mesh

__version__ = "0.1.0"
__all__ = ["simulate_cpu_devices", "make_mesh", "describe_mesh", "__version__"]
