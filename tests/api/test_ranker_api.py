"""lf_jax.Ranker on in-memory numpy batches: learns, saves, loads on another mesh, scores;
bad batches are one error naming the key or the size."""

import sys

import numpy as np
import pytest

import lf_jax
from lf_jax.console import progress_enabled
from lf_jax.train.metrics import binary_metrics

USERS, ITEMS, BATCH = 300, 120, 128


def make_batch(rng, user_bias, item_bias, n):
    """Clicks drawn from sigmoid(user bias + item bias + dense[0] - 1); true probs in "p"."""
    user, item = rng.integers(0, USERS, n), rng.integers(0, ITEMS, n)
    dense = rng.normal(size=(n, 2)).astype(np.float32)
    p = 1 / (1 + np.exp(-(user_bias[user] + item_bias[item] + dense[:, 0] - 1)))
    return {
        "user": user,
        "item": item,
        "history": [list(rng.integers(0, ITEMS, k)) for k in rng.integers(0, 6, n)],
        "dense": dense,
        "labels": {"click": (rng.random(n) < p).astype(np.float32)},
        "p": p[:, None],
    }


def new_ranker(**kwargs):
    adagrad = lf_jax.rowwise_adagrad(0.2, initial_accumulator=0.0)
    return lf_jax.Ranker(
        [
            lf_jax.TableSpec(name="user", vocab_size=USERS, dim=8, optimizer=adagrad),
            lf_jax.TableSpec(name="item", vocab_size=ITEMS, dim=8, optimizer=adagrad),
        ],
        [
            lf_jax.FeatureSpec(name="user", table="user"),
            lf_jax.FeatureSpec(name="item", table="item"),
            lf_jax.FeatureSpec(name="history", table="item", max_ids=5, combiner="mean"),
        ],
        num_dense=2,
        tasks=("click",),
        batch_size=BATCH,
        model={"mlp_dims": (32,)},
        **kwargs,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    user_bias, item_bias = rng.normal(0, 1.5, USERS), rng.normal(0, 1.5, ITEMS)
    ranker = new_ranker()
    batches = (make_batch(rng, user_bias, item_bias, BATCH) for _ in range(300))  # fresh data
    history = ranker.fit(batches, steps=300, log_every=100)
    directory = ranker.save(tmp_path_factory.mktemp("saved") / "ranker")
    return ranker, history, directory, make_batch(rng, user_bias, item_bias, 2001)


def test_fit_learns_from_in_memory_batches(trained):
    ranker, history, _, test = trained
    assert [row["step"] for row in history] == [100, 200, 300]
    assert all(row["loss"] == row["loss_click"] > 0 for row in history)  # one task
    probs = ranker.predict(test)
    assert probs.shape == (2001, 1)  # any batch size: padded to the devices, cut back
    labels = test["labels"]["click"][:, None]
    metrics = binary_metrics(probs, labels, ("click",), test["p"])
    dense_only = binary_metrics(
        1 / (1 + np.exp(-test["dense"][:, :1])), labels, ("click",), test["p"]
    )
    # the ids carry most of the signal: the model learned them (dense alone: about 0.6)
    assert metrics["click/auc"] > dense_only["click/auc"] + 0.1, (metrics, dense_only)


def test_saved_ranker_scores_the_same_on_another_mesh(trained):
    ranker, _, directory, test = trained
    assert sorted(p.name for p in directory.iterdir()) == [
        "params.npz",
        "ranker.json",
        "tables.npz",
    ]
    expected = ranker.predict(test)
    same = lf_jax.Ranker.load(directory)
    np.testing.assert_array_equal(same.predict(test), expected)
    other = lf_jax.Ranker.load(directory, mesh={"data": 2, "model": 4})
    np.testing.assert_allclose(other.predict(test), expected, atol=1e-5)
    assert other.steps_trained == 300


def test_bad_batches_are_named(trained, tmp_path):
    ranker, _, _, test = trained
    no_item = {k: v for k, v in test.items() if k != "item"}
    with pytest.raises(lf_jax.UserInputError, match=r"batch has no \['item'\]"):
        ranker.predict(no_item)
    with pytest.raises(lf_jax.UserInputError, match=r"'dense' must be \[B, 2\]"):
        ranker.predict({**test, "dense": test["dense"][:, :1]})
    with pytest.raises(lf_jax.UserInputError, match="batch 1 holds 2001 examples"):
        ranker.fit([test], steps=1)
    one = {k: v[:BATCH] for k, v in test.items() if k != "labels"}
    one["labels"] = {"click": test["labels"]["click"][:BATCH]}
    before = ranker.predict(test)
    with pytest.raises(lf_jax.UserInputError, match="ran out after 1 steps of 2"):
        ranker.fit(iter([one]), steps=2)
    assert ranker.steps_trained == 301  # the step before the error is kept, state intact
    assert np.abs(ranker.predict(test) - before).max() > 0
    with pytest.raises(lf_jax.UserInputError, match="holds no batch"):
        ranker.fit([], steps=1)
    with pytest.raises(lf_jax.UserInputError, match="not a saved Ranker"):
        lf_jax.Ranker.load(tmp_path)
    with pytest.raises(lf_jax.UserInputError, match="multiple of the 8 devices"):
        lf_jax.Ranker([], [], num_dense=1, tasks=("t",), batch_size=12)


def test_public_api_names_resolve_and_notebooks_get_progress(monkeypatch):
    assert {"Ranker", "TableSpec", "FeatureSpec", "make_mesh", "load_config"} <= set(lf_jax.__all__)
    for name in lf_jax.__all__:
        assert getattr(lf_jax, name) is not None, name
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not progress_enabled()
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # inside a Jupyter kernel
    assert progress_enabled()
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled()
