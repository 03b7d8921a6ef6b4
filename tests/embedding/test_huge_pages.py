"""Huge pages for CPU tables: collapsed at init, values kept, opt-out and bad values."""

import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lf_jax.embedding.huge_pages import HUGE_PAGE, back_with_huge_pages
from lf_jax.errors import UserInputError

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    platform.system() != "Linux" or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux transparent huge pages (madvise or always)",
)


def _aligned_bytes(x: jax.Array) -> int:
    start = -(-x.unsafe_buffer_pointer() // HUGE_PAGE) * HUGE_PAGE
    return (x.unsafe_buffer_pointer() + x.nbytes) // HUGE_PAGE * HUGE_PAGE - start


@needs_thp
def test_collapses_whole_huge_pages_and_keeps_values():
    table = jnp.arange(4 * HUGE_PAGE // 4, dtype=jnp.float32).reshape(-1, 64)
    small = jnp.ones((8, 64), jnp.float32)  # under one huge page: nothing to do
    before = np.asarray(table).copy()
    collapsed = back_with_huge_pages({"t": table, "s": small})
    assert collapsed == _aligned_bytes(table) >= 3 * HUGE_PAGE
    np.testing.assert_array_equal(np.asarray(table), before)

    def traced(x):  # eval_shape of an init: no buffer, nothing done
        assert back_with_huge_pages(x) == 0
        return x

    jax.eval_shape(traced, table)


def test_opt_out_and_bad_value(monkeypatch):
    table = jnp.zeros((4 * HUGE_PAGE // 256, 64), jnp.float32)
    monkeypatch.setenv("LF_JAX_HUGE_PAGES", "off")
    assert back_with_huge_pages(table) == 0
    monkeypatch.setenv("LF_JAX_HUGE_PAGES", "yes")
    with pytest.raises(UserInputError, match="LF_JAX_HUGE_PAGES.*'yes'"):
        back_with_huge_pages(table)
