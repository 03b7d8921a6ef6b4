"""Two-stage serving: ScaNN retrieval of K candidates, feed-ranker scoring, top N with per-task
scores."""

import numpy as np
import pytest

from lf_jax.export import VectorIndex
from lf_jax.export.embed_corpus import open_source
from lf_jax.export.two_stage import (
    FeedWorldFeatures,
    RankerScorer,
    ServingError,
    TwoStageService,
    parse_ids,
)

NUM_POSTS, DIM, K = 1_000, 8, 500  # feed_logs/tiny has 1,000 posts and 300 members


@pytest.fixture(scope="module")
def service(ranker_workdir):
    """A ranker restored from a checkpoint of its initial state; an index of random post vectors;
    a stand-in member tower (test double: fixed random query vectors per member)."""
    config, workdir = ranker_workdir
    source = open_source(config, workdir)
    rng = np.random.default_rng(0)
    index = VectorIndex.build(
        rng.normal(size=(NUM_POSTS, DIM)).astype(np.float32),
        [f"p{i}" for i in range(NUM_POSTS)],
        metric="dot_product",
        tune=False,
        brute_force_below=1,
    )  # a tree even for 1,000 posts
    member_vectors = rng.normal(size=(300, DIM)).astype(np.float32)

    def encoder(ids):
        return member_vectors[parse_ids(ids, "m", 300, "member_ids")]

    yield TwoStageService(
        encoder,
        index,
        RankerScorer(source),
        FeedWorldFeatures("tiny"),
        num_candidates=K,
        top_n=10,
        task_weights={"like": 1.0, "share": 2.0},
    )
    source.close()


def test_serves_the_ranker_top_n_of_the_retrieved_candidates(service):
    results = service.serve(["m3", "m42"])
    assert [r.member_id for r in results] == ["m3", "m42"]
    for q, result in enumerate(results):
        assert result.num_candidates == K and len(result.post_ids) == 10
        assert set(result.task_probs) == {"like", "comment", "share", "long_dwell"}
        expected = result.task_probs["like"] + 2.0 * result.task_probs["share"]
        np.testing.assert_allclose(result.score, expected, rtol=1e-5)
        assert np.all(np.diff(result.score) <= 0)
        # the scores are the ranker's on those pairs, and no other candidate scores higher
        rows = slice(q * K, (q + 1) * K)
        batch = {name: value[rows] for name, value in service.last_batch.items()}
        all_scores = service.scorer.score(batch) @ service.weights_t
        assert all_scores.max() == pytest.approx(result.score[0], rel=1e-5)
        assert np.sort(all_scores)[-10] == pytest.approx(result.score[-1], rel=1e-5)
    exact_ids, exact_scores = service.index.search(
        service.query_encoder(["m3"]), k=K, leaves_to_search=service.index.params.num_leaves
    )
    assert set(results[0].post_ids) <= set(exact_ids[0].tolist())  # candidates come from retrieval
    assert service.timings["rank_ms"] > 0 and service.timings["retrieve_ms"] > 0


def test_batched_requests_equal_single_ones(service):
    batched = service.serve(["m5", "m6"], top_n=5)  # shapes compiled by the test above
    single = service.serve(["m6"], top_n=5)[0]
    assert batched[1].post_ids == single.post_ids
    np.testing.assert_allclose(batched[1].score, single.score, rtol=1e-5)


def test_world_features_reproduce_the_logged_catalog_features(service, feed_builder):
    rows = feed_builder.as_data_source("train").__getitems__(list(range(40)))
    features = service.features
    batch = features.batch(
        np.array([r["member_id"] for r in rows]), np.array([[r["post_id"]] for r in rows])
    )
    assert batch["actor_id"].tolist() == [r["actor_id"] for r in rows]
    assert batch["root_actor_id"].tolist() == [r["root_actor_id"] for r in rows]
    for got, row in zip(batch["post_hashtags"], rows, strict=False):
        assert got[got >= 0].tolist() == list(row["post_hashtags"])
    logged = np.array([r["dense"] for r in rows])
    catalog = [0, 1, 3, 6, 7]  # followers, root followers, member activity, prior likes, reshare
    np.testing.assert_allclose(batch["dense"][:, catalog], logged[:, catalog], rtol=1e-5)
    relevance = features.true_relevance(batch)
    assert relevance.shape == (40, 4) and np.all((relevance > 0) & (relevance < 1))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.serve(["x5"]), r"member_ids\[0\]='x5' is not a known id"),
        (lambda s: s.serve(["m1", "m1000"]), r"member_ids\[1\]='m1000' is not a known id"),
        (lambda s: s.serve([]), "must be a non-empty list"),
        (
            lambda s: s.serve(["m1"], num_candidates=1_001),
            r"num_candidates must be an int in \[1, 1000\]",
        ),
        (
            lambda s: s.serve(["m1"], num_candidates=5, top_n=6),
            r"top_n must be an int in \[1, num_candidates=5\]",
        ),
        (
            lambda s: TwoStageService(
                s.query_encoder,
                s.index,
                s.scorer,
                s.features,
                num_candidates=K,
                task_weights={"lik": 1},
            ),
            r"task_weights names unknown task\(s\) \['lik'\]",
        ),
    ],
)
def test_bad_requests_are_one_clear_error(service, call, message):
    with pytest.raises(ServingError, match=message):
        call(service)


def test_serving_and_export_import_nothing_from_data(repo_root):
    """The installed package serves on its own: no module from lf_jax/data/ gets imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import lf_jax.export.corpus_sources, lf_jax.export.two_stage as serving\n"
        "serving.FeedWorldFeatures('tiny')\n"
        f"data = {repo_root + '/lf_jax/data/'!r}\n"
        "print([n for n, m in list(sys.modules.items())"
        " if str(getattr(m, '__file__', '') or '').startswith(data)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
