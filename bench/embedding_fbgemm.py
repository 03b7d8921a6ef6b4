"""FBGEMM's fused CPU TBE (row-wise Adagrad) on the same batches as bench/embedding.py.

Runs under a separate torch venv (torch 2.13.0 CPU + fbgemm-gpu-cpu 1.8.0; see
bench/BENCHMARKS_embedding.md for how it was built). One step = forward of
SplitTableBatchedEmbeddingBagsCodegen (EmbeddingLocation.HOST, ComputeDevice.CPU,
OptimType.EXACT_ROWWISE_ADAGRAD, sum pooling) + the same tiny dense loss + backward,
whose fused kernel applies the optimizer in place. Prints one JSON line.

Usage:
    /tmp/fbgemm-venv/bin/python bench/embedding_fbgemm.py --num-tables 8 --vocab 1e6 \
        --dist zipf --steps 20 --output /tmp/fbgemm.json
    (bench/embedding.py passes --config '{...}' with the same keys instead.)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedding import LEARNING_RATE, host_batches, mem_status, reset_peak, summarize_times  # noqa: E402


def run(cfg: dict) -> dict:
    import fbgemm_gpu
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    num_tables, batch, dim = cfg["num_tables"], cfg["batch"], cfg["dim"]
    batches = []
    for raw in host_batches(cfg):
        ids_tbl = np.stack([raw[f"f{t}"] for t in range(num_tables)])  # [T, B, L], -1 pad
        lengths = (ids_tbl >= 0).sum(-1).reshape(-1)  # table-major
        indices = ids_tbl[ids_tbl >= 0]  # row-major = same order
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        batches.append(
            (torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(offsets.astype(np.int64)))
        )
    r_d = torch.from_numpy(np.random.default_rng(1).normal(size=dim).astype(np.float32))

    reset_peak()
    rss0 = mem_status()["VmRSS"]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(cfg["vocab"], dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * num_tables,
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LEARNING_RATE,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
    )
    scale = 3**0.5 / dim**0.5  # uniform with the std of lf_jax's normal(0, 1/sqrt(dim))
    with torch.no_grad():
        tbe.init_embedding_weights_uniform(-scale, scale)
    after_init = mem_status()

    def step(indices, offsets):
        out_bk = tbe(indices, offsets)  # [B, T * D]
        loss = (out_bk.view(batch, num_tables, dim) @ r_d).square().mean(0).sum()
        loss.backward()  # fused update
        return loss

    for i in range(cfg["warmup"]):
        step(*batches[i % len(batches)])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(*batches[0])
    ops = sorted({e.key for e in prof.key_averages() if "fbgemm" in e.key})
    reset_peak()
    rss_before_steps = mem_status()["VmRSS"]
    times, cpu = [], []
    for i in range(cfg["steps"]):
        indices, offsets = batches[(cfg["warmup"] + i) % len(batches)]
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step(indices, offsets)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    after = mem_status()
    table_bytes = num_tables * cfg["vocab"] * dim * 4
    return {
        **summarize_times(times, batch, cpu),
        "loss": float(loss.detach()),
        "torch": torch.__version__,
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "fbgemm_ops_in_step": ops,
        "table_bytes": table_bytes,
        "slot_bytes": num_tables * cfg["vocab"] * 4,
        "rss_base": rss0,
        "init_peak_increase": after_init["VmHWM"] - rss0,
        "rss_before_steps": rss_before_steps,
        "step_peak_rss": after["VmHWM"],
        "step_peak_increase": after["VmHWM"] - rss0,
        "step_transient": after["VmHWM"] - rss_before_steps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON config from bench/embedding.py (overrides flags)")
    parser.add_argument("--num-tables", type=int, default=8)
    parser.add_argument("--vocab", default="1e6")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--max-ids", type=int, default=20)
    parser.add_argument("--dist", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    cfg = (
        json.loads(args.config)
        if args.config
        else {
            "num_tables": args.num_tables,
            "vocab": int(float(args.vocab)),
            "dim": args.dim,
            "batch": args.batch,
            "max_ids": args.max_ids,
            "dist": args.dist,
            "steps": args.steps,
            "warmup": args.warmup,
            "num_batches": args.num_batches,
            "seed": args.seed,
            "threads": args.threads,
        }
    )
    result = {"config": cfg, **run(cfg)}
    text = json.dumps(result)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
