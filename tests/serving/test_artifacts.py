"""Serving artifacts: served scores equal the training-time ranker's, the member tower and
retrieval equal the model's, manifests check their files, requests stay within buckets."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from lf_jax.serving.artifact import ArtifactError, ServedModel
from lf_jax.serving.feature_store import FeatureStore
from lf_jax.serving.feed_features import FeatureLayout, pair_inputs


def test_served_ranker_scores_equal_the_training_ranker(serving_root, ranker_workdir):
    from lf_jax.export.embed_corpus import open_source
    from lf_jax.export.two_stage import RankerScorer

    root, _ = serving_root
    model = ServedModel.load(root / "versions" / "v0001" / "ranker")
    store = FeatureStore.open(root / "features")
    _, post_nw = store.read([], model.post_keys())
    posts_nc = model.post_cache(post_nw)
    assert posts_nc.shape == (1000, model.manifest["post_cache"]["width"])
    assert model.warm_up(posts_nc) > 0 and model.compiles == 3  # 2 buckets, the post cache
    rng = np.random.default_rng(0)
    members = ["m3", "m42"]
    posts = [[f"p{i}" for i in rng.choice(1000, 64, replace=False)] for _ in members]
    member_qw, post_rows = store.read(members, posts[0] + posts[1])
    post_qkw = post_rows.reshape(2, 64, -1)
    member_q = model.rows("member", members)[0]
    post_qk = model.rows("post", posts[0] + posts[1])[0].reshape(2, 64)
    assert member_q.tolist() == [3, 42] and post_qk[0, 0] == int(posts[0][0][1:])
    fn, shape = model.bucket(2, 64)
    assert shape == (2, 64)
    served = np.asarray(fn(model.weights, posts_nc, member_qw, member_q, post_qk))

    layout = FeatureLayout.from_json(model.manifest["layout"])
    sparse, dense = pair_inputs(np, layout, member_qw, post_qkw, member_q, post_qk)
    config, workdir = ranker_workdir
    source = open_source(config, workdir)
    expected = RankerScorer(source).score({**sparse, "dense": dense}).reshape(2, 64, -1)
    source.close()
    assert served.shape == (2, 64, 4)
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert model.cache_size() == model.compiles  # the call above hit a compiled bucket
    store.close()


def test_post_cache_follows_feature_store_updates(serving_root, tmp_path):
    import subprocess
    import sys

    from lf_jax.serving.service import Version

    root, _ = serving_root
    shutil.copytree(root / "features", tmp_path / "features")
    store = FeatureStore.open(tmp_path / "features")
    version = Version(root / "versions" / "v0001", jax.local_devices(backend="cpu")[0], store)
    before = np.asarray(version.post_cache)
    assert not version.refresh_post_cache(store)  # nothing changed
    start, _ = store.layout.post_columns()["prior_likes"]
    _, row = store.read([], ["p7"])
    row[0, start] += 50.0
    np.save(tmp_path / "row.npy", row)
    writer = (
        "import sys, numpy as np; from lf_jax.export.kv_store import KVStore\n"
        "with KVStore(sys.argv[1]) as kv:\n"
        "    kv.update(['p7'], np.load(sys.argv[2]), 'near-line', tolerance=0.0)"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            writer,
            str(tmp_path / "features" / "kv"),
            str(tmp_path / "row.npy"),
        ],
        check=True,
    )
    assert version.refresh_post_cache(store)
    after = np.asarray(version.post_cache)
    changed = np.flatnonzero(np.any(after != before, axis=1))
    assert changed.tolist() == [7]  # only p7's row (its prior likes) changed
    store.close()


def test_manifest_lists_checksums_bytes_and_the_int8_auc_cost(serving_root, tmp_path):
    root, result = serving_root
    manifest = result["manifests"]["ranker"]
    directory = root / "versions" / "v0001" / "ranker"
    assert manifest["bytes"] == sum(f["bytes"] for f in manifest["files"].values()) > 0
    assert set(manifest["functions"]) == {"q1_k64", "q2_k64"}
    assert manifest["table_dtype"] == "float32" and manifest["version"] == "v0001"
    aucs = manifest["quality"]["holdout_random_auc"]
    assert abs(aucs["float32"]["mean"] - aucs["int8"]["mean"]) < 0.01
    assert manifest["quality"]["holdout_random_examples"] == 20_000  # data.eval_examples
    assert json.loads((directory / "manifest.json").read_text())["files"] == manifest["files"]
    broken = tmp_path / "ranker"
    shutil.copytree(directory, broken)
    weights = broken / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.npz does not match its sha256"):
        ServedModel.load(broken)
    (broken / "functions" / "q1_k64.jax").unlink()
    with pytest.raises(ArtifactError, match="functions/q1_k64.jax is missing"):
        ServedModel.load(broken, verify=False)


def test_requests_beyond_the_buckets_are_refused(serving_root):
    root, _ = serving_root
    model = ServedModel.load(root / "versions" / "v0001" / "ranker")
    assert model.bucket(1, 10)[1] == (1, 64)
    with pytest.raises(ArtifactError, match=r"3 queries x 10 candidates exceed .* \(2 x 64\)"):
        model.bucket(3, 10)


def test_feature_store_update_rewrites_only_changed_rows(serving_root, export_version):
    root, first = serving_root
    assert first["features"] == {"written": 1300, "unchanged": 0, "new": 1300}
    store = FeatureStore.open(root / "features")
    assert store.stats()["count"] == 1300 and store.layout.prompt_length == 0
    with pytest.raises(Exception, match="'m300'"):
        store.read(["m300"], [])


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_retrieval_artifact_equals_the_member_tower_and_exact_search(tmp_path, dtype):
    from lf_jax.models.causal_lm import LlamaConfig
    from lf_jax.models.dual_encoder import DualEncoder
    from lf_jax.serving.export import retrieval_artifact
    from lf_jax.serving.functions import top_k_rows

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        max_position_embeddings=8,
    )
    graphdef, params = nnx.split(DualEncoder(cfg, rngs=nnx.Rngs(0)))
    layout = FeatureLayout(latent_dim=2, max_history=3, max_post_hashtags=2, prompt_length=8)
    rng = np.random.default_rng(1)
    items = rng.normal(size=(200, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    retrieval_artifact(
        tmp_path / "retrieval",
        graphdef=graphdef,
        params=params,
        items=items,
        item_keys=[f"p{i}" for i in range(200)],
        num_members=5,
        layout=layout,
        pad_id=0,
        dtype=dtype,
        version="t",
        queries=(2,),
        candidates=(50, 500),
    )
    model = ServedModel.load(tmp_path / "retrieval")
    assert sorted(model.buckets) == [(2, 50), (2, 200)]  # K cut to the 200 items
    lengths = np.array([3, 8])
    ids = rng.integers(1, 64, (2, 8)).astype(np.int32)
    mask = (np.arange(8) < lengths[:, None]).astype(np.int32)
    member_qw = np.zeros((2, layout.width), np.float32)
    start, stop = layout.member_columns()["prompt"]
    member_qw[:, start:stop] = np.where(mask > 0, ids, -1)
    fn, _ = model.bucket(2, 50)
    scores_qn = np.asarray(fn(model.weights, member_qw))
    assert scores_qn.shape == (2, 200)  # every item; the server takes the top K
    scores, rows = top_k_rows(scores_qn, 50)
    query = np.array(nnx.merge(graphdef, params).embed(np.where(mask > 0, ids, 0), mask))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    expected = query @ items.T
    top = np.argsort(-expected, axis=1)[:, :50]
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(scores, np.take_along_axis(expected, top, 1), atol=tol)
    if dtype == "float32":
        assert rows.tolist() == top.tolist()
    assert model.keys["item"][rows[0, 0]] == f"p{rows[0, 0]}"
