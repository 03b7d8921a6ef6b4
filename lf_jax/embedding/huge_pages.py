"""Transparent huge pages for embedding tables on CPU: fewer TLB misses on random rows.

A training step reads (lookup) and writes (sparse optimizer) random rows of tables of up
to gigabytes. With 4 KiB pages nearly every row access misses the TLB (under a
hypervisor each miss walks two page tables); 2 MiB pages cover a 2 GB table with 1,024
entries. Measured on the 2-core KVM machine of bench/BENCHMARKS.md, one [8e6, 64] float32
group: pooling 4096 bags of 1-20 ids 10.3 -> 6.7 CPU ms per table, row-wise Adagrad on
42,000 distinct rows 17.6 -> 13.4 ms.

Linux gives anonymous memory huge pages only where asked (transparent_hugepage
``madvise`` mode, the common default) and XLA allocates and fills the buffers itself, so
``back_with_huge_pages`` asks after the fact: ``madvise(MADV_HUGEPAGE)`` and
``madvise(MADV_COLLAPSE)`` (Linux >= 6.1: the kernel copies the buffer into huge pages
now, about 5 s per GB on that machine). A step that donates the state updates tables in
place, so they keep their pages. EmbeddingCollection.init and state_from_logical call
it; ``LF_JAX_HUGE_PAGES=off`` in the environment turns it off.

Example:
    >>> state = coll.init(jax.random.key(0))  # already collapsed
    >>> back_with_huge_pages(state["tables"])  # a state built another way
    2080374784
"""

import ctypes
import os
import platform

import jax

from lf_jax.errors import UserInputError

_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h
HUGE_PAGE = 2 << 20
_CHOICES = ("collapse", "off")


def _wanted() -> bool:
    choice = os.environ.get("LF_JAX_HUGE_PAGES", "collapse")
    if choice not in _CHOICES:
        raise UserInputError(f"LF_JAX_HUGE_PAGES must be one of {list(_CHOICES)}, got {choice!r}")
    return choice == "collapse" and platform.system() == "Linux"


def _cpu_buffers(tree):
    """(address, bytes) of every CPU device buffer of the jax arrays in ``tree``."""
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
            continue  # traced (jit, eval_shape): no buffer yet
        if leaf.is_deleted():
            continue
        for shard in leaf.addressable_shards:
            if shard.device.platform == "cpu":
                yield shard.data.unsafe_buffer_pointer(), shard.data.nbytes


def back_with_huge_pages(tree) -> int:
    """Asks Linux to back the CPU buffers of the jax arrays in ``tree`` with 2 MiB pages
    now; returns the bytes collapsed (the whole 2 MiB-aligned pages inside each buffer).

    0 where nothing was done: LF_JAX_HUGE_PAGES=off, not Linux, no CPU buffer of at
    least 2 MiB (traced values, under jit or eval_shape, have none), or a kernel that
    refuses (transparent huge pages ``never``, or before 6.1, which lacks
    MADV_COLLAPSE). Waits for the arrays to be computed first.
    """
    if not _wanted():
        return 0
    buffers = list(_cpu_buffers(jax.block_until_ready(tree)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for address, size in buffers:
        start = -(-address // HUGE_PAGE) * HUGE_PAGE
        length = (address + size) // HUGE_PAGE * HUGE_PAGE - start
        if length <= 0:
            continue
        if libc.madvise(start, length, _MADV_HUGEPAGE) == 0 and (
            libc.madvise(start, length, _MADV_COLLAPSE) == 0
        ):
            collapsed += length
    return collapsed
