"""CPU time per call of the retrieval stage's score and top-K forms (one member query).

Command:
    .venv/bin/python bench/retrieve_cost.py                     # N=20,000 items, D=64, K=2,048
    .venv/bin/python bench/retrieve_cost.py --items 100000 --k 500

Random unit-scale item vectors [N, D] as the retrieval artifact holds them (int8 codes with
a float32 scale per row, or float32) and one query [1, D]. Times, per call, in rounds that
interleave the forms (process CPU ms, median of the rounds; the load average is printed:
compare CPU times on a shared machine):

- int8 scores: ``(q @ codes.astype(f32).T) * scales`` (what the served function computes)
- f32 scores: ``q @ values.T`` (the matrix dequantized once, as a version load could do)
- each of them followed by ``jax.lax.top_k`` (exact, in the jitted function)
- int8 scores, then ``np.argpartition`` + a sort of the K on the host
- int8 scores, then ``jax.lax.approx_max_k`` (on CPU: exact)

Nothing is written.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def host_top_k(scores_n: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [k], rows [k]) best first, as jax.lax.top_k orders them."""
    rows = np.argpartition(-scores_n, k - 1)[:k]
    rows = rows[np.argsort(-scores_n[rows], kind="stable")]
    return scores_n[rows], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--k", type=int, default=2_048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (args.items, args.dims)).astype(np.int8)
    scales = ((rng.random(args.items) + 0.5) / 127).astype(np.float32)
    query = rng.standard_normal((1, args.dims)).astype(np.float32)
    codes_d, scales_d, values_d = jax.device_put((codes, scales, codes * scales[:, None]))
    k = args.k

    int8_scores = jax.jit(lambda q, c, s: (q @ c.astype(jnp.float32).T) * s)
    f32_scores = jax.jit(lambda q, v: q @ v.T)
    int8_top = jax.jit(lambda q, c, s: jax.lax.top_k(int8_scores(q, c, s), k))
    f32_top = jax.jit(lambda q, v: jax.lax.top_k(q @ v.T, k))
    approx = jax.jit(lambda q, c, s: jax.lax.approx_max_k(int8_scores(q, c, s), k))
    forms = {
        "int8 scores": lambda: int8_scores(query, codes_d, scales_d),
        "f32 scores": lambda: f32_scores(query, values_d),
        "int8 scores + lax.top_k": lambda: int8_top(query, codes_d, scales_d),
        "f32 scores + lax.top_k": lambda: f32_top(query, values_d),
        "int8 scores + approx_max_k": lambda: approx(query, codes_d, scales_d),
        "int8 scores + np.argpartition": lambda: host_top_k(
            np.asarray(int8_scores(query, codes_d, scales_d))[0], k
        ),
    }
    exact = np.asarray(int8_top(query, codes_d, scales_d)[1])[0]
    for name in ("int8 scores + approx_max_k", "int8 scores + np.argpartition"):
        rows = np.asarray(forms[name]()[1]).reshape(-1)
        print(f"{name}: same rows in the same order as lax.top_k: {np.array_equal(rows, exact)}")
    cpu: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, form in forms.items():
            start = time.process_time()
            for _ in range(args.calls):
                jax.block_until_ready(form())
            cpu[name].append(1e3 * (time.process_time() - start) / args.calls)
    print(f"N={args.items} D={args.dims} K={k}, load {os.getloadavg()[0]:.1f}")
    for name, values in cpu.items():
        print(f"  {name:32s} {np.median(values):6.3f} CPU ms per call")


if __name__ == "__main__":
    main()
