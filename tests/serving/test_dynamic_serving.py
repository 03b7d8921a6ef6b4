"""`lf-jax export --serving` of a feed ranker whose member and post ids live in dynamic
tables: served scores equal the training-time ranker's (keys found as in evaluation, an
absent key read as padding), for keys held, never admitted and evicted before export."""

import numpy as np
import pytest

from lf_jax.cli import main
from lf_jax.serving.artifact import ServedModel
from lf_jax.serving.feature_store import FeatureStore
from lf_jax.serving.feed_features import FeatureLayout, pair_inputs

SIZE = "size=tiny,dynamic=0.5"
SHRINK = [
    "--config.batch_size=64",
    *(f"--config.embedding.tables.{t}.dim=16" for t in ("member", "hashtag", "post")),
    "--config.model.mlp_dims=(32,)",
    "--config.model.dcn_layers=1",
    "--config.data.eval_examples=2048",
]
BUCKETS = ["--query-buckets", "1,2", "--candidate-buckets", "64"]


def _export(repo_root, run, output, *extra):
    return main(
        [
            "export",
            "--serving",
            "--config",
            f"{repo_root}/configs/feed_ranker.py:{SIZE}",
            f"--config.data.data_dir={run['config'].data.data_dir}",
            *SHRINK,
            "--workdir",
            str(run["workdir"]),
            "--output",
            str(output),
            *BUCKETS,
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def exported(dynamic_ranker_run, repo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic_artifacts")
    assert _export(repo_root, dynamic_ranker_run, root, "--serving-dtype", "float32") == 0
    return root


def test_export_maps_the_alive_keys_and_absent_ids_to_padding(dynamic_ranker_run, exported):
    model = ServedModel.load(exported / "versions" / "v0001" / "ranker")
    summary = model.manifest["dynamic_tables"]
    assert model.manifest["source"]["checkpoint_step"] == dynamic_ranker_run["step"]
    for name, count in (("member", 300), ("post", 1000)):
        ids = dynamic_ranker_run["ids"][name]
        keys, rows = dynamic_ranker_run["rows"][name]
        key_rows = np.asarray(model.weights["key_rows"][name])
        table = np.asarray(model.weights["tables"][name]["values"])
        assert key_rows.shape == (count,)
        assert (key_rows[ids["evicted"]] == -1).all() and (key_rows[ids["never"]] == -1).all()
        served = keys < count
        np.testing.assert_array_equal(table[key_rows[ids["held"]]], rows[served])
        assert table.shape == (ids["held"].size + 1, 16) and not table[-1].any()
        assert summary[name] == {
            "ids": count,
            "capacity": {"member": 144, "post": 496}[name],
            "alive_keys": keys.size,
            "served_keys": ids["held"].size,
            "keys_beyond_ids": len(dynamic_ranker_run["beyond"][name]),
        }


def _reference(run):
    from lf_jax.export.corpus_sources import RankerCorpus
    from lf_jax.export.two_stage import RankerScorer

    return RankerScorer(RankerCorpus(run["config"], run["workdir"]))


def test_served_scores_equal_the_training_time_ranker(dynamic_ranker_run, exported):
    run, ids = dynamic_ranker_run, dynamic_ranker_run["ids"]
    model = ServedModel.load(exported / "versions" / "v0001" / "ranker")
    store = FeatureStore.open(exported / "features")
    _, post_nw = store.read([], model.post_keys())
    posts_nc = model.post_cache(post_nw)
    model.warm_up(posts_nc)
    # members: held, evicted, never admitted; posts: a mix of the three in each query
    members = [int(ids["member"][kind][0]) for kind in ("held", "evicted", "never")]
    rng = np.random.default_rng(1)
    post_ids = np.concatenate(
        [
            rng.choice(ids["post"][kind], n, replace=False)
            for kind, n in (("held", 40), ("evicted", 8), ("never", 16))
        ]
    )
    scorer = _reference(run)
    layout = FeatureLayout.from_json(model.manifest["layout"])
    fn, shape = model.bucket(1, 64)
    assert shape == (1, 64)
    for member in members:
        posts = [f"p{i}" for i in rng.permutation(post_ids)]
        member_qw, post_rows = store.read([f"m{member}"], posts)
        member_q = model.rows("member", [f"m{member}"])[0]
        post_qk = model.rows("post", posts)[0].reshape(1, 64)
        served = np.asarray(fn(model.weights, posts_nc, member_qw, member_q, post_qk))
        sparse, dense = pair_inputs(
            np, layout, member_qw, post_rows.reshape(1, 64, -1), member_q, post_qk
        )
        expected = scorer.score({**sparse, "dense": dense}).reshape(1, 64, -1)
        np.testing.assert_allclose(served, expected, atol=2e-6, rtol=0)
    # the history of a member names evicted and never-admitted actors too (padding)
    hist = layout.member_columns()["history_actors"]
    histories = store.read([f"m{m}" for m in members], [])[0][:, hist[0] : hist[1]]
    actors = histories[histories >= 0].astype(int)
    assert np.isin(actors, ids["member"]["never"]).any()
    store.close()


def test_holdout_scores_and_auc_equal_the_training_time_ranker(dynamic_ranker_run, exported):
    """The export's holdout path (functions.ranker_probs on the artifact's weights, logged
    history, ids through key_rows) equals evaluation's lookup on the same rows."""
    import jax

    from lf_jax.input.feed_pipeline import EvalReader
    from lf_jax.serving.dynamic_tables import host_ids
    from lf_jax.serving.functions import ranker_probs
    from lf_jax.train.metrics import auc

    model = ServedModel.load(exported / "versions" / "v0001" / "ranker")
    scorer = _reference(dynamic_ranker_run)
    ranker = scorer.model
    features = {n: tuple(v) for n, v in model.manifest["features"].items()}
    treedef = jax.tree.structure(jax.device_get(scorer.state["params"]))
    fn = jax.jit(lambda w, s, d: ranker_probs(ranker.graphdef, treedef, features, w, s, d))
    weights = {k: v for k, v in model.weights.items() if k != "x0_kernels"}
    reader = EvalReader(
        ranker.builder,
        "holdout_random",
        global_batch_size=1024,
        max_lengths=None,
        max_examples=2048,
    )
    probs, expected, labels = [], [], []
    for host in reader:
        raw = {n: host[n] for n in ranker.collection.features}
        valid = np.asarray(host["valid"])
        probs.append(np.asarray(fn(weights, host_ids(ranker, raw), host["dense"]))[valid])
        expected.append(scorer.score({**raw, "dense": host["dense"]})[valid])
        labels.append(np.asarray(host["labels"])[valid])
    probs, expected, y = np.concatenate(probs), np.concatenate(expected), np.concatenate(labels)
    assert probs.shape[0] == 2048
    np.testing.assert_allclose(probs, expected, atol=2e-6, rtol=0)
    quality = model.manifest["quality"]
    assert quality["holdout_random_examples"] == 2048
    aucs = quality["holdout_random_auc"]["float32"]
    assert abs(aucs["mean"] - quality["holdout_random_auc"]["int8"]["mean"]) < 0.01
    for i, task in enumerate(model.manifest["tasks"]):
        assert aucs[task] == pytest.approx(auc(expected[:, i], y[:, i]), abs=1e-6)


def test_a_dynamic_table_without_counted_ids_is_refused_before_device_work():
    """Only ids the dataset counts map to rows: any other dynamic table is one error
    naming it (``lf-jax export --serving`` checks the config before any device work)."""
    from lf_jax.errors import UserInputError
    from lf_jax.serving.dynamic_tables import check_servable

    check_servable(["member", "post", "hashtag"])
    with pytest.raises(UserInputError, match=r"tables.author_cluster.dynamic: --serving maps"):
        check_servable(["member", "author_cluster"])


def test_server_ranks_members_and_posts_the_tables_do_not_hold(dynamic_ranker_run, exported):
    """`lf-jax serve`'s service over the dynamic artifact: a member evicted before export
    and posts held, evicted and never admitted are known ids (the store has their rows)
    and are scored as the training-time ranker scores them."""
    import http.client
    import json

    from lf_jax.serving.server import serve_in_thread
    from lf_jax.serving.service import Service

    ids = dynamic_ranker_run["ids"]
    member = f"m{ids['member']['evicted'][0]}"
    posts = [f"p{ids['post'][kind][i]}" for kind in ("held", "evicted", "never") for i in (0, 1)]
    service = Service(exported)
    port, stop = serve_in_thread(service, poll_s=0.2)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/rank", body=json.dumps({"member_id": member, "post_ids": posts}))
        response = conn.getresponse()
        out = json.loads(response.read())
        conn.close()
    finally:
        stop()
        service.close()
    assert response.status == 200, out
    model = ServedModel.load(exported / "versions" / "v0001" / "ranker")
    store = FeatureStore.open(exported / "features")
    order = [posts.index(p) for p in out["post_ids"]]
    member_qw, post_rows = store.read([member], [posts[i] for i in order])
    store.close()
    member_q = model.rows("member", [member])[0]
    post_qk = model.rows("post", [posts[i] for i in order])[0].reshape(1, -1)
    layout = FeatureLayout.from_json(model.manifest["layout"])
    sparse, dense = pair_inputs(
        np, layout, member_qw, post_rows.reshape(1, len(posts), -1), member_q, post_qk
    )
    expected = _reference(dynamic_ranker_run).score({**sparse, "dense": dense})
    served = np.array([out["task_probs"][t] for t in model.manifest["tasks"]]).T
    np.testing.assert_allclose(served, expected, atol=2e-6, rtol=0)
