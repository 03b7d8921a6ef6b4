"""lf_jax: JAX-first training of large-embedding feed models on a device mesh.

Everything in ``__all__`` is importable from ``lf_jax``; the heavier names (models,
trainers) load on first use, so ``import lf_jax`` stays cheap and starts no jax backend.

Example:
    >>> import lf_jax
    >>> lf_jax.simulate_cpu_devices(8)      # before any jax computation
    >>> mesh = lf_jax.make_mesh({"data": 2, "model": 4})
    >>> ranker = lf_jax.Ranker([lf_jax.TableSpec(name="user", vocab_size=100, dim=8)],
    ...                        [lf_jax.FeatureSpec(name="user", table="user")],
    ...                        num_dense=1, tasks=("click",), batch_size=64)
"""

import importlib

from lf_jax.distributed.devices import keep_freed_memory, simulate_cpu_devices
from lf_jax.distributed.mesh import describe_mesh, make_mesh

keep_freed_memory()  # glibc: reuse freed XLA buffers (no per-step page faults); see README

__version__ = "0.1.0"

_LAZY = {  # name -> module it lives in
    "Ranker": "lf_jax.api.ranker",
    "Encoder": "lf_jax.api.encoder",
    "TableSpec": "lf_jax.embedding.spec",
    "FeatureSpec": "lf_jax.embedding.spec",
    "sgd": "lf_jax.embedding.sparse_optim",
    "rowwise_adagrad": "lf_jax.embedding.sparse_optim",
    "adam": "lf_jax.embedding.sparse_optim",
    "plan_tables": "lf_jax.planner",
    "load_config": "lf_jax.configuration",
    "apply_overrides": "lf_jax.configuration",
    "train_and_evaluate": "lf_jax.train.loop",
    "evaluate_checkpoint": "lf_jax.train.loop",
    "set_verbosity": "lf_jax.console",
    "LfJaxError": "lf_jax.errors",
    "UserInputError": "lf_jax.errors",
}

__all__ = ["simulate_cpu_devices", "make_mesh", "describe_mesh", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lf_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
