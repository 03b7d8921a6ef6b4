"""VectorIndex: build, tune, search, Matryoshka dims, upsert/delete, atomic save, errors."""

import json
import os

import numpy as np
import pytest

from lf_jax.errors import UserInputError
from lf_jax.export import index_files, index_inputs
from lf_jax.export.index_inputs import VectorIndexError
from lf_jax.export.scann_index import VectorIndex
from lf_jax.export.scann_tuning import exact_search, recall_at_k


def clustered(n: int, dims: int, *, centres: int = 200, spread: float = 0.5, seed: int = 0):
    """A Gaussian mixture: [n, dims] float32 around ``centres`` random centres."""
    rng = np.random.default_rng(seed)
    centre_vectors = rng.normal(size=(centres, dims)).astype(np.float32)
    labels = rng.integers(0, centres, n)
    return (centre_vectors[labels] + spread * rng.normal(size=(n, dims))).astype(np.float32)


def queries_like(corpus: np.ndarray, n: int, *, noise: float = 0.3, seed: int = 1):
    """Held-out queries: corpus points plus noise (not themselves in the corpus)."""
    rng = np.random.default_rng(seed)
    picks = corpus[rng.integers(0, corpus.shape[0], n)]
    return (picks + noise * rng.normal(size=picks.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus_20k():
    """The 20k x 32 clustered corpus (200 centres) with string ids."""
    vectors = clustered(20_000, 32)
    return vectors, np.array([f"urn:li:item:{i}" for i in range(vectors.shape[0])])


@pytest.fixture(scope="module")
def tuned_index(corpus_20k):
    vectors, ids = corpus_20k
    tune_queries = queries_like(vectors, 1000, seed=11)
    return VectorIndex.build(
        vectors,
        ids,
        metric="dot_product",
        target_recall=0.95,
        tune_queries=tune_queries,
        model="two_tower_demo",
        checkpoint_step=1200,
    )


def _exact_ids(index_vectors, ids, queries, k, metric, dims=None):
    corpus = index_inputs.prepare_vectors(
        index_vectors, field="v", metric=metric, width=None, dims=dims
    )
    prepared = index_inputs.prepare_vectors(
        queries, field="q", metric=metric, width=None, dims=dims
    )
    rows, scores = exact_search(corpus, prepared, k, metric)
    return np.asarray(ids)[rows], scores


def test_recall_at_10_meets_target_on_held_out_queries(tuned_index, corpus_20k):
    vectors, ids = corpus_20k
    report = tuned_index.manifest["recall"]
    assert tuned_index.params.mode == "tree_ah"
    assert (
        report["target_met"] and report["recall"] >= 0.95 and report["queries"] == "given queries"
    )
    assert 1 <= tuned_index.params.leaves_to_search <= tuned_index.params.num_leaves == 141
    queries = queries_like(vectors, 1000, seed=99)  # not the tuning queries
    found, scores = tuned_index.search(queries, k=10)
    exact, _ = _exact_ids(vectors, ids, queries, 10, "dot_product")
    assert recall_at_k(found, exact) >= 0.95
    assert found.dtype.kind == "U" and found.shape == (1000, 10) and scores.shape == (1000, 10)
    assert str(found[0, 0]).startswith("urn:li:item:")
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first: highest dot product


def test_save_load_round_trip_gives_same_results(tuned_index, corpus_20k, tmp_path):
    queries = queries_like(corpus_20k[0], 200, seed=5)
    before_ids, before_scores = tuned_index.search(queries, k=10)
    path = tuned_index.save(tmp_path / "index")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"] == "two_tower_demo" and manifest["checkpoint_step"] == 1200
    assert (
        manifest["count"] == 20_000
        and manifest["dims"] == 32
        and manifest["metric"] == "dot_product"
    )
    assert manifest["params"]["leaves_to_search"] == tuned_index.params.leaves_to_search
    assert manifest["params"]["dims_per_block"] == 2
    assert manifest["params"]["anisotropic_quantization_threshold"] == 0.2
    assert manifest["recall"]["recall"] >= 0.95 and manifest["build_seconds"] > 0
    assert "ids.npy" in manifest["files"]
    loaded = VectorIndex.load(path)
    after_ids, after_scores = loaded.search(queries, k=10)
    np.testing.assert_array_equal(after_ids, before_ids)
    np.testing.assert_allclose(after_scores, before_scores, rtol=1e-6)
    assert loaded.params == tuned_index.params and loaded.count == 20_000
    # a single query gives 1-D results
    one_ids, one_scores = loaded.search(queries[0], k=3)
    assert one_ids.shape == (3,) and one_ids[0] == before_ids[0, 0]
    # the loaded index can be tuned again (vectors come from dataset.npy)
    assert loaded.measure_recall(queries, k=10) >= 0.9


def test_small_corpus_falls_back_to_brute_force(tmp_path):
    vectors = clustered(500, 16, centres=20, seed=3)
    ids = [f"doc-{i}" for i in range(500)]
    index = VectorIndex.build(vectors, ids, metric="squared_l2")
    assert index.params.mode == "brute_force"
    assert (
        "brute force" in index.manifest["mode_reason"] and index.manifest["recall"]["recall"] == 1.0
    )
    queries = queries_like(vectors, 50)
    found, scores = index.search(queries, k=5)
    exact, exact_scores = _exact_ids(vectors, ids, queries, 5, "squared_l2")
    assert recall_at_k(found, exact) == 1.0
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) >= -1e-5)  # squared distances: smallest first
    manifest = json.loads((index.save(tmp_path / "bf") / "manifest.json").read_text())
    assert manifest["params"]["mode"] == "brute_force"
    assert "brute force" in manifest["mode_reason"]


def test_unicode_ids_round_trip(tmp_path):
    ids = [
        f"urn:li:hashtag:{word}-{i}" for i, word in enumerate(["café", "東京", "𝄞", "naïve"] * 25)
    ]
    vectors = clustered(100, 8, seed=12)
    loaded = VectorIndex.load(
        VectorIndex.build(vectors, ids, metric="squared_l2").save(tmp_path / "u")
    )
    assert loaded.ids.tolist() == ids
    assert loaded.search(vectors[:4], k=1)[0][:, 0].tolist() == ids[:4]


def test_cosine_normalises_and_scores_are_cosines():
    vectors = (
        clustered(300, 8, centres=10, seed=4) * np.linspace(0.1, 10, 300, dtype=np.float32)[:, None]
    )
    ids = [f"c{i}" for i in range(300)]
    index = VectorIndex.build(vectors, ids, metric="cosine")
    found, scores = index.search(vectors[:20] * 3.0, k=1)
    np.testing.assert_array_equal(found[:, 0], ids[:20])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert vectors[0, 0] != 0 and not np.allclose(
        np.linalg.norm(vectors, axis=1), 1
    )  # input untouched


@pytest.mark.parametrize("metric", ["cosine", "dot_product"])
def test_matryoshka_dims_use_the_first_columns(metric):
    vectors = clustered(1500, 32, centres=30, seed=6)
    ids = [f"m{i}" for i in range(1500)]
    index = VectorIndex.build(vectors, ids, metric=metric, dims=8)
    assert index.dims == 8 and index.input_dim == 32 and index.manifest["dims"] == 8
    queries = queries_like(vectors, 40, seed=7)
    exact, exact_scores = _exact_ids(vectors, ids, queries, 10, metric, dims=8)
    found, scores = index.search(queries, k=10)
    assert recall_at_k(found, exact) == 1.0  # brute force: exact on the truncated vectors
    truncated_ids, _ = index.search(queries[:, :8], k=10)  # already-truncated queries work too
    np.testing.assert_array_equal(truncated_ids, found)
    full = VectorIndex.build(vectors, ids, metric=metric)
    full_found, _ = full.search(queries, k=10)
    assert recall_at_k(full_found, found) < 1.0  # dims really changed the ranking
    with pytest.raises(
        VectorIndexError,
        match=r"queries must have 32 \(or 8, already truncated\) "
        r"columns, got shape \(40, 20\)",
    ):
        index.search(queries[:, :20], k=10)


def test_tree_index_with_dims_tunes_to_target(corpus_20k):
    vectors, ids = corpus_20k
    index = VectorIndex.build(
        vectors[:6000],
        ids[:6000],
        metric="cosine",
        dims=16,
        tune_queries=queries_like(vectors[:6000], 500, seed=2),
    )
    assert index.params.mode == "tree_ah" and index.manifest["recall"]["recall"] >= 0.95
    queries = queries_like(vectors[:6000], 500, seed=3)
    exact, _ = _exact_ids(vectors[:6000], ids[:6000], queries, 10, "cosine", dims=16)
    assert recall_at_k(index.search(queries, k=10)[0], exact) >= 0.93


@pytest.mark.parametrize("size", [600, 5000])  # brute force and tree + AH
def test_upsert_and_delete_without_rebuild(size, tmp_path):
    everything = clustered(size + 25, 16, centres=40, seed=8)
    vectors, new_vectors, replaced = everything[:size], everything[size:-5], everything[-5:]
    ids = [f"item:{i}" for i in range(size)]
    index = VectorIndex.build(vectors, ids, metric="squared_l2", target_recall=0.95)
    result = index.upsert(
        [f"new:{i}" for i in range(20)] + ids[:5], np.concatenate([new_vectors, replaced])
    )
    assert result == {"added": 20, "replaced": 5} and index.count == size + 20
    found, _ = index.search(np.concatenate([new_vectors, replaced]), k=1)  # each is its own nearest
    np.testing.assert_array_equal(found[:, 0], [f"new:{i}" for i in range(20)] + ids[:5])
    gone = ids[5:15] + ["new:3", f"item:{size - 1}"]  # the last rows too: the swap must hold
    assert index.delete(gone) == 12 and index.count == size + 8
    assert index.delete(["item:5", "never"], missing_ok=True) == 0
    with pytest.raises(VectorIndexError, match="'never'"):
        index.delete(["never"])
    # every remaining item still maps to its own id: query with its stored vector
    current = {
        **dict(zip(ids, vectors, strict=False)),
        **dict(zip([f"new:{i}" for i in range(20)], new_vectors, strict=False)),
        **dict(zip(ids[:5], replaced, strict=False)),
    }
    for key in gone:
        current.pop(key)
    keys = sorted(current)
    assert sorted(index.ids.tolist()) == keys
    matrix = np.stack([current[key] for key in keys])
    exact, _ = _exact_ids(matrix, keys, matrix[:300], 10, "squared_l2")
    found, _ = index.search(matrix[:300], k=10)
    assert not set(found.ravel()) & set(gone)
    assert recall_at_k(found, exact) >= 0.9
    assert index.measure_recall(matrix[:300], k=10) == pytest.approx(recall_at_k(found, exact))
    assert index.manifest["updates_since_recall"] == 25 + 12
    loaded = VectorIndex.load(index.save(tmp_path / "updated"))
    np.testing.assert_array_equal(loaded.search(matrix[:50], k=10)[0], found[:50])
    rebuilt = index.rebuild()
    assert rebuilt.count == index.count and rebuilt.manifest["updates_since_recall"] == 0


def test_failed_save_leaves_previous_index_intact(tuned_index, tmp_path, monkeypatch):
    small = VectorIndex.build(clustered(100, 32, seed=9), [f"s{i}" for i in range(100)])
    target = tmp_path / "index"
    small.save(target)
    queries = queries_like(clustered(100, 32, seed=9), 10)
    expected = small.search(queries, k=3)[0]

    original_write = VectorIndex._write

    def failing_write(self, directory):
        original_write(self, directory)
        (directory / "ids.npy").write_bytes(b"half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VectorIndex, "_write", failing_write)
    with pytest.raises(VectorIndexError, match="No space left on device"):
        tuned_index.save(target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temp directory left behind
    np.testing.assert_array_equal(VectorIndex.load(target).search(queries, k=3)[0], expected)
    tuned_index.save(target)  # a successful save replaces it
    assert VectorIndex.load(target).count == 20_000
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_replace_directory_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(index_files, "exchange_paths", lambda a, b: False)
    index = VectorIndex.build(clustered(50, 4, seed=1), [f"x{i}" for i in range(50)])
    index.save(tmp_path / "i")
    index.save(tmp_path / "i")
    assert sorted(os.listdir(tmp_path)) == ["i"] and VectorIndex.load(tmp_path / "i").count == 50


def _build_small(**kwargs):
    args = dict(vectors=clustered(30, 4, seed=2), ids=[f"x{i}" for i in range(30)])
    args.update(kwargs)
    return VectorIndex.build(args.pop("vectors"), args.pop("ids"), **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vectors=np.zeros((0, 4), np.float32), ids=[]), "corpus is empty"),
        (
            dict(ids=["a", "b", "c", "b", "a"] + [f"x{i}" for i in range(25)]),
            r"'b' appears at positions 1 and 3",
        ),
        (dict(vectors=np.zeros(4, np.float32), ids=["a"]), r"2-D \[N, D\], got shape \(4,\)"),
        (dict(ids=["a", "b"]), "got 2 ids for 30 vectors"),
        (dict(ids=np.arange(30)), "ids must be str, got an array of int64"),
        (dict(ids=list(range(30))), "ids must be str, got int 0 at position 0"),
        (dict(ids=["a"] * 29 + [3]), "ids must be str, got int 3 at position 29"),
        (
            dict(ids=[f"x{i}" for i in range(29)] + [""]),
            "ids must be non-empty strings, got '' at position 29",
        ),
        (dict(metric="hamming"), "metric must be one of"),
        (dict(dims=5), "dims=5 is more than the vectors' 4 columns"),
        (dict(dims=0), "dims must be a positive int, got 0"),
        (dict(num_neighbors=31), "num_neighbors=31 is more than the 30 vectors"),
        (dict(target_recall=1.5), r"target_recall must be a number in \(0, 1\], got 1.5"),
        (dict(vectors=np.array([["a"] * 4] * 30)), "must be a float array"),
    ],
)
def test_build_errors_name_field_and_value(kwargs, message):
    with pytest.raises(VectorIndexError, match=message) as info:
        _build_small(**kwargs)
    assert isinstance(info.value, UserInputError)


def test_nan_and_zero_vectors_are_named():
    vectors = clustered(30, 4, seed=2)
    vectors[7, 2] = np.nan
    with pytest.raises(VectorIndexError, match=r"row 7 \(id 'x7'\) holds NaN"):
        _build_small(vectors=vectors)
    vectors = clustered(30, 4, seed=2)
    vectors[3] = 0
    with pytest.raises(VectorIndexError, match=r"row 3 \(id 'x3'\) is all zeros"):
        _build_small(vectors=vectors, metric="cosine")


def test_search_errors():
    index = _build_small()
    with pytest.raises(VectorIndexError, match="k=31 is more than the 30 items"):
        index.search(np.zeros((1, 4), np.float32), k=31)
    with pytest.raises(VectorIndexError, match=r"queries must have 4 columns, got shape \(2, 3\)"):
        index.search(np.zeros((2, 3), np.float32), k=1)
    with pytest.raises(VectorIndexError, match="queries: row 1 holds NaN"):
        index.search(np.array([[0, 0, 0, 1], [np.nan, 0, 0, 0]], np.float32), k=1)
    with pytest.raises(VectorIndexError, match="k must be a positive int, got 0"):
        index.search(np.zeros((1, 4), np.float32), k=0)
    with pytest.raises(VectorIndexError, match=r"vectors must have 4 columns"):
        index.upsert(["y"], np.zeros((1, 5), np.float32))


def test_load_errors_for_missing_and_corrupt_directories(tmp_path):
    with pytest.raises(VectorIndexError, match="is not a directory"):
        VectorIndex.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VectorIndexError, match="has no manifest.json"):
        VectorIndex.load(tmp_path / "empty")
    index = VectorIndex.build(
        clustered(3000, 8, seed=3), [f"x{i}" for i in range(3000)], tune=False
    )
    path = index.save(tmp_path / "index")
    hashed = path / "hashed_dataset.npy"
    data = bytearray(hashed.read_bytes())
    data[-1] ^= 0xFF
    hashed.write_bytes(bytes(data))
    with pytest.raises(VectorIndexError, match="hashed_dataset.npy' does not match its checksum"):
        VectorIndex.load(path)
    data[-1] ^= 0xFF
    hashed.write_bytes(bytes(data))
    VectorIndex.load(path)  # restored: loads again
    (path / "ids.npy").unlink()
    with pytest.raises(VectorIndexError, match="ids.npy' is missing"):
        VectorIndex.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(VectorIndexError, match="is not readable JSON"):
        VectorIndex.load(path)
    (path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(VectorIndexError, match="is not a lf_jax.VectorIndex manifest"):
        VectorIndex.load(path)


def test_save_errors_for_unwritable_output(tmp_path):
    index = _build_small()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VectorIndexError, match="cannot write under"):
        index.save(blocker / "index")
    with pytest.raises(VectorIndexError, match="exists and is not a directory"):
        index.save(blocker)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("meow")
    with pytest.raises(VectorIndexError, match="non-empty directory without manifest.json"):
        index.save(other)
    assert (other / "cat.jpg").read_text() == "meow"
