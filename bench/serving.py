"""Serving latency and throughput: a closed-loop load generator against `lf-jax serve`.

Command:
    .venv/bin/python bench/serving.py --synthetic /tmp/serving_bench      # builds, then serves
    .venv/bin/python bench/serving.py --artifacts runs/demo/serving --candidates 500

``--synthetic DIR`` writes an artifacts directory first (only when DIR has no CURRENT: use a
new DIR after changing the demo config): the demo's architectures (the feed ranker of
configs/demo.py: 32-dim tables, MLP 64-32 with hidden gates, 2 rank-16 cross layers; the
dual encoder's 2-layer 64-wide Llama over 40 prompt tokens) with random weights (latency
does not depend on their values) over a feed world of ``--posts`` posts, so that K = 2000
candidates exist (the tiny world has 1,000). ``--artifacts DIR`` uses an existing export.
The server runs in a subprocess on one CPU device. For each stage (retrieve, rank, feed),
each K and each client count, every client sends its next request when its last one is
answered (closed loop), for at most ``--requests`` requests per client or ``--seconds``.
Reports client-side p50/p99 latency (ms), requests/s, the server's stage timings (total: from
parsed request to answer built, so client minus total is HTTP, JSON and thread hand-offs) and
the CPU seconds the server process used per wall second; ``--json`` writes the figures.
"""

import argparse
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def build_synthetic(root: Path, members: int, posts: int, dtype: str) -> None:
    import jax
    from flax import nnx

    from lf_jax import feed_world
    from lf_jax.configuration import load_config
    from lf_jax.models.causal_lm import LlamaConfig
    from lf_jax.models.dual_encoder import DualEncoder
    from lf_jax.models.ranker import FeedRanker
    from lf_jax.serving.export import ranker_artifact, retrieval_artifact
    from lf_jax.serving.feature_store import FeatureStore
    from lf_jax.serving.feed_features import layout_for

    world = dataclasses.replace(
        feed_world.CONFIGS["tiny"], name="bench", num_members=members, num_posts=posts
    )
    rng = np.random.default_rng(0)
    prompt_length, vocab = 40, 640
    prompts = rng.integers(1, vocab, (members, prompt_length)).astype(np.float32)
    prompts[:, 30:] = -1
    layout = layout_for(world, prompt_length)
    version, out = "v0001", root / "versions" / "v0001"
    features = {  # feature: (table, combiner), the demo ranker's
        name: (spec.table, spec.combiner)
        for name, spec in load_config("demo").ranker.embedding.features.items()
    }
    sizes = {"member": members + 1, "post": posts + 1, "hashtag": world.num_hashtags + 1}
    tables = {n: rng.normal(0, 0.2, (v, 32)).astype(np.float32) for n, v in sizes.items()}
    tables["position"] = rng.normal(0, 0.2, (20, 8)).astype(np.float32)
    tasks = feed_world.TASKS
    ranker = FeedRanker(
        field_dims={n: tables[t].shape[1] for n, (t, _) in features.items()},
        num_dense=8,
        tasks=tasks,
        **load_config("demo").ranker.model.to_dict(),  # the demo's architecture
        rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(ranker)
    buckets = {"queries": (1, 16), "candidates": (512, 2048)}
    ranker_artifact(
        out / "ranker",
        graphdef=graphdef,
        params=params,
        tables=tables,
        features=features,
        dense_mean=np.zeros(8),
        dense_std=np.ones(8),
        tasks=tasks,
        task_weights={t: 1.0 for t in tasks},
        layout=layout,
        num_members=members,
        num_posts=posts,
        dtype=dtype,
        version=version,
        **buckets,
    )
    llama = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=prompt_length,
    )
    graphdef, params = nnx.split(DualEncoder(llama, rngs=nnx.Rngs(1)))
    items = rng.normal(size=(posts, 64)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    retrieval_artifact(
        out / "retrieval",
        graphdef=graphdef,
        params=params,
        items=items,
        item_keys=[f"p{i}" for i in range(posts)],
        num_members=members,
        layout=layout,
        pad_id=0,
        dtype=dtype,
        version=version,
        **buckets,
    )
    FeatureStore.write(root / "features", world, prompts, version=version, seed=0)
    (root / "CURRENT").write_text(version + "\n")
    del jax


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cell(port, stage, k, clients, requests, seconds, members, posts):
    latencies: list[list[float]] = [[] for _ in range(clients)]
    server_ms: list[dict] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def client(index):
        rng = np.random.default_rng(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(requests):
            if time.perf_counter() > deadline:
                break
            body = {"member_id": f"m{rng.integers(members)}"}
            if stage == "rank":
                body["post_ids"] = [f"p{i}" for i in rng.choice(posts, k, replace=False)]
                body["top_n"] = 10
            else:
                body["k"] = k
                if stage == "feed":
                    body["top_n"] = 10
            payload = json.dumps(body)
            start = time.perf_counter()
            conn.request("POST", f"/v1/{stage}", body=payload)
            response = conn.getresponse()
            data = response.read()
            latencies[index].append(1e3 * (time.perf_counter() - start))
            if response.status != 200:
                errors.append(data.decode()[:200])
            else:
                server_ms.append(json.loads(data)["timings_ms"])
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = [x for per in latencies for x in per]
    stages = {
        name: float(np.percentile([m[name] for m in server_ms], 50))
        for name in ("queue", "features", "retrieve", "rank", "total")
    }
    return {
        "stage": stage,
        "k": k,
        "clients": clients,
        "requests": len(flat),
        "errors": len(errors),
        "p50_ms": float(np.percentile(flat, 50)),
        "p99_ms": float(np.percentile(flat, 99)),
        "requests_per_s": len(flat) / wall,
        "wall_s": wall,
        "server_p50_ms": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifacts", help="an `lf-jax export --serving` directory")
    source.add_argument("--synthetic", help="build random-weight artifacts here first")
    parser.add_argument("--members", type=int, default=2_000)
    parser.add_argument("--posts", type=int, default=20_000)
    parser.add_argument("--dtype", default="int8", choices=("int8", "float32"))
    parser.add_argument("--candidates", default="500,2000")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--stages", default="retrieve,rank,feed")
    parser.add_argument("--requests", type=int, default=200, help="per client, at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="per cell, at most")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    root = Path(args.artifacts or args.synthetic)
    if args.synthetic and not (root / "CURRENT").exists():
        start = time.perf_counter()
        build_synthetic(root, args.members, args.posts, args.dtype)
        print(f"built {root} in {time.perf_counter() - start:.0f} s", flush=True)
    if not (root / "CURRENT").is_file() or not (root / "features" / "layout.json").is_file():
        parser.error(
            f"--artifacts {str(root)!r} holds no `lf-jax export --serving` output "
            "(CURRENT and features/layout.json)"
        )
    layout = json.loads((root / "features" / "layout.json").read_text())
    members, posts = layout["num_members"], layout["num_posts"]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lf_jax.cli",
            "--verbosity",
            "warning",
            "serve",
            "--artifacts",
            str(root),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        start = time.perf_counter()
        line = server.stdout.readline()
        if "http://" not in line:
            sys.exit(f"server did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        print(f"server up in {time.perf_counter() - start:.0f} s: {line.strip()}", flush=True)
        rows = []
        print(
            f"{'stage':<9}{'K':>6}{'clients':>8}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'req/s':>8}{'srv cpu/s':>10}  server p50 ms (queue/features/retrieve/rank/total)"
        )
        for stage in args.stages.split(","):
            for k in (int(v) for v in args.candidates.split(",")):
                for clients in (int(v) for v in args.clients.split(",")):
                    cpu = cpu_seconds(server.pid)
                    row = run_cell(
                        port, stage, k, clients, args.requests, args.seconds, members, posts
                    )
                    row["server_cpu_per_wall_s"] = (cpu_seconds(server.pid) - cpu) / row["wall_s"]
                    row["load_avg_1m"] = os.getloadavg()[0]
                    rows.append(row)
                    s = row["server_p50_ms"]
                    print(
                        f"{stage:<9}{k:>6}{clients:>8}{row['requests']:>6}{row['p50_ms']:>9.1f}"
                        f"{row['p99_ms']:>9.1f}{row['requests_per_s']:>8.1f}"
                        f"{row['server_cpu_per_wall_s']:>10.2f}  {s['queue']:.1f}/"
                        f"{s['features']:.1f}/{s['retrieve']:.1f}/{s['rank']:.1f}/{s['total']:.1f}"
                        f"{'  ERRORS ' + str(row['errors']) if row['errors'] else ''}",
                        flush=True,
                    )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/metrics")
        metrics = json.loads(conn.getresponse().read())
        print(
            f"compiles since warm-up: {metrics['compiles_since_warm_up']}; batch sizes "
            f"{metrics['batches']}; load average {os.getloadavg()}; {os.cpu_count()} cores"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "rows": rows,
                        "metrics": metrics,
                        "date": time.strftime("%Y-%m-%d %H:%M"),
                        "cpus": os.cpu_count(),
                    },
                    indent=2,
                )
            )
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
