"""Dynamic tables against the dict-based reference (lf_jax.testing.dynamic_reference).

A stream of batches with new, repeated and vanishing 64-bit keys over a table whose
capacity is well below the keys seen, on (8,) and (2, 4) meshes: after every step the
engine's activations, key set, rows, optimizer slots, per-slot last/freq and counters
equal the reference's, with admission and each eviction policy, planned row_wise over
every device and table_wise_row_wise (the table's shards on one group of devices).
Each under both kernel settings: "fused" (the C++ resolve of kernels/dynamic.cc and the
fused sparse step) and "xla" (hash_table / key_dedupe in jnp).
"""

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import row_wise, table_wise_row_wise
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.keys import initial_rows, split_keys
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.exchange import capacity_for
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.testing.dynamic_reference import DynamicReference

SHARDS, SLOTS, DIM, BATCH, STEPS = 8, 6, 4, 16, 6
FEATURES = [
    FeatureSpec(name="p", table="post", max_ids=3),
    FeatureSpec(name="q", table="post", max_ids=2, combiner="mean"),
]
POLICIES = {
    "admit2_lru": (
        DynamicPolicy(admit_after=2, sketch_width=64, probe_limit=4),
        rowwise_adagrad(0.3),
    ),
    "lfu": (DynamicPolicy(eviction="lfu", probe_limit=4), adam(0.05)),
    "ttl": (DynamicPolicy(eviction="none", ttl_steps=1, probe_limit=4), rowwise_adagrad(0.3)),
    "none": (DynamicPolicy(eviction="none", probe_limit=3), rowwise_adagrad(0.3)),
}
MESHES = {"8": {"data": 8}, "2x4": {"data": 2, "model": 4}, "1": {"data": 1}}
KERNELS = ("fused", "xla")


def key_stream(seed: int = 0):
    """Per step, bags of keys: a hot set seen every step, a window of keys that moves
    (new keys arrive, old ones vanish) and keys above 2**32."""
    rng = np.random.default_rng(seed)
    mult = 0x9E3779B97F4A7C15
    for t in range(STEPS):
        pool = [7, 11, 13] + list(range(20 + 15 * t, 80 + 15 * t))

        def key(x):
            return (x * mult) % 2**64 if x % 3 else x

        def bags(width, pool=pool):
            return [
                [key(int(rng.choice(pool))) for _ in range(rng.integers(0, width + 1))]
                for _ in range(BATCH)
            ]

        yield {"p": bags(3), "q": bags(2)}


def make(
    policy_name: str,
    mesh_name: str,
    placement: dict | None = None,
    shards=SHARDS,
    slots=SLOTS,
    kernel: str = "fused",
):
    """(spec, collection, DynamicTables) of a table of ``shards`` x ``slots`` rows, planned
    ``placement`` (default: row_wise over every mesh axis), under kernel setting
    ``kernel``."""
    policy, optimizer = POLICIES[policy_name]
    spec = TableSpec(
        name="post", vocab_size=shards * slots, dim=DIM, optimizer=optimizer, dynamic=policy
    )
    shape = MESHES[mesh_name]
    mesh = make_mesh(shape, devices=jax.devices()[: int(np.prod(list(shape.values())))])
    entry = placement or row_wise(tuple(mesh.axis_names))
    coll = EmbeddingCollection([spec], FEATURES, {"post": entry}, mesh, kernel=kernel)
    dyn = DynamicTables(coll)
    assert dyn.kernel == kernel
    return spec, coll, dyn


def train_step(dyn: DynamicTables):
    coll = dyn.collection

    def step(state, keys, grads):
        state, batch = dyn.resolve(state, keys)
        acts = coll.lookup(state["embedding"]["tables"], batch)
        state["embedding"] = coll.apply_gradients(state["embedding"], batch, grads)
        return state, acts

    return jax.jit(step, donate_argnums=0)


def reference_rows(spec):
    init = jax.jit(lambda hi, lo: initial_rows(spec, hi, lo))
    return lambda keys: np.asarray(init(*split_keys(keys)))


def check_stream(spec, dyn: DynamicTables, shards: int, policy_name: str) -> dict:
    """Trains the key stream; after every step the engine equals the reference."""
    ref = DynamicReference(spec, FEATURES, shards, reference_rows(spec))
    state, step_fn = dyn.init(jax.random.key(0)), train_step(dyn)
    rng = np.random.default_rng(1)
    for t, raw in enumerate(key_stream(), start=1):
        grads = {
            "p": rng.standard_normal((BATCH, DIM)).astype(np.float32),
            "q": rng.standard_normal((BATCH, DIM)).astype(np.float32),
        }
        state, acts = step_fn(state, dyn.shard_batch(dyn.preprocess(raw)), grads)
        want_acts = ref.step(raw, grads, t)
        for name in ("p", "q"):
            np.testing.assert_allclose(acts[name], want_acts[name], rtol=1e-5, atol=1e-6)
        snap = dyn.snapshot(state)["post"]
        keys = ref.alive_keys(t)
        assert snap["keys"].tolist() == keys, f"step {t}: key sets differ"
        want_rows = np.array([ref.rows[k] for k in keys]).reshape(-1, DIM)
        np.testing.assert_allclose(snap["rows"], want_rows, rtol=1e-5, atol=1e-6)
        for name, value in snap["slots"].items():
            want = np.array([ref.slots[k][name] for k in keys]).reshape(value.shape)
            np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-7)
        where = {
            s.key[c]: (s.last[c], s.freq[c])
            for s in ref.shards
            for c in range(ref.capacity)
            if s.key[c] in set(keys)
        }
        assert snap["last"].tolist() == [where[k][0] for k in keys]
        assert snap["freq"].tolist() == [where[k][1] for k in keys]
        counters = dyn.counters(state)["post"]
        assert {k: counters[k] for k in ref.counts} == ref.counts, f"step {t}"
        assert counters["occupancy"] == len(keys) / (shards * ref.capacity)
    # the stream exercised what the policy is about
    assert counters["inserts"] > 0 and counters["hits"] > 0
    if policy_name in ("admit2_lru", "lfu"):
        assert counters["evictions"] > 0
    if policy_name == "admit2_lru":
        assert counters["not_admitted"] > 0
    if policy_name in ("none", "ttl"):
        assert counters["refused"] > 0
    return state


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mesh_name", ["8", "2x4"])
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_stream_equals_reference(policy_name, mesh_name, kernel):
    spec, _, dyn = make(policy_name, mesh_name, kernel=kernel)
    check_stream(spec, dyn, SHARDS, policy_name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("policy_name", ["admit2_lru", "lfu"])
def test_one_device_equals_reference(policy_name, kernel):
    """One device, one shard of 48 slots: the owner receives its own deduplicated keys
    (no second dedupe). A step inserting more than 10 keys (an eighth of the owner's 80
    key slots) takes more than one round of reset_inserted; under admit2_lru steps 1 and
    5 insert 4 and 9 (one round), under lfu every step takes several."""
    spec, _, dyn = make(policy_name, "1", shards=1, slots=48, kernel=kernel)
    check_stream(spec, dyn, 1, policy_name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "mesh_name, policy_name, group, axis, devices",
    [
        ("8", "lfu", 0, "data", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("2x4", "admit2_lru", 1, "model", (4, 5, 6, 7)),
        ("2x4", "ttl", 2, "data", (2, 6)),
    ],
)
def test_table_wise_row_wise_stream_equals_reference(
    mesh_name, policy_name, group, axis, devices, kernel
):
    """The table's shards on one group of devices (all 8; devices 4..7 along "model";
    devices 2 and 6 along "data"): the same algorithm on len(devices) shards, and the
    devices outside the group never hold a key."""
    placement = table_wise_row_wise(group, axis)
    spec, _, dyn = make(policy_name, mesh_name, placement, shards=len(devices), kernel=kernel)
    assert dyn.layouts["post"].devices == devices
    state = check_stream(spec, dyn, len(devices), policy_name)
    last = np.asarray(jax.device_get(state["index"]["post"]["last"]))
    outside = [d for d in range(SHARDS) if d not in devices]
    assert (last[outside] == -1).all() and (last[list(devices)] >= 0).any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_keys_all_on_one_owner_equal_reference(kernel):
    """Skew: every key belongs to shard 0, so devices overflow the expected per-owner
    buffer and the step takes the [S, M] branch; the result is the same algorithm."""
    spec, _, dyn = make("admit2_lru", "8", kernel=kernel)
    ref = DynamicReference(spec, FEATURES, SHARDS, reference_rows(spec))
    candidates = (k * 0x9E3779B97F4A7C15 % 2**64 for k in range(10_000))
    owned = [k for k in candidates if ref.owner(k) == 0][:40]
    state, step_fn = dyn.init(jax.random.key(0)), train_step(dyn)
    rng = np.random.default_rng(2)
    for t in range(1, 4):
        raw = {
            "p": [[int(k) for k in rng.choice(owned, 3)] for _ in range(BATCH)],
            "q": [[int(k) for k in rng.choice(owned, 2)] for _ in range(BATCH)],
        }
        per_device = [
            len({k for f in ("p", "q") for bag in raw[f][d * 2 : d * 2 + 2] for k in bag})
            for d in range(SHARDS)
        ]
        assert max(per_device) > capacity_for(BATCH // SHARDS * 5, 1 / SHARDS, 10)
        grads = {n: rng.standard_normal((BATCH, DIM)).astype(np.float32) for n in ("p", "q")}
        state, acts = step_fn(state, dyn.shard_batch(dyn.preprocess(raw)), grads)
        want = ref.step(raw, grads, t)
        np.testing.assert_allclose(acts["p"], want["p"], rtol=1e-5, atol=1e-6)
        snap = dyn.snapshot(state)["post"]
        assert snap["keys"].tolist() == ref.alive_keys(t)
        want_rows = np.array([ref.rows[k] for k in ref.alive_keys(t)]).reshape(-1, DIM)
        np.testing.assert_allclose(snap["rows"], want_rows, rtol=1e-5, atol=1e-6)
    counters = dyn.counters(state)["post"]
    assert {k: counters[k] for k in ref.counts} == ref.counts
    assert counters["evictions"] > 0 and counters["occupancy_max"] == 1.0
