"""Exchange capacities from the traffic (lf_jax.embedding.capacity).

Each layout reports the most distinct keys any device sends one owner; a chooser picks
the smallest rung of a fixed ladder that holds recent steps' counts. Any capacity is
exact (a batch that overflows takes the sorted rounds), and a step compiles once per
rung it visits, never per step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_exchange import (
    SKEW_FEATURES,
    SKEW_TABLES,
    assert_skewed_steps_match_oracle,
    skewed_batch,
)
from test_strategies import MESHES

from lf_jax import embedding as P
from lf_jax.embedding.capacity import (
    CapacityChooser,
    capacity_ladder,
    exchange_counts,
    static_capacities,
)
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.errors import UserInputError
from lf_jax.testing.compilation import count_compilations


def _collection(mesh_of, mesh_name="d8", strategy=None):
    strategy = strategy or P.row_wise(("data",))
    return EmbeddingCollection(
        SKEW_TABLES,
        SKEW_FEATURES,
        {t.name: strategy for t in SKEW_TABLES},
        mesh_of(MESHES[mesh_name]),
    )


def test_ladder_is_a_short_geometric_run_up_to_always_fits():
    rungs = capacity_ladder(6801, 81920)
    assert list(rungs) == sorted(set(rungs))
    assert rungs[0] <= 6801 / 16 and rungs[-1] == 81920
    assert all(r % 8 == 0 for r in rungs[:-1])
    ratios = np.asarray(rungs[1:-1]) / np.asarray(rungs[:-2])
    assert np.all(ratios <= 1.25) and np.all(ratios > 1.1)  # 2^(1/4), rounded
    assert 6801 in range(rungs[0], rungs[-1]) and len(rungs) < 40
    assert capacity_ladder(3, 5) == (5,)  # small groups: one rung, always fits
    with pytest.raises(UserInputError, match="positive"):
        capacity_ladder(0, 5)


def test_layout_reports_the_most_distinct_keys_of_any_device_for_one_owner(mesh_of):
    coll = _collection(mesh_of)
    host = coll.preprocess(*skewed_batch("zipf", 3))
    routing = jax.jit(coll.routing)(coll.shard_batch(host))
    for route in coll.routes:
        slot_be, local_be, _ = route.entries(
            host.ids, {k: np.ones(v.shape, np.float32) for k, v in host.ids.items()}
        )
        slot_be, local_be = np.asarray(slot_be), np.asarray(local_be)
        per_device = np.split(np.arange(slot_be.shape[0]), 8)
        expected = max(
            np.unique(local_be[rows][slot_be[rows] == s]).size
            for rows in per_device
            for s in range(route.group.num_slots)
        )
        most = np.asarray(routing[route.group.name].most)
        assert np.all(most == expected), (route.group.name, most, expected)


@pytest.mark.parametrize(
    "kind,mesh_name,strategy,capacity",
    [
        ("zipf", "d8", P.row_wise(("data",)), 1),  # every owner overflows: sorted rounds
        ("one_owner", "d2m4", P.row_wise(("data", "model")), 3),
        ("zipf", "d2m4", P.row_wise(("model",)), 2),  # replicated group, overflowing
        ("zipf", "d8", P.row_wise(("data",)), 64),  # one round, smaller than static
    ],
    ids=["zipf_rw_d8_c1", "one_owner_rw_all_d2m4_c3", "zipf_rw_model_d2m4_c2", "zipf_rw_d8_c64"],
)
def test_any_capacity_matches_oracle(kind, mesh_name, strategy, capacity, mesh_of):
    """Given capacities below the traffic (every step overflows and takes the exact
    sorted rounds) or between the traffic and the static capacity (one round)."""
    coll = _collection(mesh_of, mesh_name, strategy)
    capacities = {route.group.name: capacity for route in coll.routes}
    assert_skewed_steps_match_oracle(coll, kind, shared_routing=True, capacities=capacities)


def test_chooser_takes_the_smallest_rung_over_the_window(mesh_of):
    coll = _collection(mesh_of)
    chooser = CapacityChooser(coll, batch_size=64, window=3, margin=2.0)
    static = static_capacities(coll, 64)
    assert dict(chooser.capacities()) == static  # nothing observed yet
    name = coll.routes[0].group.name
    counts = [{name: 20}, {name: 5}, {name: 5}, {name: 5}]
    rungs = chooser.ladders[name]
    picked = []
    for count in counts:
        chooser.observe(count)
        picked.append(dict(chooser.capacities())[name])
    need_20 = 20 + 2 * np.sqrt(20)
    need_5 = 5 + 2 * np.sqrt(5)
    assert picked[0] == min(r for r in rungs if r >= need_20)
    assert picked[1] == picked[2] == picked[0]  # the 20 is still in the window
    assert picked[3] == min(r for r in rungs if r >= need_5) < picked[0]
    chooser.observe({name: 10**6})  # above every rung: the top (always fits)
    assert dict(chooser.capacities())[name] == rungs[-1]
    with pytest.raises(UserInputError, match="capacities .* must be positive ints"):
        coll.routing(None, {"elsewhere": 4})
    with pytest.raises(UserInputError, match="capacities .* must be positive ints"):
        coll.routing(None, {name: 0})


def test_capacities_from_the_traffic_compile_once_per_rung_and_stay_exact(mesh_of):
    """A step whose capacities come from the chooser, over zipf batches then batches
    with every id on one owner (the count jumps: that step overflows, still exact, and
    the next steps take a higher rung): one compile per rung visited, never per step,
    and the tables equal those of the static capacities' step."""
    coll = _collection(mesh_of)

    def step(state, batch, capacities):
        routing = coll.routing(batch, capacities)
        acts = coll.lookup(state["tables"], batch, routing)
        grads = jax.tree.map(jnp.ones_like, acts)
        new = coll.apply_gradients(state, batch, grads, routing=routing)
        return new, exchange_counts(routing)

    traffic = jax.jit(step, static_argnames="capacities")
    static = jax.jit(lambda s, b: step(s, b, None)[0])
    chooser = CapacityChooser(coll, batch_size=64)
    kinds = ["zipf"] * 5 + ["one_owner"] * 3
    batches = [
        coll.shard_batch(coll.preprocess(*skewed_batch(kind, i))) for i, kind in enumerate(kinds)
    ]
    state = expected = coll.init(jax.random.key(0))
    used = []
    with count_compilations() as counter:
        for batch in batches:
            caps = chooser.capacities()
            used.append(caps)
            state, counts = traffic(state, batch, capacities=caps)
            chooser.observe(counts)
    assert counter.count == len(set(used)) <= 3, (counter.count, used)
    static_caps = tuple(sorted(static_capacities(coll, 64).items()))
    assert used[0] == static_caps and used[1] != static_caps  # zipf: a lower rung
    for batch in batches:
        expected = static(expected, batch)
    for name in state["tables"]:
        np.testing.assert_allclose(
            np.asarray(state["tables"][name]), np.asarray(expected["tables"][name]), atol=1e-6
        )
