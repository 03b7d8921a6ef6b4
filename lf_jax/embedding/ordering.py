"""Collective phases of the embedding engine ordered by data when several processes drive
the mesh.

XLA:CPU orders a program's collectives by *scheduling* edges only: a collective is
started once the previous one's ``Execute`` has returned, not once it has finished. A
``while_loop`` or ``cond`` whose body holds collectives (a group's exchange rounds, its
one-round forward) may return from ``Execute`` while its body still runs, when the body
has asynchronous work (the fused kernels' FFI calls). Within one process that is
harmless: its devices meet at in-process rendezvous keyed by the collective. Across
processes (gloo) every process must issue the same collectives in the same order, and a
later, independent collective (another group's exchange, a replicated group's
all-gather) could start in one process while the other was still in the loop: two
processes each waiting in a different all-gather for ever (seen with the fused exchange:
tests/distributed/test_multihost_processes.py's killed-process test hung in every run
that loaded its step from the persistent compilation cache, which changes only the
timing).

``after`` makes a phase's inputs depend on the previous phase's outputs through a value
(each device reads one element of its block of the outputs and adds 0 times it), so the
next phase's collectives cannot start before the previous phase has finished. The
engine chains, in multi-process runs (``ordered()``): each dynamic table's key resolve
after the previous one's and every feature's ids after the last
(lf_jax.embedding.dynamic.tables), every group's routing before the first group's
forward, each group's forward after the previous group's, and each group's update
after the previous group's. There too the fused update sums
(``kernels.route.sum_places``) come as one [S, C, D] result rather than S blocks: with
the S blocks inside the exchange loop and without the chain, the same test hung in
every cache-loaded run, and with one result it passed (the mechanism behind that is not
established; the chain alone also passed every run).

Example (inside ``EmbeddingCollection.apply_gradients``):
    >>> if ordered():
    ...     slot_kbe, local_kbe, coef_kbe, grad_kbcd = after(
    ...         mesh, [(tables[previous], previous_spec)], slot_kbe, local_kbe, coef_kbe,
    ...         grad_kbcd, spec=PartitionSpec(None, mesh.axis_names))
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


def ordered() -> bool:
    """Whether the engine chains its collective phases: when several processes drive the
    mesh (cross-process collectives must be issued in one order everywhere)."""
    return jax.process_count() > 1


def after(mesh: Mesh, done: Sequence[tuple], *arrays, spec: PartitionSpec):
    """``arrays`` (each with partition spec ``spec``), unchanged in value, made to depend
    on every device's block of each ``(array, its partition spec)`` in ``done``.

    Each device takes the first element of its blocks of ``done``, 0 where not finite,
    times 0.0, and adds the sum (an exact 0) to every float array and its int32
    conversion to every integer array: XLA cannot drop an add of 0 * x (x could be
    infinite), so the arrays' consumers wait for ``done``.
    """
    done_arrays = [d for d, _ in done]
    done_specs = tuple(s for _, s in done)

    def shard(done_blocks, *blocks):
        zero = jnp.float32(0.0)
        for block in done_blocks:
            x = block.reshape(-1)[0].astype(jnp.float32)
            zero = zero + 0.0 * jnp.where(jnp.isfinite(x), x, 0.0)
        return tuple(
            b + zero.astype(b.dtype) if jnp.issubdtype(b.dtype, jnp.integer) else b + zero
            for b in blocks
        )

    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(list(done_specs), *([spec] * len(arrays))),
        out_specs=tuple([spec] * len(arrays)),
        check_vma=False,
    )(done_arrays, *arrays)
