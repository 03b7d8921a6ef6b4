"""``lf-jax demo``: the end-to-end tour on simulated CPU devices.

Each stage prints what it did; the tour grows as the framework does.

Example:
    >>> from lf_jax.configuration import load_config
    >>> run_demo(load_config("configs/demo.py"), "runs/demo")
"""

from pathlib import Path
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from lf_jax.console import get_logger, progress
from lf_jax.distributed.mesh import describe_mesh, make_mesh
from lf_jax.distributed.rules import logical_to_mesh_axes


def _data_parallel_regression(mesh, config) -> list[float]:
    """Fits y = x @ w on a batch sharded over 'data'; returns the loss per step."""
    rng = np.random.default_rng(config.seed)
    features = 16
    true_w = rng.normal(size=(features,)).astype(np.float32)
    batch_shard = NamedSharding(mesh, logical_to_mesh_axes(("batch", "embed"), mesh=mesh))
    label_shard = NamedSharding(mesh, logical_to_mesh_axes(("batch",), mesh=mesh))
    replicated = NamedSharding(mesh, logical_to_mesh_axes((), mesh=mesh))

    def step(w_f, x_bf, y_b):
        def loss_fn(w):
            return jnp.mean((x_bf @ w - y_b) ** 2)
        loss, grad_f = jax.value_and_grad(loss_fn)(w_f)
        return w_f - config.learning_rate * grad_f, loss

    step = jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))
    w_f = jax.device_put(jnp.zeros((features,), jnp.float32), replicated)  # P(): replicated
    losses = []
    for _ in progress(range(config.steps), desc="data-parallel regression", unit="step"):
        x_bf = rng.normal(size=(config.batch_size, features)).astype(np.float32)
        y_b = x_bf @ true_w
        w_f, loss = step(w_f, jax.device_put(x_bf, batch_shard), jax.device_put(y_b, label_shard))
        losses.append(float(loss))
    return losses


def run_demo(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs every demo stage, printing a short report; returns the figures it printed."""
    log = get_logger()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mesh = make_mesh(dict(config.mesh))
    print(f"[1] {describe_mesh(mesh)}")
    print(mesh.devices)
    losses = _data_parallel_regression(mesh, config)
    print(f"[2] data-parallel jitted step over 'data': loss {losses[0]:.4f} -> {losses[-1]:.6f} "
          f"in {len(losses)} steps (batch {config.batch_size} sharded over {mesh.shape['data']})")
    elapsed = time.perf_counter() - start
    print(f"demo finished in {elapsed:.1f}s; workdir {workdir.resolve()}")
    log.info("demo done")
    return {"mesh": dict(mesh.shape), "losses": losses, "seconds": elapsed}
