"""Memory, build time and lookup throughput: IdMap (minimal perfect hash) vs a Python dict.

Command (2-core CPU, about 30 s):
    .venv/bin/python bench/id_mapping.py            # 1e6 ids "urn:li:member:<n>"
    .venv/bin/python bench/id_mapping.py --num-keys 100000

Memory is what each mapping keeps alive once built, measured with tracemalloc (numpy
reports its buffers to it): for the dict, the dict plus its key strings and int values
(the strings are created inside the measurement: the dict must keep them, the IdMap does
not); for the IdMap, its arrays (cross-checked with ``IdMap.nbytes``), plus the peak
while building. Times are the best of ``--repeats`` runs, without tracemalloc. Lookups
map a list of str to an int array: ``np.fromiter(map(d.__getitem__, keys))`` for the dict.
"""

import argparse
import gc
import sys
import time
import tracemalloc

import numpy as np

from lf_jax.embedding.ids import IdMap


def member_ids(start: int, stop: int) -> list[str]:
    return [f"urn:li:member:{i}" for i in range(start, stop)]


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def traced(function) -> tuple[object, int, int]:
    """(result, bytes still held by the result, peak bytes while it ran)."""
    gc.collect()
    tracemalloc.start()
    result = function()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, current, peak


def lookup_batches(lookup, keys: list[str], batch: int) -> None:
    for start in range(0, len(keys), batch):
        lookup(keys[start : start + batch])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-keys", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096, help="ids per lookup call (batched run)")
    args = parser.parse_args()
    n = args.num_keys
    keys = member_ids(0, n)
    unknown = member_ids(n, n + n // 10)

    # Memory.
    dict_map, dict_bytes, dict_peak = traced(lambda: {f"urn:li:member:{i}": i for i in range(n)})
    dict_getsizeof = (
        sys.getsizeof(dict_map)
        + sum(map(sys.getsizeof, dict_map))
        + sum(sys.getsizeof(v) for v in dict_map.values() if v > 256)
    )
    del dict_map
    id_map, map_bytes, map_peak = traced(lambda: IdMap.build(keys, num_oov_buckets=1))
    hash_map, hash_map_bytes, _ = traced(lambda: IdMap.build(keys, preserve_order=False))

    # Time.
    dict_build, dict_map = best_time(lambda: dict(zip(keys, range(n), strict=False)), args.repeats)
    map_build, _ = best_time(lambda: IdMap.build(keys, num_oov_buckets=1), args.repeats)

    def dict_lookup(batch):
        return np.fromiter(map(dict_map.__getitem__, batch), np.int64, len(batch))

    dict_all, dict_rows = best_time(lambda: dict_lookup(keys), args.repeats)
    map_all, map_rows = best_time(lambda: id_map.lookup(keys), args.repeats)
    np.testing.assert_array_equal(dict_rows, map_rows)
    dict_batched, _ = best_time(lambda: lookup_batches(dict_lookup, keys, args.batch), args.repeats)
    map_batched, _ = best_time(
        lambda: lookup_batches(id_map.lookup, keys, args.batch), args.repeats
    )
    map_unknown, unknown_rows = best_time(lambda: id_map.lookup(unknown), args.repeats)
    false_accepts = int(np.sum(unknown_rows < n))

    def mb(b):
        return f"{b / 2**20:.1f} MiB"

    def per_key(b):
        return f"{b / n:.1f}"

    def rate(seconds, count=n):
        return f"{count / seconds / 1e6:.2f} M/s"

    rows = [
        (
            "memory kept (tracemalloc)",
            mb(dict_bytes),
            mb(map_bytes),
            f"{dict_bytes / map_bytes:.1f}x less",
        ),
        ("bytes per id", per_key(dict_bytes), per_key(map_bytes), ""),
        (
            "memory, hash-order rows (no order array)",
            mb(dict_bytes),
            mb(hash_map_bytes),
            f"{dict_bytes / hash_map_bytes:.1f}x less",
        ),
        (
            "memory (sys.getsizeof dict + keys + values)",
            mb(dict_getsizeof),
            mb(id_map.nbytes),
            f"{dict_getsizeof / id_map.nbytes:.1f}x less",
        ),
        ("peak memory while building (tracemalloc)", mb(dict_peak), mb(map_peak), ""),
        (
            "build time",
            f"{dict_build:.2f} s",
            f"{map_build:.2f} s",
            f"{map_build / dict_build:.1f}x slower",
        ),
        (
            f"lookup, one call of {n} ids",
            rate(dict_all),
            rate(map_all),
            f"{dict_all / map_all:.2f}x",
        ),
        (
            f"lookup, batches of {args.batch}",
            rate(dict_batched),
            rate(map_batched),
            f"{dict_batched / map_batched:.2f}x",
        ),
        (
            f"lookup, {len(unknown)} unknown ids",
            "KeyError",
            rate(map_unknown, len(unknown)),
            f"{false_accepts} false accepts",
        ),
    ]
    print(f"{n} string ids 'urn:li:member:<n>'; IdMap: {id_map!r}, hash-order {hash_map!r}")
    print("| measure | dict str->int | IdMap | IdMap vs dict |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
