import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lf_jax.distributed.mesh import make_mesh
from lf_jax.testing.compilation import count_compilations


def test_jitted_sharded_step_compiles_once():
    mesh = make_mesh({"data": 8})
    batch = NamedSharding(mesh, P("data"))

    @jax.jit
    def step(w, x):
        return w - 0.1 * jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)

    w = jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P()))
    xs = [jax.device_put(np.full((16, 4), i, np.float32), batch) for i in range(4)]
    with count_compilations() as first:
        w = step(w, xs[0])
    assert first.count >= 1
    with count_compilations() as later:
        for x in xs[1:]:
            w = step(w, x)
    assert later.count == 0


def test_counter_sees_a_shape_change():
    f = jax.jit(lambda x: x * 2)
    small, large = jnp.ones(3), jnp.ones(5)
    f(small)
    with count_compilations() as counter:
        f(large)
    assert counter.count == 1
