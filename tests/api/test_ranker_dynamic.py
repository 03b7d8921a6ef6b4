"""lf_jax.Ranker with a dynamic table of its own (string user ids as 64-bit keys): fit
inserts keys and logs counters, an unknown key predicts as padding, and a saved ranker
loads onto other shards (keys rehashed) with the same predictions."""

import numpy as np
import pytest

import lf_jax
from lf_jax.embedding import table_wise_row_wise
from lf_jax.embedding.dynamic.policy import DynamicPolicy

USERS, ITEMS, BATCH = 300, 120, 128


def _batch(rng, bias, n):
    user, item = rng.integers(0, USERS, n), rng.integers(0, ITEMS, n)
    dense = rng.normal(size=(n, 2)).astype(np.float32)
    p = 1 / (1 + np.exp(-(bias[user] + dense[:, 0] - 1)))
    return {
        "user": [f"u{u}" for u in user],  # strings: fingerprinted to 64-bit keys
        "item": item,
        "dense": dense,
        "labels": {"click": (rng.random(n) < p).astype(np.float32)},
    }


@pytest.fixture(scope="module")
def fitted():
    """A ranker whose user table (1,024 rows for 300 ids, LRU) is dynamic, planned on 4
    shards (table_wise_row_wise over "model"), fitted 30 steps."""
    rng = np.random.default_rng(0)
    bias = rng.normal(0, 1.5, USERS)
    adagrad = lf_jax.rowwise_adagrad(0.2, initial_accumulator=0.0)
    ranker = lf_jax.Ranker(
        [
            lf_jax.TableSpec(
                name="user",
                vocab_size=1024,
                dim=8,
                optimizer=adagrad,
                dynamic=DynamicPolicy(admit_after=2, eviction="lru", probe_limit=16),
            ),
            lf_jax.TableSpec(name="item", vocab_size=ITEMS, dim=8, optimizer=adagrad),
        ],
        [
            lf_jax.FeatureSpec(name="user", table="user"),
            lf_jax.FeatureSpec(name="item", table="item"),
        ],
        num_dense=2,
        tasks=("click",),
        batch_size=BATCH,
        mesh={"data": 2, "model": 4},
        plan={"user": table_wise_row_wise(1, "model")},
        model={"mlp_dims": (32,)},
    )
    history = ranker.fit([_batch(rng, bias, BATCH) for _ in range(10)], steps=30, log_every=10)
    return ranker, history, _batch(rng, bias, 512)


def test_fit_inserts_keys_and_reports_counters(fitted):
    ranker, history, _ = fitted
    assert ranker.index["user"]["key_hi"].shape == (8, 256)  # 4 shards of 256 slots (+4 idle)
    last = history[-1]
    assert last["step"] == 30 and last["loss"] < history[0]["loss"]
    assert 250 < last["dynamic/user/inserts"] <= USERS  # each user seen twice is admitted
    assert last["dynamic/user/not_admitted"] > 0 and last["dynamic/user/evictions"] < 5
    assert 0 < last["dynamic/user/occupancy"] <= 1


def test_an_unknown_key_predicts_as_padding(fitted):
    ranker, _, test = fitted
    probs = ranker.predict(test)
    unknown = {**test, "user": ["someone-new"] * 512}
    padding = {**test, "user": [[] for _ in range(512)]}
    np.testing.assert_array_equal(ranker.predict(unknown), ranker.predict(padding))
    assert np.abs(ranker.predict(unknown) - probs).max() > 1e-3


def test_saved_ranker_loads_onto_other_shards(fitted, tmp_path):
    from lf_jax.api.ranker_dynamic import dynamic_state

    ranker, _, test = fitted
    saved = ranker.save(tmp_path / "model")
    other = lf_jax.Ranker.load(saved)  # re-planned: user row_wise over 8 shards
    assert other.index["user"]["key_hi"].shape == (8, 128)

    def keys(r):
        view = dynamic_state(r)
        snap = r.dynamic.snapshot({"embedding": view["embedding"], "index": view["dynamic"]})
        return snap["user"]

    a, b = keys(ranker), keys(other)
    assert a["keys"].tolist() == b["keys"].tolist() and a["keys"].size > 250
    np.testing.assert_array_equal(a["rows"], b["rows"])
    np.testing.assert_array_equal(a["last"], b["last"])
    np.testing.assert_allclose(other.predict(test), ranker.predict(test), atol=1e-6, rtol=0)
    assert other.steps_trained == 30
