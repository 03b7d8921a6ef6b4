"""A feed ranker trained with dynamic member/post tables (64-bit keys in per-shard hash
tables) opens as an lf_jax.Ranker: ``predict`` equals the training-time ranker's
evaluation (``RankerScorer``: the run's mesh, keys found with ``resolve(insert=False)``)
on held-out rows, a key the tables do not hold (evicted or never admitted) reads as
padding, ``save``/``load`` keep the keys, and ``fit`` continues as the trainer's step."""

import jax
import numpy as np
import pytest

import lf_jax
from lf_jax.errors import UserInputError

ATOL = 1e-5  # the Ranker's mesh (8 on "data") vs the run's (2 x 4): float summation order


@pytest.fixture(scope="module")
def opened(dynamic_ranker_run):
    """(Ranker.from_workdir of the run, the training-time reference scorer)."""
    from lf_jax.export.corpus_sources import RankerCorpus
    from lf_jax.export.two_stage import RankerScorer

    ranker = lf_jax.Ranker.from_workdir(dynamic_ranker_run["workdir"])
    scorer = RankerScorer(RankerCorpus(dynamic_ranker_run["config"], dynamic_ranker_run["workdir"]))
    return ranker, scorer


def _holdout(scorer, examples: int, batch: int = 1024):
    from lf_jax.input.feed_pipeline import EvalReader

    reader = EvalReader(
        scorer.model.builder,
        "holdout_random",
        global_batch_size=batch,
        max_lengths=None,
        max_examples=examples,
    )
    return list(reader)


def _raw(scorer, host) -> dict:
    return {**{n: host[n] for n in scorer.collection.features}, "dense": host["dense"]}


def _keys(ranker) -> dict:
    from lf_jax.api.ranker_dynamic import dynamic_state

    view = dynamic_state(ranker)
    snap = ranker.dynamic.snapshot({"embedding": view["embedding"], "index": view["dynamic"]})
    return {name: part["keys"].tolist() for name, part in snap.items()}


def _mixed(host, ids, rows: int = 64) -> dict:
    """``rows`` holdout rows whose member, post and history actors are ids the tables
    hold, evicted and never admitted (cycling through the three kinds)."""
    batch = {k: np.array(v[:rows]) for k, v in host.items()}
    kinds = ("held", "evicted", "never")
    for name, table, period in (("member_id", "member", 3), ("post_id", "post", 2)):
        pool = [ids[table][kind] for kind in kinds]
        batch[name] = np.array(
            [pool[(i // period) % 3][i % len(pool[(i // period) % 3])] for i in range(rows)]
        )
    history = np.array(batch["history_actors"])
    history[:, :3] = np.stack([ids["member"][k][:10] for k in kinds], axis=1)[np.arange(rows) % 10]
    batch["history_actors"] = history
    return batch


def test_from_workdir_predicts_like_the_run_evaluation_on_holdout_rows(dynamic_ranker_run, opened):
    ranker, scorer = opened
    assert ranker.steps_trained == dynamic_ranker_run["step"]
    assert sorted(ranker.dynamic.specs) == ["member", "post"]
    keys = _keys(ranker)
    for name in ("member", "post"):  # every key of the checkpoint, rehashed onto (8,)
        assert keys[name] == dynamic_ranker_run["rows"][name][0].tolist()
    got, want = [], []
    for host in _holdout(scorer, 2048):
        valid = np.asarray(host["valid"])
        got.append(ranker.predict(host)[valid])
        want.append(scorer.score(_raw(scorer, host))[valid])
    got, want = np.concatenate(got), np.concatenate(want)
    assert got.shape == (2048, len(ranker.tasks))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert _keys(ranker) == keys  # predictions find keys, never insert


def test_evicted_and_never_admitted_keys_read_as_padding(dynamic_ranker_run, opened):
    ranker, scorer = opened
    ids = dynamic_ranker_run["ids"]
    host = _holdout(scorer, 1024)[0]
    batch = _mixed(host, ids)
    probs = ranker.predict(batch)
    np.testing.assert_allclose(probs, scorer.score(_raw(scorer, batch)), atol=ATOL, rtol=0)
    # an absent member or post is the same as no id at all (padding) ...
    member, post = batch["member_id"], batch["post_id"]
    absent = ~np.isin(member, ids["member"]["held"]) & ~np.isin(post, ids["post"]["held"])
    assert absent.sum() >= 10
    padded = {
        **batch,
        "member_id": np.where(absent, -1, member)[:, None],
        "post_id": np.where(absent, -1, post)[:, None],
    }
    np.testing.assert_allclose(ranker.predict(padded)[absent], probs[absent], atol=1e-6, rtol=0)
    # ... and a held one is not
    held = np.isin(member, ids["member"]["held"])
    moved = {**batch, "member_id": np.where(held, -1, member)[:, None]}
    assert np.abs(ranker.predict(moved)[held] - probs[held]).max() > 1e-4


def test_saved_dynamic_ranker_loads_on_another_mesh(opened, tmp_path):
    ranker, scorer = opened
    host = _holdout(scorer, 1024)[0]
    saved = ranker.save(tmp_path / "model")
    assert (saved / "dynamic.npz").is_file()
    other = lf_jax.Ranker.load(saved, mesh={"data": 2, "model": 4})
    assert other.steps_trained == ranker.steps_trained
    assert _keys(other) == _keys(ranker)
    np.testing.assert_allclose(other.predict(host), ranker.predict(host), atol=ATOL, rtol=0)
    (saved / "dynamic.npz").unlink()
    with pytest.raises(UserInputError, match=r"holds no dynamic.npz"):
        lf_jax.Ranker.load(saved)


def _trainer_steps(dynamic_ranker_run, scorer, batches) -> dict:
    """The reference of ``Ranker.fit(batches, steps=2)`` on the reopened run: the trainer's
    dynamic step (``make_dynamic_train_step``, as ``lf-jax train`` runs it) from the
    restored checkpoint on the run's (2, 4) mesh, with fit's fresh dense optimizer."""
    from types import SimpleNamespace

    from jax.sharding import NamedSharding, PartitionSpec

    from lf_jax.train.dynamic_step import make_dynamic_train_step
    from lf_jax.train.ranker_model import ranker_loss
    from lf_jax.train.step import dense_optimizer, init_train_state

    config, model = dynamic_ranker_run["config"], scorer.model
    tx = dense_optimizer(
        SimpleNamespace(
            steps=2,
            learning_rate=config.train.learning_rate,
            weight_decay=config.train.weight_decay,
            warmup_steps=1,
        )
    )
    state = init_train_state(scorer.state["params"], tx, scorer.state["embedding"])
    state["dynamic"] = scorer.state["dynamic"]
    step = make_dynamic_train_step(model.dynamic, model.graphdef, tx, ranker_loss, donate=False)
    rows = NamedSharding(model.mesh, PartitionSpec(None, tuple(model.mesh.axis_names)))
    for host in batches:
        labels = np.asarray(host["labels"], np.float32)
        inputs = {
            "sparse": model.preprocess({n: host[n] for n in model.collection.features}),
            "dense": model.normalize_dense(host["dense"]),
            "labels": labels,
            "weights": np.ones_like(labels),
        }
        state, _ = step(state, jax.tree.map(lambda x: jax.device_put(x[None], rows), inputs))
    return state


def test_fit_continues_a_dynamic_run_as_the_trainer_step(dynamic_ranker_run, opened, tmp_path):
    """``fit`` on a reopened run equals the trainer's dynamic step from its checkpoint
    (the same keys inserted, ``last``, ``freq`` and counters; rows and params up to
    float summation order), counters in the history; the fitted ranker saves and loads."""
    from lf_jax.api.ranker_dynamic import dynamic_state
    from lf_jax.train.checkpoint import flatten_to_dict

    _, scorer = opened
    ranker = lf_jax.Ranker.from_workdir(dynamic_ranker_run["workdir"])
    before = _keys(ranker)
    batches = _holdout(scorer, 128, batch=64)
    history = ranker.fit(batches, steps=2, log_every=1)
    assert ranker.steps_trained == dynamic_ranker_run["step"] + 2
    assert [row["step"] for row in history] == [6, 7]
    assert history[-1]["dynamic/post/inserts"] > history[0]["dynamic/post/inserts"] > 0
    after = _keys(ranker)
    seen = {int(i) for b in batches for i in np.asarray(b["post_id"])[np.asarray(b["valid"])]}
    assert seen <= set(after["post"]) and not seen <= set(before["post"])

    trainer = _trainer_steps(dynamic_ranker_run, scorer, batches)
    dyn = scorer.model.dynamic
    want = dyn.snapshot({"embedding": trainer["embedding"], "index": trainer["dynamic"]})
    view = dynamic_state(ranker)
    got = ranker.dynamic.snapshot({"embedding": view["embedding"], "index": view["dynamic"]})
    counters = [
        d.counters(v)
        for d, v in (
            (ranker.dynamic, {"embedding": view["embedding"], "index": view["dynamic"]}),
            (dyn, {"embedding": trainer["embedding"], "index": trainer["dynamic"]}),
        )
    ]
    assert counters[0] == counters[1]
    for name in ("member", "post"):
        assert got[name]["keys"].tolist() == want[name]["keys"].tolist(), name
        np.testing.assert_array_equal(got[name]["last"], want[name]["last"])
        np.testing.assert_array_equal(got[name]["freq"], want[name]["freq"])
        np.testing.assert_allclose(got[name]["rows"], want[name]["rows"], atol=1e-5, rtol=0)
    want_params = flatten_to_dict(trainer["params"])
    for key, value in flatten_to_dict(ranker.params).items():
        np.testing.assert_allclose(value, want_params[key], atol=1e-5, rtol=1e-4, err_msg=key)

    probs = ranker.predict(batches[0])
    saved = ranker.save(tmp_path / "fitted")
    np.testing.assert_allclose(
        lf_jax.Ranker.load(saved).predict(batches[0]), probs, atol=1e-6, rtol=0
    )


def test_bad_input_is_one_clear_error(dynamic_ranker_run, opened, tmp_path):
    ranker, scorer = opened
    with pytest.raises(UserInputError, match="has no config.json"):
        lf_jax.Ranker.from_workdir(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((dynamic_ranker_run["workdir"] / "config.json").read_text())
    with pytest.raises(UserInputError, match="no checkpoint"):
        lf_jax.Ranker.from_workdir(empty)
    host = _holdout(scorer, 1024)[0]
    with pytest.raises(UserInputError, match=r"'dense' must be \[B, 8\]"):
        ranker.predict({**host, "dense": host["dense"][:, :3]})
    with pytest.raises(UserInputError, match=r"feature 'member_id': keys must be ints"):
        ranker.predict({**host, "member_id": [[-5]] * len(host["dense"])})
    with pytest.raises(UserInputError, match=r"batch has no \['post_id'\]"):
        ranker.predict({k: v for k, v in host.items() if k != "post_id"})
