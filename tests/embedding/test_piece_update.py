"""piece_update.apply_entries: the local piece update, against a numpy row-wise Adagrad
(keys with one entry read their entry's gradient directly, shared keys go through the
scratch), for uniform-like and heavily duplicated keys, dense index and hash leaders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding.dedupe import dense_index_size
from lf_jax.embedding.piece_update import apply_entries, dup_rows
from lf_jax.embedding.sparse_optim import rowwise_adagrad


@pytest.mark.parametrize(
    "rows, key_range, offset",
    [
        (40_000, 40_000, 0),  # mostly one entry per key, dense index
        (5_000, 300, 7),  # mostly shared keys, several chunks of entries
        (10**6, 10**6, 0),  # hash leaders (no dense index)
    ],
)
def test_apply_entries_matches_numpy(rows, key_range, offset):
    rng = np.random.default_rng(3)
    m, dim, bags = 20_000, 4, 500
    keys = rng.integers(0, key_range, m).astype(np.int32)
    valid = rng.random(m) < 0.6
    grad_bd = rng.normal(size=(bags, dim)).astype(np.float32)
    bag_m = rng.integers(0, bags, m).astype(np.int32)
    coef_m = rng.normal(size=m).astype(np.float32)
    table_rows = rows + offset
    table = rng.normal(size=(table_rows, dim)).astype(np.float32)
    opt = rowwise_adagrad(0.1)
    size = dense_index_size(m, rows)

    def run(table, acc):
        def gradient(e_k):
            return jnp.asarray(grad_bd)[jnp.asarray(bag_m)[e_k]] * jnp.asarray(coef_m)[e_k][:, None]

        index = None if size is None else jnp.full((size,), m, jnp.int32)
        out, slots, _, index = apply_entries(
            table,
            {"accumulator": acc},
            jnp.asarray(keys),
            jnp.asarray(valid),
            gradient,
            rows,
            offset,
            opt,
            1,
            jnp.full((dup_rows(m), dim), jnp.nan, jnp.float32),  # contents never read
            index,
        )
        return out, slots["accumulator"], index

    acc = np.full((table_rows,), 0.1, np.float32)
    new, new_acc, index = jax.jit(run)(jnp.asarray(table), jnp.asarray(acc))
    if size is not None:
        np.testing.assert_array_equal(np.asarray(index), np.full(size, m))
    summed = np.zeros((table_rows, dim), np.float64)
    np.add.at(summed, keys[valid] + offset, grad_bd[bag_m[valid]] * coef_m[valid, None])
    touched = np.unique(keys[valid]) + offset
    want_acc = acc.astype(np.float64)
    want_acc[touched] += np.mean(summed[touched] ** 2, axis=1)
    want = table.astype(np.float64)
    want[touched] -= 0.1 / (np.sqrt(want_acc[touched]) + 1e-8)[:, None] * summed[touched]
    np.testing.assert_allclose(np.asarray(new_acc), want_acc, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-4, atol=1e-5)
