"""Dedupe in first-appearance order, its reusable dense index, and the in-place owner sum
that relies on the order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding.dedupe import (
    compacted_positions,
    dense_index_size,
    first_appearances,
    running_count,
    unique_with_inverse,
)
from lf_jax.embedding.exchange import sum_and_apply
from lf_jax.embedding.sparse_optim import rowwise_adagrad


@pytest.mark.parametrize("fill", [40, 10**6])  # dense index / hash leaders
def test_unordered_unique_is_first_appearance(fill):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, min(fill, 30), 64)
    keys[rng.random(64) < 0.2] = fill  # padding
    unique_u, inverse_m = jax.jit(unique_with_inverse, static_argnums=(1, 2))(
        jnp.asarray(keys, jnp.int32), fill, False
    )
    unique_u, inverse_m = np.asarray(unique_u), np.asarray(inverse_m)
    _, first = np.unique(keys, return_index=True)
    in_order = keys[np.sort(first)]
    np.testing.assert_array_equal(
        unique_u[: in_order.size][in_order < fill], in_order[in_order < fill]
    )
    valid = keys < fill
    np.testing.assert_array_equal(unique_u[inverse_m[valid]], keys[valid])
    first_pos = {k: int(np.argmax(keys == k)) for k in np.unique(keys)}
    assert all(inverse_m[e] <= first_pos[keys[e]] for e in range(keys.size))


@pytest.mark.parametrize("rows", [64, 10**6])  # dense index / hash leaders
def test_in_place_owner_sum_matches_numpy(rows):
    """An owner's received rows summed in their own buffer (owner_update.apply_at_owners):
    exact for small and large row spaces, over several chunks."""
    rng = np.random.default_rng(1)
    m, dim = 20_000, 4
    keys = rng.integers(0, min(rows, 15_000), m).astype(np.int32)  # ranks past a chunk
    valid = rng.random(m) < 0.9
    grads = rng.normal(size=(m, dim)).astype(np.float32)
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    opt = rowwise_adagrad(0.1)

    def run(table, acc, grads):
        out, slots, *_ = sum_and_apply(
            table,
            {"accumulator": acc},
            jnp.asarray(keys),
            jnp.asarray(valid),
            lambda e_k, sums_kd: sums_kd[e_k],
            rows,
            0,
            opt,
            1,
            grads,
        )
        return out, slots["accumulator"]

    acc = np.full((rows,), 0.1, np.float32)
    new, new_acc = jax.jit(run)(jnp.asarray(table), jnp.asarray(acc), jnp.asarray(grads))
    summed = np.zeros((rows, dim), np.float64)
    np.add.at(summed, keys[valid], grads[valid])
    touched = np.unique(keys[valid])
    want_acc = acc.astype(np.float64)
    want_acc[touched] += np.mean(summed[touched] ** 2, axis=1)
    want = table.astype(np.float64)
    want[touched] -= 0.1 / (np.sqrt(want_acc[touched]) + 1e-8)[:, None] * summed[touched]
    np.testing.assert_allclose(np.asarray(new_acc), want_acc, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-4, atol=1e-5)


def test_dense_index_is_handed_back_clean_and_reusable():
    """first_appearances restores the dense index it is given to M at the keys it touched:
    two batches through one index give the answers of fresh indexes (the local update
    carries one index over its pieces)."""
    rng = np.random.default_rng(2)
    m, fill = 256, 1000
    batches = [rng.integers(0, fill + 1, m).astype(np.int32) for _ in range(2)]
    assert dense_index_size(m, fill) == fill + 1

    def two(a, b, index):
        *first, index = first_appearances(a, fill, index)
        *second, index = first_appearances(b, fill, index)
        return first, second, index

    index = jnp.full((fill + 1,), m, jnp.int32)
    first, second, index = jax.jit(two)(*map(jnp.asarray, batches), index)
    np.testing.assert_array_equal(np.asarray(index), np.full(fill + 1, m))
    for got, keys in ((first, batches[0]), (second, batches[1])):
        want = first_appearances(jnp.asarray(keys), fill)[:3]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        _, first_pos = np.unique(keys, return_index=True)
        is_first = np.zeros(m, bool)
        is_first[first_pos] = True
        np.testing.assert_array_equal(np.asarray(got[2]), is_first)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_running_count_and_compacted_positions_match_numpy(chunk):
    """Prefix sums equal numpy's cumsum; the compacted positions list the selected
    entries in order, then M, padded to a multiple of ``chunk``."""
    mask = np.random.default_rng(chunk).random(100) < 0.3
    np.testing.assert_array_equal(np.asarray(running_count(jnp.asarray(mask))), np.cumsum(mask))
    got = np.asarray(jax.jit(compacted_positions, static_argnums=1)(jnp.asarray(mask), chunk))
    padded = -(-mask.size // chunk) * chunk
    want = np.full(padded, mask.size)
    want[: mask.sum()] = np.flatnonzero(mask)
    np.testing.assert_array_equal(got, want)
