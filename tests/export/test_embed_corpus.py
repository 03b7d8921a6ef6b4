"""Corpus export: ranker checkpoint -> vectors + ids + manifest (+ ScaNN index, KV store)."""

import jax
import numpy as np
import pytest

from lf_jax.cli import main
from lf_jax.export.embed_corpus import (
    ExportError,
    export_corpus,
    find_checkpoint,
    load_export,
    open_source,
)
from lf_jax.train.checkpoint import Checkpointer, CheckpointMismatchError
from lf_jax.train.step import dense_optimizer

STEP = 7


def export_ranker_config(shrunk_ranker_config):
    config = shrunk_ranker_config()
    with config.unlocked():
        config.train.ips = False
        # a hand plan that really shards: the export reads the rows back through the mesh
        config.embedding.plan = {
            "post": {"strategy": "row_wise", "axes": ("data", "model")},
            "member": {"strategy": "column_wise", "num_shards": 4},
        }
    return config


@pytest.fixture(scope="module")
def ranker_run(shrunk_ranker_config, feed_builder, tmp_path_factory):
    """A ranker workdir whose checkpoint (step 7) holds known random member/post tables."""
    from lf_jax.train.loop import build_task

    workdir = tmp_path_factory.mktemp("ranker_run")
    config = export_ranker_config(shrunk_ranker_config)
    task = build_task(config, workdir)
    state = task.init_state()
    rng = np.random.default_rng(0)
    tables = {
        name: rng.normal(size=(spec.vocab_size, spec.dim)).astype(np.float32)
        for name, spec in task.collection.tables.items()
    }
    state["embedding"] = task.collection.state_from_logical(tables, step=STEP)
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(STEP, state, task.collection, {})
    checkpointer.close()
    before = sorted(path.name for path in workdir.iterdir())
    source = open_source(config, workdir)
    assert sorted(path.name for path in workdir.iterdir()) == before  # export writes nothing
    yield {"config": config, "workdir": workdir, "tables": tables, "source": source}
    source.close()


def test_export_round_trip_with_index_and_kv(ranker_run, tmp_path):
    source, tables = ranker_run["source"], ranker_run["tables"]
    result = export_corpus(
        source,
        "posts",
        tmp_path / "posts",
        batch_size=500,
        metric="cosine",
        build_index=True,
        build_kv=True,
    )
    ids, vectors, manifest = load_export(tmp_path / "posts")
    num_posts = 1_000
    assert ids.tolist() == [f"p{i}" for i in range(num_posts)]
    np.testing.assert_array_equal(vectors, tables["post"][:num_posts])  # row-sharded lookup, exact
    assert manifest == result.manifest
    assert (manifest["model"], manifest["entity"], manifest["checkpoint_step"]) == (
        "feed_ranker",
        "posts",
        STEP,
    )
    assert (manifest["count"], manifest["dims"], manifest["metric"]) == (num_posts, 16, "cosine")
    assert manifest["index"]["recall"] >= 0.95 and manifest["kv"]["version"] == "feed_ranker-step7"

    from lf_jax.export import KVStore, VectorIndex

    index = VectorIndex.load(tmp_path / "posts" / "index")
    found, scores = index.search(vectors[[17, 923]], k=5)
    assert found[:, 0].tolist() == ["p17", "p923"] and np.allclose(scores[:, 0], 1.0, atol=1e-3)
    with KVStore(tmp_path / "posts" / "kv", readonly=True) as store:
        got = store.get(["p17"])[0]
        assert len(store) == num_posts
    assert np.dot(got, vectors[17]) / np.linalg.norm(got) / np.linalg.norm(vectors[17]) > 0.999


def test_members_through_column_wise_table_and_matryoshka_dims(ranker_run, tmp_path):
    result = export_corpus(ranker_run["source"], "members", tmp_path / "members", dims=8)
    ids, vectors, manifest = load_export(result.directory)
    assert ids[:2].tolist() == ["m0", "m1"] and (manifest["dims"], manifest["model_dims"]) == (
        8,
        16,
    )
    np.testing.assert_array_equal(vectors, ranker_run["tables"]["member"][:300, :8])
    with pytest.raises(ExportError, match="dims=17 is more than the model's 16-dim"):
        export_corpus(ranker_run["source"], "members", tmp_path / "m2", dims=17)
    with pytest.raises(ExportError, match="entity 'items' is not one of feed_ranker's"):
        export_corpus(ranker_run["source"], "items", tmp_path / "m3")


def test_failed_export_leaves_the_previous_one_intact(ranker_run, tmp_path, monkeypatch):
    target = tmp_path / "posts"
    export_corpus(ranker_run["source"], "posts", target, build_kv=True)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    from lf_jax.export import kv_store

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kv_store.KVStore, "put", disk_full)
    with pytest.raises(
        ExportError, match="No space left on device; any previous export there is unchanged"
    ):
        export_corpus(ranker_run["source"], "posts", target, dims=4, build_kv=True)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["posts"]  # no temporary left over
    assert load_export(target)[2]["dims"] == 16


def test_output_checks_come_before_any_embedding(ranker_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is not writable"):
        export_corpus(ranker_run["source"], "posts", blocker / "sub")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="non-empty directory without manifest.json"):
        export_corpus(ranker_run["source"], "posts", tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"


class FakeSource:
    family, step, checkpoint_dir, metric = "fake", 3, "/nowhere", "dot_product"

    def __init__(self, ids, vectors):
        self.ids, self.vectors = ids, np.asarray(vectors, np.float32)

    def entities(self):
        return ("items",)

    def dims(self, entity):
        return 4

    def corpus(self, entity):
        return self.ids, np.arange(len(self.ids))

    def embed(self, entity, records):
        return self.vectors[records]

    def dynamic_table(self, entity):
        return None


@pytest.mark.parametrize(
    "ids, vectors, message",
    [
        ([], np.zeros((0, 4)), "corpus 'items' is empty"),
        (["a", "b", "a"], np.ones((3, 4)), "duplicate id 'a' at rows 0 and 2"),
        (["a", "b"], np.ones((2, 3)), r"returned shape \(2, 3\) for 2 records; expected \(2, 4\)"),
        (
            ["a", "b"],
            [[1, 1, 1, 1], [1, np.nan, 1, 1]],
            "the vector of id 'b' \\(row 1\\) is not finite",
        ),
    ],
)
def test_bad_corpora_are_one_clear_error(tmp_path, ids, vectors, message):
    with pytest.raises(ExportError, match=message):
        export_corpus(FakeSource(ids, vectors), "items", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_mismatched_checkpoints(ranker_run, tmp_path):
    with pytest.raises(ExportError, match="no checkpoint: .* does not exist"):
        find_checkpoint(tmp_path, None)
    with pytest.raises(ExportError, match=r"checkpoint step 3 not found .* \(steps: \[7\]\)"):
        find_checkpoint(ranker_run["workdir"], 3)
    source = ranker_run["source"]
    config = ranker_run["config"]
    template = source.model.init_state(dense_optimizer(config.train), config.seed)
    template["step"] = jax.numpy.zeros((2,), jax.numpy.int32)  # the config's model differs
    checkpointer = Checkpointer(ranker_run["workdir"] / "checkpoints")
    try:
        with pytest.raises(
            CheckpointMismatchError, match=r"'step' has shape \(\) in the checkpoint but \(2,\)"
        ):
            checkpointer.check_matches(STEP, template, source.collection)
    finally:
        checkpointer.close()


def test_cli_export_and_its_errors(ranker_run, repo_root, tmp_path, capsys):
    workdir, data_dir = ranker_run["workdir"], ranker_run["config"].data.data_dir
    base = [
        "export",
        "--config",
        f"{repo_root}/configs/feed_ranker.py:size=tiny",
        f"--config.data.data_dir={data_dir}",
        "--config.batch_size=64",
        *(f"--config.embedding.tables.{t}.dim=16" for t in ("member", "hashtag", "post")),
    ]
    assert (
        main(
            [
                *base,
                "--workdir",
                str(tmp_path / "none"),
                "--entity",
                "posts",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "no checkpoint" in capsys.readouterr().err
    # the default tiny model (mlp 256-128, 2 cross layers) is not the checkpoint's
    assert (
        main(
            [
                *base,
                "--workdir",
                str(workdir),
                "--entity",
                "posts",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "the config describes a different model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert (
        main(
            [
                *base,
                "--config.model.mlp_dims=(32,)",
                "--config.model.dcn_layers=1",
                "--workdir",
                str(workdir),
                "--entity",
                "members",
                "--output",
                str(tmp_path / "out"),
                "--kv",
                "--dims",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "exported 300 members x 4 dims (feed_ranker, checkpoint step 7" in out and "kv/" in out
    np.testing.assert_array_equal(
        load_export(tmp_path / "out")[1], ranker_run["tables"]["member"][:300, :4]
    )
