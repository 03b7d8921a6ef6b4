"""exchange.apply_rows: the sparse optimizers' row delta added to the touched rows only.

float32 tables take the delta by scatter-add; bfloat16 / float16 tables round
old row + delta once. Checked against a numpy row-wise Adagrad / Adam.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding.exchange import apply_rows
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd

ROWS, DIM = 6, 5


def _inputs(dtype):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    row_k = np.array([4, 1, ROWS, 0], np.int32)  # ROWS: padding, neither read nor written
    grad_kd = rng.standard_normal((4, DIM)).astype(np.float32)
    return jnp.asarray(table, dtype), table, row_k, grad_kd


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rowwise_adagrad_rows_match_numpy(dtype):
    table, _, row_k, grad_kd = _inputs(dtype)
    opt = rowwise_adagrad(0.5, initial_accumulator=0.1)
    slots = opt.init_slots(ROWS, DIM)
    new_table, new_slots = apply_rows(table, slots, jnp.asarray(row_k), grad_kd, opt, 1)
    old = np.asarray(table.astype(jnp.float32))
    want, acc = old.copy(), np.full(ROWS, 0.1, np.float32)
    for k, row in enumerate(row_k):
        if row >= ROWS:
            continue
        acc[row] += np.mean(grad_kd[k] ** 2)
        want[row] = old[row] - 0.5 / (np.sqrt(acc[row]) + 1e-8) * grad_kd[k]
    want = np.asarray(jnp.asarray(want).astype(dtype).astype(jnp.float32))
    assert new_table.dtype == jnp.dtype(dtype)
    ulp = float(jnp.finfo(dtype).eps)  # low precision: the rounding may differ by one ulp
    np.testing.assert_allclose(
        np.asarray(new_table.astype(jnp.float32)), want, rtol=max(ulp, 1e-6), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(new_slots["accumulator"]), acc, rtol=1e-6)
    untouched = [r for r in range(ROWS) if r not in row_k]
    np.testing.assert_array_equal(
        np.asarray(new_table.astype(jnp.float32))[untouched], old[untouched]
    )


def test_sgd_and_adam_deltas_match_numpy():
    table, table_np, row_k, grad_kd = _inputs("float32")
    got, _ = apply_rows(table, {}, jnp.asarray(row_k), grad_kd, sgd(0.5), 1)
    want = table_np.copy()
    for k, row in enumerate(row_k):
        if row < ROWS:
            want[row] -= 0.5 * grad_kd[k]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    opt = adam(0.1)
    got, slots = apply_rows(table, opt.init_slots(ROWS, DIM), jnp.asarray(row_k), grad_kd, opt, 1)
    want = table_np.copy()
    for k, row in enumerate(row_k):
        if row < ROWS:
            mu, nu = 0.1 * grad_kd[k], 0.001 * grad_kd[k] ** 2
            want[row] -= 0.1 * (mu / 0.1) / (np.sqrt(nu / 0.001) + 1e-8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(slots["mu"])[4], 0.1 * grad_kd[0], rtol=1e-6)
