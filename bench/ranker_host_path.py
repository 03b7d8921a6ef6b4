"""Host-side cost of one feed ranker training step, stage by stage (no device compute).

For each batch size, on random train indices of a built feed_logs/tiny (one process, one
CPU device, nothing else running in this process):

  read raw            array_record __getitems__ of the serialized records
  tfds read+decode    tfds's __getitems__ (read + per-example decoding) + collate: the
                      pipeline's batch read before RecordBatchDecoder
  read+batch decode   read raw + RecordBatchDecoder: the pipeline's batch read now
  model_inputs  RankerTask.model_inputs: id validation/padding, labels, IPS weights
  device_batch  RankerTask.device_batch: model_inputs + one device_put per field

Each figure is examples/s of the median of --repeats timed calls after one warm-up call.

Usage:
    .venv/bin/python bench/ranker_host_path.py --data-dir /tmp/tfds_rb --batch-sizes 512,4096
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lf_jax.configuration import load_config  # noqa: E402
from lf_jax.input import collate  # noqa: E402
from lf_jax.input.record_decoding import RecordBatchDecoder  # noqa: E402
from lf_jax.train.loop import build_task, prepare_workdir  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", required=True, help="feed_logs/tiny is built there when absent"
    )
    parser.add_argument("--batch-sizes", default="512,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/ranker_host_path")
    args = parser.parse_args()
    config = load_config("configs/feed_ranker.py:size=tiny")
    with config.unlocked():
        config.data.data_dir, config.devices = args.data_dir, 1
        config.mesh.data, config.mesh.model = 1, 1
        config.embedding.memory_budget_bytes = 4_000_000_000  # batch 4096 on one device
    task = build_task(config, prepare_workdir(args.workdir, config))
    source = task.builder.as_data_source("train")
    lengths = task._list_lengths()
    decoder = RecordBatchDecoder(task.builder.info.features, lengths)
    results = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        indices = [
            int(i) for i in np.random.default_rng(0).choice(len(source), batch_size, replace=False)
        ]
        host = decoder(source.data_source.__getitems__(indices))
        seconds = {
            "read raw": timed(
                lambda indices=indices: source.data_source.__getitems__(indices), args.repeats
            ),
            "tfds read+decode": timed(
                lambda indices=indices: collate(source.__getitems__(indices), lengths),
                args.repeats,
            ),
            "read+batch decode": timed(
                lambda indices=indices: decoder(source.data_source.__getitems__(indices)),
                args.repeats,
            ),
            "model_inputs": timed(lambda host=host: task.model_inputs(host), args.repeats),
            "device_batch": timed(lambda host=host: task.device_batch(host), args.repeats),
        }
        results[batch_size] = {name: batch_size / s for name, s in seconds.items()}
        print(
            f"batch {batch_size:>6,}: "
            + ", ".join(f"{name} {rate:,.0f} ex/s" for name, rate in results[batch_size].items()),
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
