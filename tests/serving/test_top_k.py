"""functions.top_k_rows (the server's host top K) against jax.lax.top_k, ties included."""

import jax
import numpy as np
import pytest

from lf_jax.serving.functions import top_k_rows


@pytest.mark.parametrize("k", [1, 7, 500, 2000, 3000])
def test_top_k_rows_equals_lax_top_k_with_ties_at_the_boundary(k):
    rng = np.random.default_rng(k)
    scores_qn = rng.normal(size=(3, 3000)).astype(np.float32)
    for q in range(2):  # five more rows equal to the k-th best score of queries 0 and 1
        scores_qn[q, rng.choice(3000, 5, replace=False)] = np.sort(scores_qn[q])[-k]
    scores_qn[2, :4] = [0.0, -0.0, 0.0, -0.0]  # lax.top_k's total order: 0.0 before -0.0
    scores_qn[2, 4:] = np.round(scores_qn[2, 4:], 1)  # many ties everywhere
    want_scores, want_rows = jax.lax.top_k(scores_qn, k)
    scores, rows = top_k_rows(scores_qn, k)
    np.testing.assert_array_equal(rows, np.asarray(want_rows))
    np.testing.assert_array_equal(scores, np.asarray(want_scores))
    assert rows.dtype == np.int32 and scores.shape == (3, k)
