"""The C++ kernels of dynamic tables (lf_jax.embedding.kernels.dynamic) against the XLA
path: bit-identical shard state, slots and counters under every policy, the sender's
routing against a set reference, the kernel setting, and a donated step that copies no
hash index."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import row_wise
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.hash_table import init_shard, resolve_shard
from lf_jax.embedding.dynamic.keys import OWNER_SALT, key_hash, salt, split_keys
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.kernels.dynamic import owner_ranks_fused, resolve_shard_fused
from lf_jax.embedding.kernels.fused import resolve_kernel
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError

POLICIES = [
    DynamicPolicy(eviction="lru", probe_limit=4, admit_after=2, sketch_width=64),
    DynamicPolicy(eviction="lfu", probe_limit=4),
    DynamicPolicy(eviction="none", ttl_steps=1, probe_limit=4),
    DynamicPolicy(eviction="none", probe_limit=3, seed=5),
    DynamicPolicy(
        eviction="lfu", probe_limit=8, admit_after=3, sketch_depth=3, sketch_width=32, ttl_steps=3
    ),
]


@pytest.mark.parametrize("policy", POLICIES, ids=range(len(POLICIES)))
def test_fused_resolve_equals_xla_step_by_step(policy):
    """14 steps of 60 entries (repeats, invalid entries, keys below and above 2**32) on a
    shard of 48 slots: slots, the keys marked new, every state array and the find-only
    slots are equal after every step."""
    rng = np.random.default_rng(7)
    pool = rng.integers(0, 2**63, 200, dtype=np.int64).astype(np.uint64)
    pool[:20] &= np.uint64(0xFFFFFFFF)
    xla_state = fused_state = init_shard(48, policy)

    def run(fn, insert=True):
        return jax.jit(lambda s, h, lo, v, t: fn(s, h, lo, v, t, policy, insert))

    xla, fused = run(resolve_shard), run(resolve_shard_fused)
    xla_find, fused_find = run(resolve_shard, False), run(resolve_shard_fused, False)
    for step in range(1, 15):
        keys = rng.choice(pool[: 40 + 10 * step], 60)
        args = (*map(jnp.asarray, split_keys(keys)), jnp.asarray(rng.random(60) < 0.9), step)
        found = np.asarray(fused_find(fused_state, *args)[0])
        np.testing.assert_array_equal(found, xla_find(xla_state, *args)[0])
        slot_x, new_x, xla_state = xla(xla_state, *args)
        slot_f, new_f, fused_state = fused(fused_state, *args)
        np.testing.assert_array_equal(slot_f, slot_x)
        assert sorted(keys[np.asarray(new_f)]) == sorted(keys[np.asarray(new_x)])
        for name, value in xla_state.items():
            np.testing.assert_array_equal(fused_state[name], value, err_msg=f"{step} {name}")
    counters = np.asarray(xla_state["counters"])[0]
    assert counters[3] > 0 and counters[0] > 0  # inserts and hits


def test_fused_route_matches_a_set_reference():
    rng = np.random.default_rng(3)
    keys = rng.choice(rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64), 300)
    valid = rng.random(300) < 0.8
    policy = DynamicPolicy(seed=3)
    hi, lo = split_keys(keys)
    owner, leader, send, rank, load = map(
        np.asarray, owner_ranks_fused(*map(jnp.asarray, (hi, lo, valid)), 5, policy)
    )
    np.testing.assert_array_equal(owner, key_hash(np, hi, lo, salt(OWNER_SALT, 3)) % 5)
    # one sent entry per distinct valid key (its first), which every entry leads to
    assert keys[send].tolist() == list(dict.fromkeys(keys[valid].tolist()))
    assert send[leader[valid]].all() and (keys[leader[valid]] == keys[valid]).all()
    for o in range(5):  # ranks 0 .. load - 1 among the owner's sent entries, entry order
        mine = np.nonzero(send & (owner == o))[0]
        assert load[o] == mine.size and rank[mine].tolist() == list(range(mine.size))


def _dynamic(kernel, devices=1):
    mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
    spec = TableSpec(
        name="t", vocab_size=1024, dim=4, optimizer=rowwise_adagrad(0.1), dynamic=DynamicPolicy()
    )
    features = [FeatureSpec(name="f", table="t", max_ids=4)]
    plan = {"t": row_wise("data")}
    return DynamicTables(EmbeddingCollection([spec], features, plan, mesh, kernel=kernel))


def test_kernel_setting_picks_the_resolve(monkeypatch):
    assert _dynamic("auto").kernel == "fused" and _dynamic("xla").kernel == "xla"
    monkeypatch.setenv("LF_JAX_EMBEDDING_KERNEL", "xla")
    assert _dynamic(None).kernel == "xla"
    assert resolve_kernel("auto", "gpu") == "xla"
    with pytest.raises(UserInputError, match="kernel='auto' or 'xla'"):
        resolve_kernel("fused", "gpu")


@pytest.mark.parametrize("devices", [1, 8])
def test_donated_fused_step_copies_no_hash_index(devices):
    """The kernel works on the device's [1, C] index blocks in place, and the skew
    exchange is a loop, not a cond: the optimized HLO of a donated resolve holds no copy
    of a [1, C] array."""
    dyn = _dynamic("fused", devices)
    state = dyn.init(jax.random.key(0))
    # 256 entries per device: on 8 devices the [S, width] exchange and the [S, M] loop
    batch = dyn.shard_batch(dyn.preprocess({"f": np.arange(2048).reshape(512, 4) * 7919}))
    step = jax.jit(lambda s, b: dyn.resolve(s, b), donate_argnums=0)
    hlo = step.lower(state, batch).compile().as_text()
    capacity = dyn.capacity("t")
    assert "lf_jax_dynamic_resolve" in hlo
    assert not re.search(rf"= [us]32\[1,{capacity}\]\{{1,0\}} copy\(", hlo)
