"""Warm start of a dynamic table from a static table's rows (ids through an IdMap): the
keys read exactly those rows, a training step finds them (no re-insert), bad input is
one error."""

import jax
import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import row_wise
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.dynamic.keys import join_keys, parse_keys
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.dynamic.tables import DynamicTables
from lf_jax.embedding.dynamic.warm_start import warm_start
from lf_jax.embedding.ids import IdMap
from lf_jax.embedding.sparse_optim import adam
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError

DIM = 4
IDS = [f"urn:li:member:{i}" for i in range(40)]


@pytest.fixture(scope="module")
def dyn():
    mesh = make_mesh({"data": 8})
    table = TableSpec(
        name="member", vocab_size=64, dim=DIM, optimizer=adam(0.1), dynamic=DynamicPolicy()
    )
    features = [FeatureSpec(name="m", table="member", max_ids=1)]
    return DynamicTables(EmbeddingCollection([table], features, {"member": row_wise("data")}, mesh))


@pytest.mark.slow
def test_warm_started_keys_read_the_static_rows(dyn):
    rng = np.random.default_rng(0)
    id_map = IdMap.build(IDS, num_oov_buckets=1)
    static_vd = rng.standard_normal((id_map.num_rows, DIM)).astype(np.float32)
    known = IDS[::2]  # a subset, in any order
    mu = rng.standard_normal((len(known), DIM)).astype(np.float32)
    state = warm_start(
        dyn,
        dyn.init(jax.random.key(0)),
        "member",
        known,
        static_vd[id_map.lookup(known)],
        slots={"mu": mu},
    )
    snapshot = dyn.snapshot(state)["member"]
    assert len(snapshot["keys"]) == len(known)
    query = known[::-1] + ["urn:li:member:1"]  # one id never warm-started
    batch = dyn.shard_batch(dyn.preprocess({"m": query[:16]}))
    find = jax.jit(lambda s, b: dyn.resolve(s, b, insert=False))  # jitted: eager is minutes
    _, sparse = find(state, batch)
    acts = np.asarray(dyn.collection.lookup(state["embedding"]["tables"], sparse)["m"])
    np.testing.assert_array_equal(acts, static_vd[id_map.lookup(query[:16])])
    np.testing.assert_array_equal(np.asarray(sparse.ids["m"]) >= 0, True)
    trained, _ = jax.jit(dyn.resolve)(state, batch)  # training finds them: no insert, no reset
    assert dyn.counters(trained)["member"]["hits"] == 16
    assert dyn.counters(trained)["member"]["inserts"] == 0
    batch = dyn.shard_batch(dyn.preprocess({"m": [query[-1]] * 16}))
    _, sparse = find(state, batch)
    assert (np.asarray(sparse.ids["m"]) == -1).all()  # not warm-started: absent
    # snapshot: keys ascending, with the given rows and adam slots (nu: its initial zeros)
    hi, lo, _ = parse_keys("m", known, 1)
    known_u64 = join_keys(hi[:, 0], lo[:, 0])
    pos = [int(np.flatnonzero(known_u64 == key)[0]) for key in snapshot["keys"]]
    np.testing.assert_array_equal(snapshot["rows"], static_vd[id_map.lookup(known)][pos])
    np.testing.assert_array_equal(snapshot["slots"]["mu"], mu[pos])
    np.testing.assert_array_equal(snapshot["slots"]["nu"], 0.0)
    assert (snapshot["last"] == 0).all() and (snapshot["freq"] == 1).all()


def test_bad_warm_start_input_is_one_error(dyn):
    state = dyn.init(jax.random.key(0))
    rows = np.zeros((3, DIM), np.float32)
    with pytest.raises(UserInputError, match=r"'user' is not a dynamic table"):
        warm_start(dyn, state, "user", IDS[:3], rows)
    with pytest.raises(UserInputError, match=r"rows must be \[3, 4\] \(keys x dim\), got \[3, 5\]"):
        warm_start(dyn, state, "member", IDS[:3], np.zeros((3, 5)))
    with pytest.raises(UserInputError, match=r"appears twice, at positions 0 and 2"):
        warm_start(dyn, state, "member", [IDS[0], IDS[1], IDS[0]], rows)
    with pytest.raises(
        UserInputError, match=r"slot\(s\) \['v2'\] unknown \(slots: \['mu', 'nu'\]\)"
    ):
        warm_start(dyn, state, "member", IDS[:3], rows, slots={"v2": rows})
    with pytest.raises(UserInputError, match=r"dynamic table 'member': key .* finds no free slot"):
        warm_start(dyn, state, "member", list(range(65)), np.zeros((65, DIM)))
