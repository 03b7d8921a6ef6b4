"""ScaNN tree + AH index vs brute force: recall@10 and queries/s, all in one run.

Command (2-core CPU, about 3 minutes at 1e6 x 64):
    .venv/bin/python bench/scann_index.py                       # 1e6 x 64, 1000 centres
    .venv/bin/python bench/scann_index.py --num-vectors 100000 --json /tmp/scann.json

Corpus: a Gaussian mixture (``--centres`` random unit centres, points = centre + noise,
L2-normalised), dot product. Queries are held out: fresh points of the same mixture, one
set of ``--queries`` to tune ``VectorIndex`` on (target recall@10 ``--target-recall``) and
another set to measure on. Ground truth: exact numpy search (``exact_search``).

Measured in the same process, one after the other, so ratios hold on a shared machine:
- numpy brute force (matmul + argpartition, BLAS threads): batched queries/s;
- ScaNN brute force (float32, ``score_brute_force``): batched queries/s (its thread
  pool) and single-query latency;
- lf_jax ``VectorIndex`` (ScaNN tree + AH + reorder, tuned): recall@10, batched
  queries/s and single-query latency p50/p99.
Batched figures are the best of ``--repeats`` runs over all queries.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from lf_jax.console import set_verbosity
from lf_jax.export.scann_index import VectorIndex
from lf_jax.export.scann_tuning import SearchParams, build_searcher, exact_search, recall_at_k


def mixture(rng, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    points = centres[rng.integers(0, centres.shape[0], n)]
    points = points + spread * rng.standard_normal(points.shape, dtype=np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points


def best_of(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def latencies(search_one, queries: np.ndarray) -> dict:
    times = []
    for query in queries:
        start = time.perf_counter()
        search_one(query)
        times.append(time.perf_counter() - start)
    ms = 1e3 * np.asarray(times)
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "queries": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-vectors", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument(
        "--spread", type=float, default=0.1, help="noise std per dimension around a centre"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-queries", type=int, default=1000, help="for the tree-AH latency")
    parser.add_argument(
        "--single-queries-bf", type=int, default=100, help="for the brute-force latency"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    set_verbosity("info")
    results = {
        "args": vars(args),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
    }
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dims), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    start = time.perf_counter()
    corpus = mixture(rng, centres, args.num_vectors, args.spread)
    tune_queries = mixture(rng, centres, args.queries, args.spread)
    queries = mixture(rng, centres, args.queries, args.spread)
    ids = np.char.add("urn:li:item:", np.arange(args.num_vectors).astype(str))
    print(f"corpus {corpus.shape} generated in {time.perf_counter() - start:.1f} s")

    # Ground truth and the numpy brute-force baseline.
    numpy_s, (exact_rows, _) = best_of(
        lambda: exact_search(corpus, queries, args.k, "dot_product"), 1
    )
    exact_ids = ids[exact_rows]
    results["numpy_brute_force"] = {
        "batched_qps": round(args.queries / numpy_s, 1),
        "seconds": round(numpy_s, 3),
    }
    print("numpy brute force:", results["numpy_brute_force"])

    # ScaNN exact brute force.
    start = time.perf_counter()
    bf = build_searcher(
        corpus, SearchParams(mode="brute_force", num_neighbors=args.k), "dot_product", 0
    )
    bf_build = time.perf_counter() - start
    bf_s, (bf_rows, _) = best_of(
        lambda: bf.search_batched(queries, args.k, -1, -1, True, 256), args.repeats
    )
    bf_single = latencies(lambda q: bf.search(q, args.k, -1, -1), queries[: args.single_queries_bf])
    results["scann_brute_force"] = {
        "build_seconds": round(bf_build, 2),
        "batched_qps": round(args.queries / bf_s, 1),
        "recall": recall_at_k(ids[np.asarray(bf_rows, np.int64)], exact_ids),
        "single_query": bf_single,
    }
    print("ScaNN brute force:", results["scann_brute_force"])
    bf = None  # frees the searcher before the next build

    # The tuned tree + AH index.
    start = time.perf_counter()
    index = VectorIndex.build(
        corpus,
        ids,
        metric="dot_product",
        target_recall=args.target_recall,
        num_neighbors=args.k,
        tune_queries=tune_queries,
        seed=args.seed,
    )
    total_build = time.perf_counter() - start
    ah_s, (found, _) = best_of(lambda: index.search(queries, k=args.k), args.repeats)
    recall = recall_at_k(found, exact_ids)
    ah_single = latencies(lambda q: index.search(q, k=args.k), queries[: args.single_queries])
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = index.save(os.path.join(directory, "index"))
        save_s = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in path.iterdir())
        start = time.perf_counter()
        VectorIndex.load(path)
        load_s = time.perf_counter() - start
    report = index.manifest["recall"]
    results["vector_index"] = {
        "params": index.params.to_json(),
        "build_seconds": index.manifest["build_seconds"],
        "tune_seconds": report["tune_seconds"],
        "build_and_tune_seconds": round(total_build, 2),
        "tuned_recall": report["recall"],
        "recall": round(recall, 4),
        "batched_qps": round(args.queries / ah_s, 1),
        "single_query": ah_single,
        "save_seconds": round(save_s, 2),
        "load_seconds": round(load_s, 2),
        "bytes_on_disk": disk,
        "trials": report["trials"],
    }
    results["speedup_vs_scann_brute_force"] = {
        "batched": round(bf_s / ah_s, 1),
        "single_p50": round(bf_single["p50_ms"] / ah_single["p50_ms"], 1),
    }
    results["speedup_vs_numpy_brute_force"] = {"batched": round(numpy_s / ah_s, 1)}
    print("VectorIndex:", {k: v for k, v in results["vector_index"].items() if k != "trials"})
    print("tune trials (leaves_to_search, reorder_k, recall, queries/s on the tune set):")
    for trial in report["trials"]:
        print("  ", trial)
    print(
        "speedup vs ScaNN brute force:",
        results["speedup_vs_scann_brute_force"],
        "vs numpy:",
        results["speedup_vs_numpy_brute_force"],
    )
    target_met = (
        recall >= args.target_recall and results["speedup_vs_scann_brute_force"]["batched"] >= 10
    )
    print(
        f"target recall@{args.k} >= {args.target_recall} at >= 10x brute-force queries/s:",
        "MET" if target_met else "NOT MET",
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
