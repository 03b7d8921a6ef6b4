"""`lf-jax export` of a feed ranker whose post ids live in a dynamic table: the live keys'
rows (ids "p<key>"), then `--delta` brings the export (vectors, ids, kv/, index/) to a
newer checkpoint, equal to a full export there."""

import numpy as np
import pytest

from lf_jax.cli import main
from lf_jax.embedding.dynamic.checkpoint import from_checkpoint, to_checkpoint
from lf_jax.export.embed_corpus import load_export
from lf_jax.export.kv_store import KVStore
from lf_jax.export.scann_index import VectorIndex
from lf_jax.train.checkpoint import Checkpointer

STEP_A, STEP_B = 3, 5
SIZE = "size=tiny,dynamic=0.5"
SHRINK = [
    "--config.batch_size=64",
    *(f"--config.embedding.tables.{t}.dim=16" for t in ("member", "hashtag", "post")),
    "--config.model.mlp_dims=(32,)",
    "--config.model.dcn_layers=1",
]


def _with_posts(task, state, step, keys, rows, last):
    """``state`` at ``step`` whose post table holds exactly ``keys`` (ascending) with
    ``rows`` and per-key ``last``."""
    dyn = task.dynamic
    ckpt = to_checkpoint(dyn, {"embedding": state["embedding"], "index": state["dynamic"]})
    ckpt["step"] = step
    part = ckpt["dynamic"]["post"]
    part.update(
        keys=np.asarray(keys, np.uint64),
        rows=np.asarray(rows, np.float32),
        slots={"accumulator": np.full(len(keys), 0.1, np.float32)},
        last=np.asarray(last, np.int32),
        freq=np.ones(len(keys), np.int32),
    )
    both = from_checkpoint(dyn, ckpt)
    return {**state, "embedding": both["embedding"], "dynamic": both["index"]}


@pytest.fixture(scope="module")
def dynamic_run(repo_root, shrunk_ranker_config, feed_builder, tmp_path_factory):
    """Checkpoints at STEP_A (200 post keys) and STEP_B (10 gone, 15 new, 10 retrained,
    the other 180 untouched since STEP_A)."""
    from lf_jax.train.loop import build_task

    workdir = tmp_path_factory.mktemp("dynamic_export")
    config = shrunk_ranker_config(SIZE)
    with config.unlocked():
        config.train.ips = False
    task = build_task(config, workdir)
    assert task.dynamic is not None and "post" in task.dynamic.specs
    rng = np.random.default_rng(0)
    keys_a = np.sort(rng.choice(999, 200, replace=False)).astype(np.uint64)
    rows_a = rng.normal(size=(200, 16)).astype(np.float32)
    state = task.init_state()
    state_a = _with_posts(task, state, STEP_A, keys_a, rows_a, np.full(200, STEP_A))
    rows = dict(zip(keys_a.tolist(), rows_a, strict=True))
    last = dict.fromkeys(keys_a.tolist(), STEP_A - 1)
    gone, changed = keys_a[:10].tolist(), keys_a[10:20].tolist()
    for key in gone:
        rows.pop(key), last.pop(key)
    for key in changed:
        rows[key], last[key] = rng.normal(size=16).astype(np.float32), STEP_B
    for key in (1000 + rng.choice(1000, 15, replace=False)).tolist():
        rows[key], last[key] = rng.normal(size=16).astype(np.float32), STEP_B - 1
    keys_b = sorted(rows)
    state_b = _with_posts(
        task,
        state,
        STEP_B,
        keys_b,
        np.stack([rows[k] for k in keys_b]),
        [last[k] for k in keys_b],
    )
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(STEP_A, state_a, task.collection, {})
    checkpointer.save(STEP_B, state_b, task.collection, {})
    checkpointer.close()
    return {
        "config": config,
        "workdir": workdir,
        "a": (keys_a, rows_a),
        "b": (np.asarray(keys_b, np.uint64), np.stack([rows[k] for k in keys_b])),
    }


def _export(repo_root, run, output, *extra):
    return main(
        [
            "export",
            "--config",
            f"{repo_root}/configs/feed_ranker.py:{SIZE}",
            f"--config.data.data_dir={run['config'].data.data_dir}",
            *SHRINK,
            "--workdir",
            str(run["workdir"]),
            "--entity",
            "posts",
            "--output",
            str(output),
            *extra,
        ]
    )


def _by_id(directory):
    ids, vectors, manifest = load_export(directory)
    order = np.argsort(ids)
    return ids[order].tolist(), vectors[order], manifest


def test_export_of_live_keys_then_delta_equals_full_export(
    dynamic_run, repo_root, tmp_path, capsys
):
    out, full = tmp_path / "posts", tmp_path / "full"
    assert _export(repo_root, dynamic_run, out, "--step", str(STEP_A), "--kv", "--index") == 0
    keys_a, rows_a = dynamic_run["a"]
    ids, vectors, manifest = load_export(out)
    assert ids.tolist() == [f"p{k}" for k in keys_a.tolist()]
    np.testing.assert_array_equal(vectors, rows_a)
    assert manifest["dynamic_table"] == "post" and manifest["checkpoint_step"] == STEP_A
    capsys.readouterr()

    assert _export(repo_root, dynamic_run, out, "--delta") == 0
    printed = capsys.readouterr().out
    assert f"delta posts: checkpoint step {STEP_A} -> {STEP_B}, 25 upserts, 10 deletes" in printed
    assert _export(repo_root, dynamic_run, full, "--kv", "--index") == 0
    ids_d, vectors_d, manifest_d = _by_id(out)
    ids_f, vectors_f, manifest_f = _by_id(full)
    keys_b, rows_b = dynamic_run["b"]
    assert ids_d == ids_f == sorted(f"p{k}" for k in keys_b.tolist())
    np.testing.assert_array_equal(vectors_d, vectors_f)
    assert manifest_d["checkpoint_step"] == manifest_f["checkpoint_step"] == STEP_B
    assert manifest_d["count"] == len(keys_b)
    assert manifest_d["deltas"] == [
        {"since_step": STEP_A, "step": STEP_B, "upserts": 25, "deletes": 10}
    ]
    assert manifest_d["kv"]["version"] == manifest_f["kv"]["version"] == f"feed_ranker-step{STEP_B}"
    with KVStore(out / "kv", readonly=True) as delta_kv, KVStore(full / "kv", readonly=True) as kv:
        assert sorted(delta_kv.ids()) == sorted(kv.ids()) == ids_f
        np.testing.assert_array_equal(delta_kv.get(ids_f), kv.get(ids_f))
    index_d, index_f = VectorIndex.load(out / "index"), VectorIndex.load(full / "index")
    assert sorted(index_d.ids.tolist()) == sorted(index_f.ids.tolist()) == ids_f
    query = rows_b[:3]
    exact = np.asarray(ids_f)[np.argsort(-(query @ vectors_f.T), axis=1)[:, :5]]
    np.testing.assert_array_equal(index_d.search(query, 5)[0], exact)
    np.testing.assert_array_equal(index_f.search(query, 5)[0], exact)
    # again at the same step: nothing to send, nothing changes
    assert _export(repo_root, dynamic_run, out, "--delta") == 0
    assert "0 upserts, 0 deletes, 205 rows now" in capsys.readouterr().out
    np.testing.assert_array_equal(_by_id(out)[1], vectors_f)


def test_delta_errors_come_before_device_work(dynamic_run, repo_root, tmp_path, capsys):
    assert _export(repo_root, dynamic_run, tmp_path / "none", "--delta") == 2
    assert "holds no export" in capsys.readouterr().err
    assert _export(repo_root, dynamic_run, tmp_path / "none", "--delta", "--kv") == 2
    assert "drop --kv" in capsys.readouterr().err
    assert _export(repo_root, dynamic_run, tmp_path / "none", "--delta", "--serving") == 2
    assert "does not go with --serving" in capsys.readouterr().err
