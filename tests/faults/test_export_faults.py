"""Export and store faults: a damaged newest checkpoint, temporary directories left by a
killed export, edited manifests, and two KV-store writers."""

import json
import subprocess
import sys

import numpy as np
import pytest
from cli_probe import damage, ranker_args, steps_of

from lf_jax.export.embed_corpus import ExportError, load_export
from lf_jax.export.index_files import FORMAT, FORMAT_VERSION, read_index_directory, seal_manifest
from lf_jax.export.index_inputs import VectorIndexError
from lf_jax.export.kv_store import KVStore


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_export_falls_back_and_removes_stale_temporaries(
    repo_root, feed_data_dir, copy_workdir, tmp_path, capsys, lf_jax_log
):
    damage(copy_workdir / "checkpoints" / "6", "delete")
    output = tmp_path / "members"
    stale = [tmp_path / f".members.tmp-{dead_pid()}-0123abcd", tmp_path / ".members.tmp-89abcdef"]
    live = tmp_path / ".members.tmp-1-fedcba98"  # pid 1 runs: another export's, kept
    for path in [*stale, live]:
        path.mkdir()
        (path / "vectors.npy").write_bytes(b"\0" * 1024)
    args = ranker_args(repo_root, feed_data_dir, copy_workdir)
    from lf_jax.cli import main

    code = main(
        ["--verbosity", "warning", "export", *args, "--entity", "members", "--output", str(output)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "checkpoint step 4" in out
    assert any("checkpoint step 6 cannot be read" in r.getMessage() for r in lf_jax_log)
    assert (copy_workdir / "checkpoints.damaged" / "6").is_dir() and steps_of(copy_workdir) == [
        2,
        4,
    ]
    assert not any(path.exists() for path in stale) and live.is_dir()
    ids, vectors, manifest = load_export(output)
    assert manifest["checkpoint_step"] == 4 and vectors.shape == (ids.size, 16)
    # a valid-JSON edit of the manifest is found by its checksum
    edited = dict(manifest, metric="cosine")
    (output / "manifest.json").write_text(json.dumps(edited, indent=2))
    with pytest.raises(ExportError, match="manifest.json' was edited"):
        load_export(output)


def test_index_manifest_edit_is_detected(tmp_path):
    manifest = seal_manifest(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "params": {"leaves_to_search": 20}}
    )
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    manifest["params"]["leaves_to_search"] = 200  # valid JSON, another search
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VectorIndexError, match="manifest.json' was edited"):
        read_index_directory(tmp_path)
    del manifest["manifest_sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VectorIndexError, match="manifest.json' has no checksum"):
        read_index_directory(tmp_path)


GROW = """
import sys
import numpy as np
from lf_jax.export.kv_store import KVStore
with KVStore(sys.argv[1], dims=64, map_size=1 << 16) as store:
    ids = [f"other{i}" for i in range(20_000)]
    store.put(ids, np.ones((len(ids), 64), np.float32), version="b")
    print(store.stats()["map_size"])
"""


def test_second_kv_writer_adopts_a_map_grown_by_the_first(tmp_path):
    path = tmp_path / "kv"
    with KVStore(path, dims=64, map_size=1 << 16) as store:
        store.put(["a", "b"], np.ones((2, 64), np.float32), version="a")
        grown = subprocess.run(
            [sys.executable, "-c", GROW, str(path)], capture_output=True, text=True, check=True
        )
        assert int(grown.stdout) > 1 << 16  # the other writer grew the map
        store.put(["c"], np.full((1, 64), 2.0, np.float32), version="a")  # was MapResizedError
        assert len(store) == 20_003
        np.testing.assert_allclose(store.get(["c"]), 2.0, rtol=1e-2)
