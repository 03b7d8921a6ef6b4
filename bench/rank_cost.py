"""Where the served ranker's time goes: FLOPs per component and CPU time per call.

Command:
    .venv/bin/python bench/rank_cost.py                           # the demo's ranker
    .venv/bin/python bench/rank_cost.py --model.mlp_dims=256,128 --model.dcn_low_rank=0

Builds the demo config's feed ranker (configs/demo.py, section ``ranker.model``; override
its options with ``--model.<name>=value``) with random weights over 32-dim tables, then
reports for K candidates of one member: XLA's cost analysis (FLOPs) of each block of the
model run on K pairs (GateNet gates, dot interactions, MLP, cross network, heads), of the
served rank function as trained (every feature looked up per pair) and as served (member
side once per query, post side from the post cache, only the pair work per candidate:
folded_ranker.py; and a batch of 16 queries x K, which runs one query at a time), of the
post-cache function (run when a server loads a version), and
the median wall and process CPU time per call of each (one CPU device; the machine's
load average is printed beside them: compare CPU times on a shared machine). Nothing is
written.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.configuration import load_config
from lf_jax.models.ranker import FeedRanker
from lf_jax.serving.feed_features import FeatureLayout, pair_inputs
from lf_jax.serving.functions import (
    encode_table,
    posts_function,
    rank_function,
    ranker_probs,
    ranker_weights,
)

# feature: (table, combiner), the demo ranker's
FEATURES = {
    name: (spec.table, spec.combiner)
    for name, spec in load_config("demo").ranker.embedding.features.items()
}


def timed(fn, *args, repeats: int):
    """(median wall ms, median process CPU ms, GFLOP) of jitted ``fn(*args)``."""
    jitted = jax.jit(fn)
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(jitted(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(jitted(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 1e3 * np.median(wall), 1e3 * np.median(cpu), cost.get("flops", 0.0) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", default="int8", choices=("int8", "float32"))
    args, rest = parser.parse_known_args()
    options = load_config("demo").ranker.model.to_dict()
    for item in rest:
        name, value = item.removeprefix("--model.").split("=")
        old = options[name]
        options[name] = (
            tuple(int(v) for v in value.split(",") if v)
            if isinstance(old, (tuple, list))
            else (value.lower() == "true" if isinstance(old, bool) else type(old)(value))
        )
    k = args.candidates
    dims = {n: 8 if n == "position" else 32 for n in FEATURES}
    model = FeedRanker(
        field_dims=dims,
        num_dense=8,
        tasks=("like", "comment", "share", "long_dwell"),
        rngs=nnx.Rngs(0),
        **options,
    )
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    sizes = {"member": 2001, "post": 20001, "hashtag": 101, "position": 20}
    tables = {
        n: encode_table(rng.normal(0, 0.2, (v, 8 if n == "position" else 32)), args.dtype)
        for n, v in sizes.items()
    }
    weights = ranker_weights(
        graphdef,
        treedef,
        FEATURES,
        {
            "params": leaves,
            "tables": tables,
            "dense_mean": np.zeros(8, np.float32),
            "dense_std": np.ones(8, np.float32),
        },
    )
    layout = FeatureLayout(latent_dim=16, max_history=50, max_post_hashtags=5, prompt_length=40)
    member_qw = np.zeros((1, layout.width), np.float32)
    post_qkw = np.zeros((1, k, layout.width), np.float32)
    cols = layout.post_columns()
    post_qkw[0, :, cols["actor"][0]] = rng.integers(0, 2000, k)
    post_qkw[0, :, slice(*cols["hashtags"])] = rng.integers(-1, 100, (k, 5))
    member_qw[0, slice(*layout.member_columns()["history_actors"])] = rng.integers(0, 2000, 50)
    rows_q, rows_qk = np.array([7], np.int32), rng.integers(0, 20000, (1, k)).astype(np.int32)
    rows_16k = rng.integers(0, 20000, (16, k)).astype(np.int32)  # a 16-request batch

    def as_trained(w, m, p, mq, pqk):
        sparse, dense = pair_inputs(jnp, layout, m, p, mq, pqk)
        return ranker_probs(graphdef, treedef, FEATURES, w, sparse, dense)

    n = 20000
    post_nw = np.zeros((n, layout.width), np.float32)
    post_nw[:, cols["actor"][0]] = rng.integers(0, 2000, n)
    post_nw[:, slice(*cols["hashtags"])] = rng.integers(-1, 100, (n, 5))
    posts = jax.jit(posts_function(graphdef, treedef, FEATURES, layout))
    posts_nc = jax.block_until_ready(posts(weights, post_nw, np.arange(n, dtype=np.int32)))
    served = rank_function(graphdef, treedef, FEATURES, layout)
    chunk = 4096
    x = {n: jnp.asarray(rng.normal(size=(k, d)), jnp.float32) for n, d in dims.items()}
    dense = jnp.asarray(rng.normal(size=(k, 8)), jnp.float32)
    fields = [x[n] for n in model.sparse_fields]
    x0 = model.mlp.layers[0].in_features if len(model.mlp.layers) else None
    x0_bh = jnp.asarray(rng.normal(size=(k, x0 or 1)), jnp.float32)
    from lf_jax.models.interactions import pairwise_dots

    def blocks(fn):  # fn(model, *arrays), the model's weights passed as arguments
        return lambda p, *a: fn(nnx.merge(graphdef, p), *a)

    cases = [
        (
            "served rank, as trained (all per pair)",
            as_trained,
            (weights, member_qw, post_qkw, rows_q, rows_qk),
        ),
        (
            "served rank, split (post cache)",
            served,
            (weights, posts_nc, member_qw, rows_q, rows_qk),
        ),
        (
            "served rank, split, 16 queries (lax.map)",
            served,
            (weights, posts_nc, np.repeat(member_qw, 16, 0), np.repeat(rows_q, 16), rows_16k),
        ),
        (
            f"post cache of {chunk} posts (at load)",
            posts_function(graphdef, treedef, FEATURES, layout),
            (weights, post_nw[:chunk], np.arange(chunk, dtype=np.int32)),
        ),
        ("  model alone, per pair", blocks(lambda m, x, d: m(x, d)), (params, x, dense)),
    ]
    if model.gate is not None:
        cases.append(("  block: GateNet gates", blocks(lambda m, f: m.gate(f)), (params, fields)))
    if model.dot_interactions:
        cases.append(("  block: dot interactions", pairwise_dots, (fields,)))
    if x0:
        name = f"  block: MLP {x0}->{options['mlp_dims']}"
        cases.append((name, blocks(lambda m, h: m.mlp(h)), (params, x0_bh)))
    if model.cross is not None:
        rank = options["dcn_low_rank"] or "full"
        name = f"  block: cross x{len(model.cross.layers)} (rank {rank})"
        cases.append((name, blocks(lambda m, h: m.cross(h)), (params, x0_bh)))
    top = model.heads[0].out.in_features
    top_bh = jnp.asarray(rng.normal(size=(k, top)), jnp.float32)
    name = f"  block: {len(model.heads)} heads"
    cases.append((name, blocks(lambda m, h: [head(h) for head in m.heads]), (params, top_bh)))
    print(f"model options {options}; K={k}, {args.dtype} tables; load {os.getloadavg()}")
    print(f"{'what':<46}{'GFLOP':>8}{'wall ms':>9}{'CPU ms':>9}")
    for name, fn, fargs in cases:
        wall, cpu, gflop = timed(fn, *fargs, repeats=args.repeats)
        print(f"{name:<46}{gflop:>8.3f}{wall:>9.2f}{cpu:>9.2f}", flush=True)
    print(f"load {os.getloadavg()}; {os.cpu_count()} cores; jax {jax.__version__}")


if __name__ == "__main__":
    main()
