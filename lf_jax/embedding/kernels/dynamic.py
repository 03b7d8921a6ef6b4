"""Dynamic tables' fused CPU kernels (dynamic.cc) as JAX calls.

The resolve of a dynamic table follows the collection's ``kernel`` setting, chosen by
``lf_jax.embedding.kernels.fused.resolve_kernel`` with no optimizer: ``auto`` is the C++
kernel on the CPU backend and XLA on GPU / TPU, ``fused`` the C++ kernel (CPU only),
``xla`` the jnp path of lf_jax.embedding.dynamic.hash_table / key_dedupe. Both paths
give the same slots, state and counters (the C++ kernel runs hash_table's algorithm;
tests run both against the dict reference). The kernel does one shard's find, admission,
insert rounds and eviction in one call, in place on the shard's donated hash index, and
the sender's owner / dedupe / rank in another.

Shapes: C slots per shard, N (M) entries, S shards.

Example:
    >>> path = resolve_kernel(collection.kernel, "cpu")        # kernels.fused: 'fused' | 'xla'
    >>> slot_n, new_n, state = resolve_shard_fused(state, hi_n, lo_n, valid_n, step, policy)
"""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.dynamic.keys import HOME_SALT, OWNER_SALT, SKETCH_SALT, salt
from lf_jax.embedding.dynamic.policy import EVICTIONS, DynamicPolicy
from lf_jax.embedding.kernels.build import load

STATE = ("key_hi", "key_lo", "last", "freq", "sketch", "counters")  # the kernel's order


def _salts(policy: DynamicPolicy, depth: int, base: int) -> jax.Array:
    """[1 + depth] uint32: the salt of hash ``base``, then the sketch rows' salts."""
    values = [salt(base, policy.seed)] + [salt(SKETCH_SALT, policy.seed, d) for d in range(depth)]
    return jnp.asarray(np.array(values, np.uint32))


def _ttl(policy: DynamicPolicy) -> np.int64:
    return np.int64(-1 if policy.ttl_steps is None else policy.ttl_steps)


def resolve_shard_fused(state: dict, hi_n, lo_n, valid_n, step, policy: DynamicPolicy, insert=True):
    """hash_table.resolve_shard by the C++ kernel: (slot_n int32, -1 when absent; new_n
    bool, one entry per inserted key (its first); new state). ``state``'s arrays are
    updated in place (donate them: no copy); with ``insert`` False the keys are only
    found and ``state`` comes back as it was. The state's arrays may carry leading axes
    of size 1 (a device's block [1, C], [1, depth, width], [1, 2, 8]), the slots and
    flags are [N]."""
    load()  # registers the targets (once per process)
    step = jnp.asarray(step, jnp.int32)
    keys = (hi_n.astype(jnp.uint32), lo_n.astype(jnp.uint32), valid_n.astype(bool), step)
    n = hi_n.shape[0]
    if not insert:
        found = jax.ffi.ffi_call("lf_jax_dynamic_find", jax.ShapeDtypeStruct((n,), jnp.int32))(
            state["key_hi"],
            state["key_lo"],
            state["last"],
            *keys,
            _salts(policy, 0, HOME_SALT),
            probe_limit=np.int64(policy.probe_limit),
            ttl=_ttl(policy),
        )
        return found, jnp.zeros((n,), bool), state
    arrays = [state[k] for k in STATE]
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
    shapes += [jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), bool)]
    out = jax.ffi.ffi_call(
        "lf_jax_dynamic_resolve",
        shapes,
        input_output_aliases={i: i for i in range(len(STATE))},
    )(
        *arrays,
        *keys,
        _salts(policy, state["sketch"].shape[-2], HOME_SALT),
        probe_limit=np.int64(policy.probe_limit),
        eviction=np.int64(EVICTIONS.index(policy.eviction)),
        ttl=_ttl(policy),
        admit_after=np.int64(policy.admit_after),
    )
    return out[-2], out[-1], dict(zip(STATE, out[: len(STATE)], strict=True))


def owner_ranks_fused(hi_m, lo_m, valid_m, shards: int, policy: DynamicPolicy):
    """The sender's routing by the C++ kernel: (owner_m [M] int32, the key's shard
    key_hash(k, OWNER) % shards; and key_dedupe.owner_ranks' leader_m, send_m, rank_m,
    load_s), with each key's first valid entry as its leader."""
    load()
    m = hi_m.shape[0]
    shapes = [jax.ShapeDtypeStruct((m,), t) for t in (jnp.int32, jnp.int32, bool, jnp.int32)]
    return tuple(
        jax.ffi.ffi_call(
            "lf_jax_dynamic_route", [*shapes, jax.ShapeDtypeStruct((shards,), jnp.int32)]
        )(
            hi_m.astype(jnp.uint32),
            lo_m.astype(jnp.uint32),
            valid_m.astype(bool),
            _salts(policy, 0, OWNER_SALT),
        )
    )
