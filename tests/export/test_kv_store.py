"""KVStore: int8 round trip, incremental updates, deletes, stats, errors, crash safety (SIGKILL)."""

import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lf_jax.errors import UserInputError
from lf_jax.export.kv_store import (
    KVStore,
    KVStoreError,
    UpdateCounts,
)
from lf_jax.export.quantize import dequantize_int8, quantization_error, quantize_int8

DIMS = 16


def _vectors(n, seed=0, dims=DIMS):
    return np.random.default_rng(seed).normal(size=(n, dims)).astype(np.float32)


def _ids(n, start=0):
    return [f"urn:li:member:{i:06d}" for i in range(start, start + n)]  # sorted = numeric order


def _cosine(a, b):
    return np.einsum("ij,ij->i", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_round_trip_quantized(tmp_path):
    vectors = _vectors(1000)
    ids = _ids(1000)
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        assert store.put(ids, vectors, version="ckpt-100", batch_size=300) == 1000
        restored = store.get(ids[::-1])[::-1]
        assert restored.dtype == np.float32 and restored.shape == (1000, DIMS)
        cosine = _cosine(vectors, restored)
        assert cosine.mean() > 0.999 and cosine.min() > 0.99
        raw = store.get_raw(ids[:10])
        assert raw.codes.dtype == np.int8 and np.abs(raw.codes).max() == 127
        np.testing.assert_allclose(raw.scales, np.abs(vectors[:10]).max(axis=1) / 127, rtol=1e-6)
        np.testing.assert_array_equal(dequantize_int8(raw.codes, raw.scales), restored[:10])
        assert raw.versions.tolist() == ["ckpt-100"] * 10
        assert len(store) == 1000 and ids[5] in store and "urn:li:member:x" not in store
        assert store.ids() == ids
        stats = store.stats()
        assert (
            stats["count"] == 1000
            and stats["dims"] == DIMS
            and stats["versions"] == {"ckpt-100": 1000}
        )
        assert stats["row_bytes"] == DIMS + 6 and stats["bytes_float32"] == 1000 * DIMS * 4
        assert 0 < stats["bytes_live"] <= stats["file_bytes"]
    with KVStore(tmp_path / "kv", readonly=True) as reader:  # reopen: dims from the store
        assert reader.dims == DIMS
        np.testing.assert_array_equal(reader.get(ids), restored)


def test_float32_store_is_exact(tmp_path):
    vectors = _vectors(50)
    with KVStore(tmp_path / "kv", dims=DIMS, dtype="float32") as store:
        store.put(_ids(50), vectors, version=3)
        np.testing.assert_array_equal(store.get(_ids(50)), vectors)
        assert store.stats()["row_bytes"] == 4 * DIMS + 6 and store.stats()["versions"] == {"3": 50}


def test_update_rewrites_only_new_and_changed_rows(tmp_path):
    vectors = _vectors(500)
    ids = _ids(500)
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        store.put(ids, vectors, version="v1", batch_size=128)
        file_before = store.stats()["bytes_live"]
        fresh = vectors.copy()
        fresh += 1e-6 * _vectors(500, seed=1)  # float noise: below the tolerance
        fresh[10:40] = _vectors(30, seed=2)  # 30 re-embedded rows
        new_vectors = _vectors(20, seed=3)
        counts = store.update(
            ids + _ids(20, start=500),
            np.concatenate([fresh, new_vectors]),
            version="v2",
            batch_size=128,
        )
        assert counts == UpdateCounts(written=50, unchanged=470, new=20)
        assert store.stats()["versions"] == {"v1": 470, "v2": 50}
        versions = store.get_raw(ids).versions
        assert set(versions[10:40]) == {"v2"} and set(np.delete(versions, range(10, 40))) == {"v1"}
        assert _cosine(store.get(ids[10:40]), fresh[10:40]).min() > 0.99
        # the same vectors again: nothing to write
        again = store.update(
            ids + _ids(20, start=500), np.concatenate([fresh, new_vectors]), version="v3"
        )
        assert again == UpdateCounts(written=0, unchanged=520, new=0)
        assert store.stats()["versions"] == {"v1": 470, "v2": 50}
        # tolerance 0 still skips rows whose stored codes are identical
        assert store.update(ids[:5], vectors[:5], version="v4", tolerance=0).written == 0
        assert store.stats()["bytes_live"] >= file_before


def test_delete_and_missing_ids(tmp_path):
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        store.put(_ids(100), _vectors(100), version="a")
        store.put(_ids(10, start=100), _vectors(10, seed=5), version="b")
        assert store.delete(_ids(5) + ["urn:li:member:nope", _ids(1, start=100)[0]]) == 6
        assert len(store) == 104 and store.stats()["versions"] == {"a": 95, "b": 9}
        with pytest.raises(
            KVStoreError,
            match=r"1 of 2 ids are not in the store \(first: "
            r"'urn:li:member:000000' at position 0\)",
        ):
            store.get([_ids(1)[0], _ids(1, start=50)[0]])
        filled = store.get([_ids(1)[0], _ids(1, start=50)[0]], missing="nan")
        assert np.isnan(filled[0]).all() and np.isfinite(filled[1]).all()
        assert not store.get([_ids(1)[0]], missing="zeros").any()
        assert store.get_raw([_ids(1)[0]], missing="zeros").versions.tolist() == [""]


def test_quantization_error_report():
    gaussian = quantization_error(_vectors(5000, dims=64))
    assert gaussian["cosine_mean"] > 0.999 and gaussian["cosine_min"] > 0.99
    heavy = quantization_error(np.random.default_rng(0).standard_t(2, size=(5000, 64)))
    assert heavy["cosine_mean"] > 0.99 and heavy["cosine_min"] > 0.9
    codes, scales = quantize_int8(np.zeros((2, 4)))
    assert not codes.any() and not scales.any()
    assert quantization_error(np.zeros((1, 4)))["cosine_min"] == 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.put(["a", "b"], _vectors(3), "v"), "got 3 vectors for 2 ids"),
        (
            lambda s: s.put(["a"], _vectors(1, dims=8), "v"),
            r"vectors must have shape \[n, 16\], got \(1, 8\)",
        ),
        (lambda s: s.put(["a", "b", "a"], _vectors(3), "v"), "'a' appears at positions 0 and 2"),
        (lambda s: s.put(["a", 7], _vectors(2), "v"), "ids must be str, got int 7 at position 1"),
        (
            lambda s: s.put(["a", "x" * 600], _vectors(2), "v"),
            "id at position 1 .* is 600 utf-8 bytes",
        ),
        (lambda s: s.put([""], _vectors(1), "v"), "id at position 0 .* is 0 utf-8 bytes"),
        (lambda s: s.put("abc", _vectors(1), "v"), "got a single str 'abc'"),
        (lambda s: s.put(["a"], _vectors(1), ""), "version must be a non-empty str or an int"),
        (
            lambda s: s.put(["a"], _vectors(1), "v", batch_size=0),
            "batch_size must be a positive int, got 0",
        ),
        (
            lambda s: s.update(["a"], _vectors(1), "v", tolerance=-1),
            "tolerance must be a number >= 0, got -1",
        ),
        (
            lambda s: s.get(["a"], missing="skip"),
            "missing must be 'raise', 'nan' or 'zeros', got 'skip'",
        ),
    ],
)
def test_write_errors_name_field_and_value(tmp_path, call, message):
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        store.put(["a"], _vectors(1), "v0")
        with pytest.raises(KVStoreError, match=message) as info:
            call(store)
        assert isinstance(info.value, UserInputError)
        assert len(store) == 1 and store.stats()["versions"] == {"v0": 1}  # nothing half-written


def test_nan_rows_are_named(tmp_path):
    vectors = _vectors(3)
    vectors[2, 1] = np.inf
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        with pytest.raises(KVStoreError, match=r"row 2 \(id 'c'\) holds NaN or Inf"):
            store.put(["a", "b", "c"], vectors, "v")
        assert len(store) == 0


def test_open_errors(tmp_path):
    with pytest.raises(KVStoreError, match="holds no store yet; pass dims"):
        KVStore(tmp_path / "new")
    with pytest.raises(KVStoreError, match="no data.mdb"):
        KVStore(tmp_path / "absent", readonly=True)
    with pytest.raises(KVStoreError, match="dims must be a positive int, got 0"):
        KVStore(tmp_path / "x", dims=0)
    with pytest.raises(KVStoreError, match="dtype must be one of"):
        KVStore(tmp_path / "x", dims=4, dtype="int4")
    KVStore(tmp_path / "kv", dims=DIMS).close()
    with pytest.raises(KVStoreError, match="dims=8 does not match the store .* 16-dim"):
        KVStore(tmp_path / "kv", dims=8)
    with KVStore(tmp_path / "kv", readonly=True) as reader:
        with pytest.raises(KVStoreError, match="opened read-only"):
            reader.put(["a"], _vectors(1), "v")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KVStoreError, match="exists and is not a directory"):
        KVStore(blocker, dims=4)
    with pytest.raises(KVStoreError, match="cannot open"):
        KVStore(blocker / "kv", dims=4)


def test_map_grows_when_full(tmp_path):
    with KVStore(tmp_path / "kv", dims=64, map_size=1 << 16) as store:
        store.put(_ids(3000), _vectors(3000, dims=64), "v", batch_size=1000)
        assert len(store) == 3000 and store.stats()["map_size"] > 1 << 16


def test_copy_compact(tmp_path):
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        ids = _ids(2000)[::-1]
        store.put(ids, _vectors(2000), "v1", batch_size=100)
        store.update(ids, _vectors(2000, seed=1), "v2", batch_size=100)
        copy = store.copy_compact(tmp_path / "compact")
        with KVStore(copy, readonly=True) as compact:
            np.testing.assert_array_equal(compact.get(ids), store.get(ids))
            assert compact.stats()["file_bytes"] <= store.stats()["file_bytes"]
    with pytest.raises(KVStoreError, match="must be a new or empty directory"):
        KVStore(tmp_path / "kv").copy_compact(tmp_path / "compact")


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from lf_jax.export.kv_store import KVStore

    path, mode, n, dims, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    ids = [f"urn:li:member:{i:06d}" for i in range(n)]
    base = np.random.default_rng(0).normal(size=(n, dims)).astype(np.float32)

    class StopsMidBatch(KVStore):
        batches = 0

        def _write_batch(self, txn, keys, values):
            if self.batches == 2:  # the third batch: half of it in, then wait for SIGKILL
                super()._write_batch(txn, keys[:len(keys) // 2], values[:len(values) // 2])
                print("MID", flush=True)
                time.sleep(120)
            super()._write_batch(txn, keys, values)
            self.batches += 1

    if mode == "mid":
        StopsMidBatch(path).put(ids, base + 1.0, "v2", batch_size=batch)
    else:  # rewrite everything, round after round, until killed
        store = KVStore(path)
        print("READY", flush=True)
        for round_ in range(1, 10**6):
            store.put(ids, base + round_, f"r{round_}", batch_size=batch)
""")


def _start_child(tmp_path, mode, n, batch):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "kv"), mode, str(n), str(DIMS), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(process, word, timeout=60):
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if line.strip() != word:
        process.kill()
        raise AssertionError(
            f"writer did not print {word}: {line!r} {process.stderr.read()[-2000:]}"
        )


def _check_consistent(path, n, batch):
    """Every batch holds one version everywhere, with that version's vectors; counts agree."""
    base = np.random.default_rng(0).normal(size=(n, DIMS)).astype(np.float32)
    with KVStore(path) as store:
        raw = store.get_raw(_ids(n))
        restored = store.get(_ids(n))
        stats = store.stats()
        rounds = np.array(
            [0 if v == "v1" else 1 if v == "v2" else int(v[1:]) for v in raw.versions]
        )
        for start in range(0, n, batch):
            assert len(set(rounds[start : start + batch].tolist())) == 1, (
                f"batch at {start} is mixed"
            )
        expected = base + rounds[:, None]
        assert _cosine(restored, expected).min() > 0.99
        assert stats["count"] == n
        assert sum(stats["versions"].values()) == n
        assert stats["versions"] == {
            name: int(count)
            for name, count in zip(*np.unique(raw.versions, return_counts=True), strict=False)
        }
        store.put(["zz:probe"], base[:1], "probe")  # the dead writer's lock is free again
        assert store.delete(["zz:probe"]) == 1 and store.stats()["versions"] == stats["versions"]
    return rounds


def test_sigkill_mid_batch_leaves_old_or_new_batches_never_partial(tmp_path):
    n, batch = 4000, 1000
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        store.put(_ids(n), _vectors(n, seed=0), "v1", batch_size=batch)
    child = _start_child(tmp_path, "mid", n, batch)
    _wait_for(child, "MID")
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    rounds = _check_consistent(tmp_path / "kv", n, batch)
    # batches 0 and 1 committed (v2), batch 2 was killed half-way: all of it still v1
    np.testing.assert_array_equal(rounds, np.repeat([1, 1, 0, 0], batch))


def test_sigkill_at_a_random_moment(tmp_path):
    n, batch = 3000, 250
    with KVStore(tmp_path / "kv", dims=DIMS) as store:
        store.put(_ids(n), _vectors(n, seed=0), "v1", batch_size=batch)
    for delay in (0.25, 0.6):  # commits take a few ms each: the kill lands in some batch
        child = _start_child(tmp_path, "loop", n, batch)
        _wait_for(child, "READY")
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        _check_consistent(tmp_path / "kv", n, batch)
