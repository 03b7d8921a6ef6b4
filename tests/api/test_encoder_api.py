"""lf_jax.Encoder on in-memory text pairs: the loss falls on a toy topic task, encode() of one
string matches the list form, save/load gives the same vectors on another mesh without
the pretrained package, and bad input is one error naming the field."""

import json
import shutil

import numpy as np
import pytest

import lf_jax
from lf_jax.errors import UserInputError

TOPICS = {  # 16 topics of distinct words: a batch of 16 pairs holds few same-topic pairs
    "cat": "cats kitten meow purr whiskers paws",
    "car": "engine wheels drive road fuel brakes",
    "food": "pizza pasta bread cheese soup salad",
    "music": "guitar song piano drums band chorus",
    "sea": "ocean waves beach sand boat sailor",
    "sky": "cloud rain storm thunder sun wind",
    "money": "bank cash loan price tax budget",
    "school": "teacher pupil lesson exam class homework",
    "health": "doctor nurse fever pill clinic cough",
    "sport": "football goal team match score referee",
    "garden": "flower tree seed grass soil leaf",
    "space": "planet star rocket moon orbit galaxy",
    "code": "python compiler bug function variable loop",
    "house": "door window roof kitchen wall stairs",
    "war": "soldier army battle tank sword castle",
    "farm": "cow sheep barn tractor wheat horse",
}
BATCH = 16


def sentence(rng, topic):
    return " ".join(rng.choice(TOPICS[topic].split(), 3))


def topic_pairs(rng, n, labelled=False):
    """(a, b) pairs of one topic; labelled: (a, b, 1) or (a, b of another topic, 0)."""
    rows = []
    for topic in rng.choice(sorted(TOPICS), n):
        if not labelled:
            rows.append((sentence(rng, topic), sentence(rng, topic)))
            continue
        same = bool(rng.random() < 0.5)
        other = topic if same else rng.choice([t for t in TOPICS if t != topic])
        rows.append((sentence(rng, topic), sentence(rng, other), float(same)))
    return rows


def small_encoder(**kwargs):
    return lf_jax.Encoder(
        dim=50, pretrained=None, batch_size=BATCH, learning_rate=3e-3, max_length=16, **kwargs
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    encoder = small_encoder()
    before = encoder.encode(["cats purr", "engine road"])
    history = encoder.fit(topic_pairs(rng, 960), steps=60, log_every=1)
    directory = encoder.save(tmp_path_factory.mktemp("saved") / "encoder")
    return encoder, history, before, directory


def topic_margin(encoder, rng):
    """Mean cosine of held-out same-topic pairs minus that of different-topic pairs."""
    rows = topic_pairs(rng, 200, labelled=True)
    a = encoder.encode([row[0] for row in rows])
    b = encoder.encode([row[1] for row in rows])
    cos = np.sum(a * b, axis=1)
    same = np.array([row[2] for row in rows]) == 1
    return float(cos[same].mean() - cos[~same].mean())


@pytest.mark.slow
def test_fit_on_pairs_lowers_the_loss_and_separates_topics(trained):
    encoder, history, _, _ = trained
    assert [row["step"] for row in history] == list(range(1, 61))
    losses = [row["loss"] for row in history]
    # in-batch InfoNCE over 16 pairs starts near log(16) = 2.77
    assert losses[0] > 2.3 and np.mean(losses[-10:]) < 1.0, losses
    assert topic_margin(encoder, np.random.default_rng(7)) > 0.2


@pytest.mark.slow
def test_fit_on_labelled_triples_uses_the_bce_loss_and_learns():
    rng = np.random.default_rng(1)
    encoder = small_encoder(seed=3)
    start = topic_margin(encoder, np.random.default_rng(7))
    history = encoder.fit(topic_pairs(rng, 960, labelled=True), steps=60, log_every=1)
    losses = [row["loss"] for row in history]
    assert np.mean(losses[-10:]) < np.mean(losses[:3]) - 0.1, losses
    assert topic_margin(encoder, np.random.default_rng(7)) > start + 0.2


def test_encode_one_string_matches_the_list_and_rows_are_unit(trained):
    encoder, _, before, _ = trained
    texts = ["cats purr", "a much longer text about engines, wheels and the road ahead", "x"]
    vectors_nd = encoder.encode(texts)
    assert vectors_nd.shape == (3, 50) and vectors_nd.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors_nd, axis=1), 1.0, atol=1e-5)
    one_d = encoder.encode("cats purr")
    assert one_d.shape == (50,)
    np.testing.assert_allclose(one_d, vectors_nd[0], atol=1e-5)  # padded to another length
    many = encoder.encode(texts * 30, batch_size=24)  # several chunks
    np.testing.assert_allclose(many[-3:], vectors_nd, atol=1e-5)
    assert not np.allclose(encoder.encode(["cats purr", "engine road"]), before)  # trained


def test_saved_encoder_loads_on_another_mesh_without_the_pretrained_package(trained, monkeypatch):
    encoder, _, _, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == [
        "encoder.json",
        "params.npz",
        "tokenizer",
    ]

    def no_package(name="all-MiniLM-L6-v2"):
        raise AssertionError("Encoder.load looked for the pretrained package")

    monkeypatch.setattr("lf_jax.api.encoder.sentence_encoder_dir", no_package)
    texts = ["cats purr", "pizza and soup", "drums"]
    same_mesh = lf_jax.Encoder.load(directory)
    np.testing.assert_array_equal(same_mesh.encode(texts), encoder.encode(texts))
    other = lf_jax.Encoder.load(directory, mesh={"data": 4, "model": 2})
    np.testing.assert_allclose(other.encode(texts), encoder.encode(texts), atol=1e-6)
    assert other.steps_trained == encoder.steps_trained == 60


def test_bad_input_is_one_error_naming_the_field(trained, tmp_path):
    encoder, _, _, directory = trained
    cases = [
        (lambda: encoder.encode([]), "empty list"),
        (lambda: encoder.encode(["ok", 3]), r"texts\[1\] is a int"),
        (lambda: encoder.encode(5), "must be a list of strings, got int"),
        (lambda: encoder.encode(np.array([["a", "b"]])), r"1-d .* shape \(1, 2\)"),
        (lambda: lf_jax.Encoder(dim=0, pretrained=None), "dim must be an integer >= 1"),
        (lambda: lf_jax.Encoder(pretrained=None, batch_size=12), "batch_size=12"),
        (lambda: lf_jax.Encoder(pretrained=None, bert={"layers": 2}), r"bert keys \['layers'\]"),
        (lambda: encoder.fit([], steps=3), "data is empty"),
        (lambda: encoder.fit([("a", "b")] * 20 + [("a",)], steps=3), r"data\[20\]"),
        (lambda: encoder.fit([("a", "b")] * 4, steps=3), "fewer than batch_size=16"),
        (lambda: encoder.fit(iter([{"a": ["x"] * BATCH}]), steps=1), "with 'a' and 'b'"),
        (
            lambda: encoder.fit(
                [{"a": ["x"] * BATCH, "b": ["y"] * BATCH, "label": np.ones((BATCH, 2))}], 1
            ),
            r"'label' must be \[16\] .* shape \(16, 2\)",
        ),
        (lambda: encoder.fit(iter([]), steps=1), "ran out"),
        (lambda: lf_jax.Encoder.load(tmp_path), "not a saved Encoder"),
    ]
    for call, message in cases:
        with pytest.raises(UserInputError, match=message):
            call()
    assert encoder.steps_trained == 60  # nothing above trained a step
    # a saved directory whose manifest says other dims than its weights
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    manifest = json.loads((copy / "encoder.json").read_text())
    (copy / "encoder.json").write_text(json.dumps({**manifest, "dim": 32}))
    with pytest.raises(
        UserInputError, match=r"'projection/bias' has shape \(50,\), .* expects \(32,\)"
    ):
        lf_jax.Encoder.load(copy)
