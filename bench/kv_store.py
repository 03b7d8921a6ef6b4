"""KVStore (LMDB, int8 + per-row scale): write/read throughput, size on disk, quantization error.

Command (2-core CPU, about 1 minute at 1e6 x 64):
    .venv/bin/python bench/kv_store.py                          # 1e6 x 64
    .venv/bin/python bench/kv_store.py --num-vectors 100000 --json /tmp/kv.json

Vectors are Gaussian [n, D] float32 with ids "urn:li:member:<n>" in random order.
Measured, int8 store then float32 store (same ids, same run):
- put: all rows, ``--batch`` rows per LMDB transaction (fsync on commit), rows/s;
- update: the same rows with 1% of them changed (near-line re-embedding), rows/s and
  the counts written / unchanged;
- get: random lookups of ``--lookup-batch`` ids per call, rows/s, and get of all rows;
- size: data.mdb allocated bytes, the live B-tree pages (= a compact copy), bytes per
  row, against the raw float32 array (n * D * 4) and the float32 LMDB store;
- quantization error: cosine(dequantized, float) mean and min, relative L2 error.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from lf_jax.console import set_verbosity
from lf_jax.export.kv_store import KVStore
from lf_jax.export.quantize import quantization_error


def run(directory: str, dtype: str, ids: list[str], vectors: np.ndarray, args) -> dict:
    rng = np.random.default_rng(1)
    result = {}
    with KVStore(directory, dims=vectors.shape[1], dtype=dtype) as store:
        start = time.perf_counter()
        store.put(ids, vectors, version="v1", batch_size=args.batch)
        seconds = time.perf_counter() - start
        result["put_rows_per_s"] = round(len(ids) / seconds)
        result["put_seconds"] = round(seconds, 2)
        stats = store.stats()
        changed = vectors.copy()
        rows = rng.choice(len(ids), len(ids) // 100, replace=False)
        changed[rows] = rng.standard_normal((rows.size, vectors.shape[1]), dtype=np.float32)
        start = time.perf_counter()
        counts = store.update(ids, changed, version="v2", batch_size=args.batch)
        seconds = time.perf_counter() - start
        result["update_rows_per_s"] = round(len(ids) / seconds)
        result["update_counts"] = {
            "written": counts.written,
            "unchanged": counts.unchanged,
            "new": counts.new,
        }
        lookups = [ids[i] for i in rng.integers(0, len(ids), args.lookups)]
        start = time.perf_counter()
        for first in range(0, len(lookups), args.lookup_batch):
            store.get(lookups[first : first + args.lookup_batch])
        seconds = time.perf_counter() - start
        result["get_rows_per_s"] = round(len(lookups) / seconds)
        result["get_batch"] = args.lookup_batch
        start = time.perf_counter()
        restored = store.get(ids)
        result["get_all_rows_per_s"] = round(len(ids) / (time.perf_counter() - start))
        cosine = np.einsum("ij,ij->i", restored, changed) / (
            np.linalg.norm(restored, axis=1) * np.linalg.norm(changed, axis=1)
        )
        result["stored_cosine_mean"] = float(cosine.mean())
        result["stored_cosine_min"] = float(cosine.min())
        after = store.stats()
        with tempfile.TemporaryDirectory(dir=os.path.dirname(directory)) as copy_dir:
            compact = store.copy_compact(os.path.join(copy_dir, "compact"))
            compact_bytes = os.path.getsize(compact / "data.mdb")
    result.update(
        bytes_after_put=stats["bytes_on_disk"],
        bytes_after_update=after["bytes_on_disk"],
        bytes_live=after["bytes_live"],
        bytes_compact_copy=compact_bytes,
        bytes_per_row_compact=round(compact_bytes / len(ids), 1),
        row_value_bytes=after["row_bytes"],
        versions=after["versions"],
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-vectors", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--batch", type=int, default=10_000, help="rows per write transaction")
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--lookup-batch", type=int, default=1000)
    parser.add_argument("--dir", default=None, help="where to put the stores (default: a temp dir)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    set_verbosity("warning")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.num_vectors, args.dims), dtype=np.float32)
    ids = [f"urn:li:member:{i}" for i in rng.permutation(args.num_vectors)]
    results = {
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "raw_float32_bytes": vectors.nbytes,
        "quantization_error": quantization_error(vectors),
        "quantization_error_heavy_tailed_t3": quantization_error(
            rng.standard_t(3, size=(100_000, args.dims)).astype(np.float32)
        ),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for dtype in ("int8", "float32"):
            results[dtype] = run(os.path.join(root, dtype), dtype, ids, vectors, args)
            print(dtype, json.dumps(results[dtype]))
    int8, float32 = results["int8"], results["float32"]
    compact = int8["bytes_compact_copy"]
    results["size_ratios"] = {
        "raw_float32_over_int8_compact": round(vectors.nbytes / compact, 2),
        "float32_lmdb_over_int8_lmdb_compact": round(float32["bytes_compact_copy"] / compact, 2),
        "float32_lmdb_over_int8_lmdb_on_disk": round(
            float32["bytes_after_update"] / int8["bytes_after_update"], 2
        ),
    }
    print("quantization error (Gaussian):", results["quantization_error"])
    print("quantization error (Student t, 3 dof):", results["quantization_error_heavy_tailed_t3"])
    print("size ratios:", results["size_ratios"], "raw float32 bytes:", vectors.nbytes)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
