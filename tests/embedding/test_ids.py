"""String id -> row mapping (minimal perfect hash + fingerprints + OOV) and open vocabularies."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding import ids as ids_module
from lf_jax.embedding.ids import IdMap
from lf_jax.embedding.open_vocab import (
    OpenVocabError,
    combine_quotient_remainder,
    hash_to_rows,
    quotient_remainder_rows,
    quotient_remainder_specs,
)
from lf_jax.embedding.sparse_optim import rowwise_adagrad
from lf_jax.embedding.spec import validate_specs
from lf_jax.embedding.string_hash import IdMapError, hash_strings
from lf_jax.errors import UserInputError

NUM_KEYS = 1_000_000


def member_ids(start: int, stop: int) -> list[str]:
    return [f"urn:li:member:{i}" for i in range(start, stop)]


@pytest.fixture(scope="module")
def million_keys() -> list[str]:
    return member_ids(0, NUM_KEYS)


@pytest.fixture(scope="module")
def million_map(million_keys) -> IdMap:
    return IdMap.build(million_keys, num_oov_buckets=8, seed=3)


@pytest.fixture
def small_map() -> IdMap:
    return IdMap.build(
        ["urn:li:member:1", "urn:li:member:7", "urn:li:hashtag:jax", "é🙂"], num_oov_buckets=2
    )


def test_million_keys_get_their_snapshot_rows(million_keys, million_map):
    rows = million_map.lookup(million_keys)
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, np.arange(NUM_KEYS))
    assert million_map.num_rows == NUM_KEYS + 8
    assert million_map.contains(million_keys).all()
    assert million_map.nbytes < 12 * NUM_KEYS  # fingerprints + order + ~5 bits of hash


def test_hash_order_rows_are_a_permutation(million_keys):
    keys = million_keys[::4]
    id_map = IdMap.build(keys, preserve_order=False, gamma=1.0)
    rows = id_map.lookup(keys)
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(keys)))
    assert id_map.order is None and id_map.nbytes < 6 * len(keys)


def test_unknown_keys_go_to_oov_rows(million_map):
    unknown = member_ids(NUM_KEYS, NUM_KEYS + 100_000)
    rows = million_map.lookup(unknown)
    false_accepts = np.mean(rows < NUM_KEYS)
    assert false_accepts < 1e-3, false_accepts  # about 2**-32 expected
    assert not million_map.contains(unknown).mean() > 1e-3
    oov = rows[rows >= NUM_KEYS]
    assert oov.max() < NUM_KEYS + 8
    counts = np.bincount(oov - NUM_KEYS, minlength=8)
    assert counts.min() > 0.8 * counts.mean()  # buckets are used evenly
    again = million_map.lookup(unknown[:10])  # an id's bucket does not depend on its batch
    np.testing.assert_array_equal(again, rows[:10])


def test_fingerprint_bits_set_the_false_accept_rate():
    keys = member_ids(0, 50_000)
    id_map = IdMap.build(keys, fingerprint_bits=8)
    rate = np.mean(id_map.lookup(member_ids(10**6, 10**6 + 100_000)) < len(keys))
    assert 0 < rate < 2 / 256, rate  # a key reaches a slot, then matches 8 bits: < 2**-8
    assert id_map.fingerprints.dtype == np.uint8


def test_lookup_keeps_shape_and_accepts_arrays(small_map):
    batch = np.array([["urn:li:member:7", "é🙂"], ["nope", "urn:li:member:1"]])
    rows = small_map.lookup(batch)
    assert rows.shape == (2, 2)
    np.testing.assert_array_equal(rows[[0, 0, 1], [0, 1, 1]], [1, 3, 0])
    assert 4 <= rows[1, 0] < 6
    np.testing.assert_array_equal(small_map.lookup(batch.astype(object)), rows)
    np.testing.assert_array_equal(small_map.lookup([b"urn:li:member:7", "é🙂".encode()]), [1, 3])
    assert small_map.lookup("urn:li:hashtag:jax") == 2
    np.testing.assert_array_equal(small_map.contains(batch), [[True, True], [False, True]])


def test_hash_does_not_depend_on_the_batch():
    alone = hash_strings(["urn:li:member:5"])
    with_long_key = hash_strings(["x" * 300, "urn:li:member:5", ""])
    assert alone[0] == with_long_key[1]
    assert hash_strings(["a"], seed=1)[0] != hash_strings(["a"], seed=2)[0]
    assert len(set(hash_strings(["", "a", "aa", "ab", "ba"]).tolist())) == 5


def test_single_key_and_no_oov_buckets():
    id_map = IdMap.build(["only"], num_oov_buckets=0)
    assert id_map.num_rows == 1 and id_map.lookup(["only"])[0] == 0
    with pytest.raises(IdMapError, match=r"1 of 2 ids are not in the vocabulary \(first: 'other'"):
        id_map.lookup(["only", "other"])


def test_save_load_round_trip(tmp_path, million_keys, million_map):
    path = million_map.save(tmp_path / "member_ids")
    assert path.name == "id_map.npz" and not [p for p in path.parent.iterdir() if p != path]
    loaded = IdMap.load(tmp_path / "member_ids")
    for field in ("num_keys", "num_oov_buckets", "seed", "hash_seed", "gamma", "fingerprint_bits"):
        assert getattr(loaded, field) == getattr(million_map, field)
    for field in ("level_words", "words", "rank", "fingerprints", "order", "fallback_keys"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(million_map, field))
    probe = million_keys[::997] + member_ids(NUM_KEYS, NUM_KEYS + 1000)
    np.testing.assert_array_equal(loaded.lookup(probe), million_map.lookup(probe))
    assert IdMap.load(path).num_rows == million_map.num_rows


def test_hash_order_map_round_trips(tmp_path):
    keys = member_ids(0, 1000)
    id_map = IdMap.build(keys, preserve_order=False, fingerprint_bits=16, num_oov_buckets=3)
    loaded = IdMap.load(id_map.save(tmp_path))
    assert loaded.order is None
    np.testing.assert_array_equal(loaded.lookup(keys + ["x"]), id_map.lookup(keys + ["x"]))


def test_failed_save_leaves_the_old_file_intact(tmp_path, small_map, monkeypatch):
    path = small_map.save(tmp_path)
    before = path.read_bytes()

    def write_half_then_fail(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ids_module.np, "savez", write_half_then_fail)
    with pytest.raises(IdMapError, match="cannot write .*No space left"):
        IdMap.build(["a", "b"]).save(tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id_map.npz"]


def test_save_to_unwritable_path(tmp_path, small_map):
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    with pytest.raises(IdMapError, match="a_file/ids' cannot be created"):
        small_map.save(blocker / "ids")
    assert blocker.read_text() == "user data"


def test_load_errors(tmp_path, small_map):
    with pytest.raises(IdMapError, match="does not exist"):
        IdMap.load(tmp_path / "missing")
    (tmp_path / "id_map.npz").write_bytes(b"not a zip file")
    with pytest.raises(IdMapError, match="not a readable IdMap file"):
        IdMap.load(tmp_path)
    path = small_map.save(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(IdMapError, match="not a readable IdMap file"):
        IdMap.load(tmp_path)
    np.savez(path, header=np.array(json.dumps({"format": "something else", "version": 1})))
    with pytest.raises(IdMapError, match="format 'something else'"):
        IdMap.load(path)


def test_duplicate_keys_name_the_first_duplicate():
    keys = ["a", "b", "c", "b", "d", "a"]
    with pytest.raises(IdMapError, match=r"'b' appears at positions 1 and 3"):
        IdMap.build(keys)
    big = member_ids(0, 100_000) + ["urn:li:member:99999"]
    with pytest.raises(
        UserInputError, match=r"'urn:li:member:99999' appears at positions 99999 and 100000"
    ):
        IdMap.build(np.array(big))


@pytest.mark.parametrize(
    "keys, match",
    [
        ([], "snapshot is empty"),
        (np.array([], dtype=str), "snapshot is empty"),
        (np.arange(5), "keys must be strings, got an array of int64"),
    ],
)
def test_bad_snapshots(keys, match):
    with pytest.raises(IdMapError, match=match):
        IdMap.build(keys)


@pytest.mark.parametrize(
    "field, value",
    [("num_oov_buckets", -1), ("gamma", 0.5), ("fingerprint_bits", 12), ("seed", -3)],
)
def test_bad_build_arguments_name_the_field(field, value):
    with pytest.raises(IdMapError, match=rf"{field} must .*{value}"):
        IdMap.build(["a"], **{field: value})


def test_hashing_trick_range_and_determinism():
    keys = member_ids(0, 20_000)
    rows = hash_to_rows(keys, num_rows=1000, seed=7)
    assert rows.dtype == np.int32 and rows.min() >= 0 and rows.max() < 1000
    np.testing.assert_array_equal(rows, hash_to_rows(np.array(keys), 1000, seed=7))
    assert np.mean(rows != hash_to_rows(keys, 1000, seed=8)) > 0.99
    counts = np.bincount(rows, minlength=1000)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()
    int_rows = hash_to_rows(np.arange(-5, 20_000, dtype=np.int64).reshape(5, -1), 97)
    assert int_rows.shape == (5, 4001) and int_rows.min() >= 0 and int_rows.max() < 97
    np.testing.assert_array_equal(
        hash_to_rows([3, 3, 17], 97), hash_to_rows(np.int32([3, 3, 17]), 97)
    )
    with pytest.raises(OpenVocabError, match="num_rows must be a positive int, got 0"):
        hash_to_rows(keys, 0)
    with pytest.raises(OpenVocabError, match="got an array of float64"):
        hash_to_rows(np.ones(3), 10)


def test_quotient_remainder_round_trip():
    ids = np.random.default_rng(0).integers(0, 1_000_003, size=(64, 5))
    quotient, remainder = quotient_remainder_rows(ids, 1000, vocab_size=1_000_003)
    np.testing.assert_array_equal(quotient * 1000 + remainder, ids)
    assert remainder.max() < 1000 and quotient.max() < 1001
    jq, jr = jax.jit(lambda x: quotient_remainder_rows(x, 1000))(jnp.asarray(ids, jnp.int32))
    np.testing.assert_array_equal(jq, quotient)
    np.testing.assert_array_equal(jr, remainder)
    with pytest.raises(OpenVocabError, match="ids must be < vocab_size=10, got 10"):
        quotient_remainder_rows(np.array([3, 10]), 4, vocab_size=10)
    with pytest.raises(OpenVocabError, match="ids must be >= 0, got -1"):
        quotient_remainder_rows(np.array([-1]), 4)


def test_quotient_remainder_specs():
    qr = quotient_remainder_specs(
        "member",
        vocab_size=1_000_001,
        num_remainder_rows=1000,
        dim=16,
        max_ids=1,
        combiner="sum",
        optimizer=rowwise_adagrad(0.05),
    )
    assert [t.name for t in qr.tables] == ["member_quotient", "member_remainder"]
    assert [t.vocab_size for t in qr.tables] == [1001, 1000]
    assert all(t.optimizer == rowwise_adagrad(0.05) and t.dim == 16 for t in qr.tables)
    assert qr.tables[0].scale == pytest.approx(16**-0.25)
    assert [f.table for f in qr.features] == ["member_quotient", "member_remainder"]
    assert validate_specs(qr.tables, qr.features).keys() == {"member_quotient", "member_remainder"}
    split = qr.split_ids(np.array([[5], [1_000_000]]))
    np.testing.assert_array_equal(split["member_quotient"], [[0], [1000]])
    np.testing.assert_array_equal(split["member_remainder"], [[5], [0]])
    assert quotient_remainder_specs("x", 10_000).num_remainder_rows == 100
    with pytest.raises(
        OpenVocabError, match="'x': num_remainder_rows must be <= vocab_size=10, got 11"
    ):
        quotient_remainder_specs("x", 10, 11)


def test_combine_product_pools_after_combining():
    qr = quotient_remainder_specs(
        "tags", vocab_size=100, num_remainder_rows=10, dim=2, max_ids=3, combiner="mean"
    )
    assert qr.pool_after_combine and all(f.combiner == "none" for f in qr.features)
    q_bld = jnp.array([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    r_bld = jnp.array([[[2.0, 2.0], [1.0, 0.0], [9.0, 9.0]]])
    mask_bl = jnp.array([[1, 1, 0]])
    pooled = jax.jit(qr.combine)(q_bld, r_bld, mask_bl)
    np.testing.assert_allclose(pooled, [[(2 + 3) / 2, (4 + 0) / 2]])
    summed = quotient_remainder_specs("tags", 100, 10, dim=2, max_ids=3, combiner="mean", op="sum")
    assert not summed.pool_after_combine and summed.features[0].combiner == "mean"
    np.testing.assert_allclose(summed.combine(q_bld[:, 0], r_bld[:, 0]), [[3.0, 4.0]])
    np.testing.assert_allclose(
        combine_quotient_remainder(q_bld, r_bld, "sum", combiner="sqrtn", mask=mask_bl),
        [[7 / np.sqrt(2), 8 / np.sqrt(2)]],
    )
    with pytest.raises(OpenVocabError, match="op must be one of .*got 'max'"):
        combine_quotient_remainder(q_bld, r_bld, "max")


def test_save_does_not_leave_temp_files_when_directory_is_new(tmp_path, small_map):
    target = tmp_path / "new" / "nested"
    small_map.save(target)
    assert os.listdir(target) == ["id_map.npz"]
