"""The fused CPU kernels of the local sparse step as JAX calls, and the kernel setting.

Which path the engine's local work takes (a group whose rows and entries are all on
the device; for exchanging groups, the routing, the owners' gathers, the pooling from
the received rows, the gradient sums and the owners' update: lf_jax.embedding.kernels.route)
is the collection's ``kernel`` setting:

  auto   fused on the CPU backend, XLA on GPU / TPU (the default; the environment
         variable LF_JAX_EMBEDDING_KERNEL overrides the default)
  fused  the C++ kernels of sparse_step.cc through XLA's FFI: a pooled forward straight
         into the outputs, and an update that sums each distinct row's entry gradients
         (radix sort by row, duplicates make it cheaper) and applies the
         sparse optimizer in place on the donated table and slots. CPU only.
  xla    the jnp path (lookup.GroupRoute.pool, exchange.sum_and_apply), every backend.

Dynamic tables' key resolve follows the same setting (lf_jax.embedding.kernels.dynamic).

``fused`` supports SGD, RowWiseAdagrad and Adam on float32 / bfloat16 / float16 tables;
a group with another optimizer takes the XLA path under ``auto`` (shown by
``EmbeddingCollection.kernels``) and is an error under ``fused``. Lookups through the
fused forward are not differentiable w.r.t. the table (the engine never is: its update
is ``apply_gradients``).

Shapes: N examples (k micro-batches x B), E entry columns, C output columns, D dim,
R rows, P pieces, W entry columns of the widest piece. Tables [R, D] or a device's
[1, R, D] block (slots [1, R] / [1, R, D]): leading axes of size 1 are passed as they
are, so that XLA aliases donated buffers without copying them.

Example:
    >>> out_ncd = pool(table_rd, rows_ne, coef_ne, out_col_e, num_out=C)
    >>> table_rd, slots_r = update(table_rd, slots_r, rows_ne, coef_ne, out_col_e,
    ...                            cols_pw, grad_ncd, step, optimizer)
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.kernels.build import load
from lf_jax.embedding.sparse_optim import SGD, Adam, RowWiseAdagrad, SparseOptimizer
from lf_jax.errors import UserInputError

KERNELS = ("auto", "fused", "xla")
FUSED_OPTIMIZERS = (SGD, RowWiseAdagrad, Adam)
ENV = "LF_JAX_EMBEDDING_KERNEL"


def requested_kernel(kernel: str | None) -> str:
    """The setting: ``kernel`` if given, else $LF_JAX_EMBEDDING_KERNEL, else 'auto'."""
    value = kernel if kernel is not None else os.environ.get(ENV, "auto")
    if value not in KERNELS:
        source = "kernel" if kernel is not None else ENV
        raise UserInputError(f"{source} must be one of {KERNELS}, got {value!r}")
    return value


def describe_kernel(kernel: str | None = None) -> str:
    """One line for users (``lf-jax plan``): the setting in force and what it selects."""
    value = requested_kernel(kernel)
    source = "kernel" if kernel is not None else f"{ENV} / EmbeddingCollection(kernel=)"
    meaning = {
        "auto": "the fused C++ kernel on the CPU backend, XLA on GPU / TPU",
        "fused": "the fused C++ kernel (CPU backend only)",
        "xla": "XLA on every backend",
    }[value]
    line = f"sparse step kernel: {value} ({source}): {meaning}"
    if value == "xla":
        return line
    kinds = "/".join(o.kind for o in FUSED_OPTIMIZERS)
    return (
        f"{line}; fused: pooling, updates and exchange routing of groups with {kinds}, "
        "and dynamic tables' key resolve (other optimizers, the collectives and "
        "overflowing steps' sorted rounds: XLA)"
    )


def resolve_kernel(kernel: str, platform: str, optimizer: SparseOptimizer | None = None) -> str:
    """'fused' or 'xla' for a group with ``optimizer`` (None: work with no optimizer, e.g.
    a dynamic table's key resolve, lf_jax.embedding.kernels.dynamic) on backend
    ``platform`` ('cpu', 'gpu', 'tpu', ...) under setting ``kernel``; builds and loads
    the library when the result is 'fused' (``KernelBuildError`` names the XLA setting if
    that fails)."""
    fits = optimizer is None or isinstance(optimizer, FUSED_OPTIMIZERS)
    if kernel == "xla" or (kernel == "auto" and (platform != "cpu" or not fits)):
        return "xla"
    if platform != "cpu":
        raise UserInputError(
            f"kernel='fused' is a CPU kernel and this mesh is on '{platform}': use "
            "kernel='auto' or 'xla'"
        )
    if not fits:
        raise UserInputError(
            f"kernel='fused' supports {[o.kind for o in FUSED_OPTIMIZERS]}, not "
            f"'{optimizer.kind if optimizer else None}': use kernel='auto' or 'xla'"
        )
    load()
    return "fused"


def pool(table_rd, rows_ne, coef_ne, out_col_e: np.ndarray, num_out: int) -> jax.Array:
    """[N, C, D] float32: entry e of example n adds ``coef[n, e] * table[rows[n, e]]``
    into column out_col[e]; rows < 0 are padding (skipped), rows >= R are clamped."""
    out = jax.ShapeDtypeStruct((rows_ne.shape[0], num_out, table_rd.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("lf_jax_pool", out)(
        table_rd,
        rows_ne.astype(jnp.int32),
        coef_ne.astype(jnp.float32),
        jnp.asarray(out_col_e, jnp.int32),
    )


def update(
    table_rd,
    slots_r: dict,
    rows_ne,
    coef_ne,
    out_col_e: np.ndarray,
    cols_pw: np.ndarray,
    grad_ncd,
    step,
    optimizer: SparseOptimizer,
):
    """``optimizer`` applied in place to the rows the entries touch, once per distinct row
    with the sum of its entries' gradients ``coef[n, e] * grad[n, out_col[e]]``. Pieces
    (tables) hold disjoint rows: piece p's entries are the columns cols_pw[p] (-1:
    none), deduplicated on their own. Rows < 0 or >= R are skipped. ``table_rd`` and
    the slots are aliased to the outputs (donate them: no copy). ``grad_ncd``: one
    [N, C, D] array, or a list of equal blocks [N / blocks, C, D] (example n in block
    n // (N / blocks)), e.g. an exchange's per-peer results, passed without
    concatenating them. Returns (table, slots)."""
    blocks = list(grad_ncd) if isinstance(grad_ncd, list | tuple) else [grad_ncd]
    entries = (
        rows_ne.astype(jnp.int32),
        coef_ne.astype(jnp.float32),
        jnp.asarray(out_col_e, jnp.int32),
        jnp.asarray(cols_pw, jnp.int32),
        blocks[0].astype(jnp.float32),
        jnp.asarray(step, jnp.int32),
        *(b.astype(jnp.float32) for b in blocks[1:]),
    )
    return update_call(optimizer, table_rd, slots_r, entries)


def update_call(optimizer: SparseOptimizer, table_rd, slots_r: dict, operands, family: str = ""):
    """(table, slots): the update kernel of ``optimizer`` (``family`` 'bag_': bag mode's,
    kernels/bag_step.cc) called on the table and the optimizer's slots, which are aliased
    to its outputs (donate them), then ``operands``."""
    target, attrs = _target(optimizer)
    target = target.replace("lf_jax_update_", f"lf_jax_update_{family}")
    names = tuple(optimizer.slot_shapes(1))  # the kernel's slot operands, in this order
    state = (table_rd, *(slots_r[n] for n in names))
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state]
    out = jax.ffi.ffi_call(target, shapes, input_output_aliases={i: i for i in range(len(state))})(
        *state, *operands, **attrs
    )
    return out[0], dict(zip(names, out[1:], strict=True))


def _target(optimizer: SparseOptimizer) -> tuple[str, dict[str, np.float32]]:
    """The FFI target of ``optimizer``'s update and its float32 attributes (1 - b
    computed as the XLA path does, in Python, then rounded)."""
    lr = np.float32(optimizer.learning_rate)
    if isinstance(optimizer, SGD):
        return "lf_jax_update_sgd", {"learning_rate": lr}
    if isinstance(optimizer, RowWiseAdagrad):
        return "lf_jax_update_adagrad", {"learning_rate": lr, "eps": np.float32(optimizer.eps)}
    if isinstance(optimizer, Adam):
        return "lf_jax_update_adam", {
            "learning_rate": lr,
            "b1": np.float32(optimizer.b1),
            "b2": np.float32(optimizer.b2),
            "one_minus_b1": np.float32(1 - optimizer.b1),
            "one_minus_b2": np.float32(1 - optimizer.b2),
            "eps": np.float32(optimizer.eps),
        }
    raise UserInputError(f"the fused kernel has no '{optimizer.kind}' update")
