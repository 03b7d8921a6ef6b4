"""``lf-jax demo``: the end-to-end tour on simulated CPU devices.

Stages: the mesh; the synthetic feed logs and the tiny feed ranker's embedding plan; a
short ranker run (IPS weights, checkpoints, AUC against the oracle); a short dual
encoder run (tiny Llama, Matryoshka InfoNCE, recall@10 per dim against popularity);
export of the dual encoder's items to a ScaNN index + KV store and of its members to a KV
store; serving: the export of serving artifacts and the feature store, then `lf-jax serve`'s
HTTP API (dual encoder -> exact top K -> ranker -> top N) for a few members, with what
each stage buys in true engagement and the latency; a report of where
files went, with PNG plots (loss curves, recall by Matryoshka dim).

Example:
    >>> from lf_jax.configuration import load_config
    >>> run_demo(load_config("configs/demo.py"), "runs/demo")
"""

import time
from pathlib import Path

import ml_collections
import numpy as np

from lf_jax.console import get_logger
from lf_jax.distributed.mesh import describe_mesh, make_mesh


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _with_data_dir(config, workdir: Path):
    if not config.data.data_dir:
        with config.unlocked():
            config.data.data_dir = str((workdir / "tfds").resolve())
    return config


def _train_ranker(config, workdir: Path) -> dict:
    from lf_jax.train.loop import build_task, prepare_workdir, run_training

    ranker_dir = prepare_workdir(workdir / "ranker", config)
    task = build_task(config, ranker_dir)
    meta = task.meta
    print(
        f"dataset feed_logs/{meta['config']} in {meta['data_dir']}: "
        + ", ".join(f"{split} {count:,}" for split, count in meta["num_examples"].items())
        + f" impressions; {meta['num_members']:,} members, {meta['num_posts']:,} posts, "
        f"{meta['num_hashtags']:,} hashtags"
    )
    print("embedding plan (member and post by hand, the rest by the planner):")
    print(task.plan_table)
    _section(
        f"3. train the feed ranker ({config.train.steps} steps, batch {config.batch_size}, "
        f"IPS {'on' if config.train.ips else 'off'})"
    )
    metrics = run_training(task, config.train, ranker_dir)
    print(f"{'split':<16}{'task':<12}{'auc':>8}{'oracle':>8}{'ne':>8}{'calib':>8}")
    for split in ("holdout_ranked", "holdout_random"):
        for name in task.tasks:
            key = f"{split}/{name}"
            print(
                f"{split:<16}{name:<12}{metrics[key + '/auc']:>8.3f}"
                f"{metrics[key + '/oracle_auc']:>8.3f}"
                f"{metrics[key + '/ne']:>8.3f}{metrics[key + '/calibration']:>8.3f}"
            )
    return metrics


def _train_encoder(config, workdir: Path) -> tuple[dict, Path]:
    from lf_jax.train.loop import build_task, prepare_workdir, run_training

    encoder_dir = prepare_workdir(workdir / "dual_encoder", config)
    task = build_task(config, encoder_dir)
    metrics = run_training(task, config.train, encoder_dir)
    k = int(config.eval.recall_k)
    dims = [int(d) for d in config.loss.matryoshka_dims]
    print(f"recall@{k} of held-out member->item pairs over {len(task.entities['item']):,} items:")
    print("  " + "".join(f"{'dim ' + str(d):>10}" for d in dims) + f"{'popularity':>12}")
    print(
        "  "
        + "".join(f"{metrics[f'recall@{k}/dim{d}']:>10.3f}" for d in dims)
        + f"{metrics[f'recall@{k}/popularity']:>12.3f}"
    )
    return metrics, encoder_dir


def _export(config, encoder_dir: Path, workdir: Path) -> tuple[object, dict]:
    from lf_jax.export.embed_corpus import export_corpus, open_source

    source = open_source(config.dual_encoder, encoder_dir)
    manifests = {}
    for entity, index in (("items", True), ("members", False)):
        result = export_corpus(
            source,
            entity,
            workdir / "export" / entity,
            build_index=index,
            build_kv=True,
            target_recall=config.export.target_recall,
        )
        m = result.manifest
        manifests[entity] = m
        extra = (
            f"; ScaNN {m['index']['mode']} recall@{m['index']['k']} = {m['index']['recall']:.3f}"
            if "index" in m
            else ""
        )
        print(
            f"  {entity:<8} {m['count']:>6,} x {m['dims']} ({m['metric']}) in "
            f"{m['embed_seconds']:.1f} s; "
            f"KV int8 {m['kv']['bytes_on_disk']:,} bytes, cosine to float "
            f"{m['kv']['quantization']['cosine_mean']:.5f}{extra}"
        )
    return source, manifests


def _post(port: int, path: str, body: dict) -> dict:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", path, body=json.dumps(body))
    response = conn.getresponse()
    out = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path} {body}: {response.status} {out}")
    return out


def _true_value(world, store, member: str, posts: list[str], weights: np.ndarray) -> np.ndarray:
    """The world's true engagement (weighted task probabilities) of ``posts`` for ``member``,
    at the post ages the feature store serves (evaluation only)."""
    from lf_jax import feed_world

    _, rows = store.read([], posts)
    start, _ = store.layout.post_columns()["log_age"]
    post = np.array([int(p[1:]) for p in posts])
    member_n = np.full(len(post), int(member[1:]))
    aff = feed_world.affinities(
        world,
        member_n,
        world.post_actor[post],
        world.post_root_actor[post],
        world.post_hashtags[post],
    )
    logits = feed_world.relevance_logits(world, member_n, post, aff, rows[:, start])
    return (1.0 / (1.0 + np.exp(-logits))) @ weights


def _serve(config, workdir: Path) -> dict:
    import concurrent.futures

    from lf_jax import feed_world
    from lf_jax.serving.export_serving import export_serving
    from lf_jax.serving.server import serve_in_thread
    from lf_jax.serving.service import Service

    serving = config.serving
    k, n, members = int(serving.num_candidates), int(serving.top_n), list(serving.members)
    exported = export_serving(
        config, workdir, workdir / "serving", queries=(1, len(members)), candidates=(k,)
    )
    ranker = exported["manifests"]["ranker"]
    aucs = ranker["quality"]["holdout_random_auc"]
    print(
        f"artifacts {exported['directory']}: "
        + ", ".join(f"{m} {b:,} bytes" for m, b in exported["bytes"].items())
        + f" (int8 tables; holdout_random AUC float32 {aucs['float32']['mean']:.4f}, "
        f"int8 {aucs['int8']['mean']:.4f})"
    )
    service = Service(workdir / "serving")
    port, stop = serve_in_thread(service)
    print(f"serving version {service.current.name} on http://127.0.0.1:{port} (one CPU device)")
    try:
        feeds = {m: _post(port, "/v1/feed", {"member_id": m, "k": k, "top_n": n}) for m in members}
        latency = {}
        single = [
            _post(port, "/v1/feed", {"member_id": members[0], "k": k, "top_n": n}) for _ in range(5)
        ]
        latency["single"] = float(np.median([r["timings_ms"]["total"] for r in single]))
        with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
            batched = list(
                pool.map(
                    lambda m: _post(port, "/v1/feed", {"member_id": m, "k": k, "top_n": n}),
                    members,
                )
            )
        latency["batched"] = float(max(r["timings_ms"]["total"] for r in batched))
        candidates = {m: _post(port, "/v1/retrieve", {"member_id": m, "k": k}) for m in members}
    finally:
        stop()
    world = feed_world.make_world(feed_world.CONFIGS[config.ranker.data.config])
    weights = service.current.task_weights
    rng = np.random.default_rng(config.seed)
    value: dict[str, list[float]] = {}
    for m in members:
        retrieved = candidates[m]["post_ids"]
        truth = _true_value(world, service.store, m, retrieved, weights)
        random_posts = [f"p{i}" for i in rng.choice(world.post_actor.size, n, replace=False)]
        for name, number in (
            ("random posts", _true_value(world, service.store, m, random_posts, weights).mean()),
            (f"dual encoder top {n} (retrieval order)", truth[:n].mean()),
            (
                f"two-stage top {n} (ranker over {k})",
                _true_value(world, service.store, m, feeds[m]["post_ids"], weights).mean(),
            ),
            (f"best {n} of the {k} (oracle)", np.sort(truth)[-n:].mean()),
        ):
            value.setdefault(name, []).append(float(number))
    service.close()
    first = feeds[members[0]]
    print(f"member {members[0]}: top {n} of {first['num_candidates']} candidates")
    tasks = list(first["task_probs"])
    print(f"  {'post':<8}{'score':>8}{'retrieval':>11}" + "".join(f"{t:>12}" for t in tasks))
    for i, post in enumerate(first["post_ids"]):
        print(
            f"  {post:<8}{first['scores'][i]:>8.3f}{first['retrieval_scores'][i]:>11.3f}"
            + "".join(f"{first['task_probs'][t][i]:>12.3f}" for t in tasks)
        )
    print(
        f"true engagement (weighted sum of the world's true probabilities), mean over "
        f"{len(members)} members:"
    )
    means = {name: float(np.mean(v)) for name, v in value.items()}
    for name, number in means.items():
        print(f"  {name:<40}{number:>8.4f}")
    stages = ", ".join(f"{key} {ms:.1f}" for key, ms in single[-1]["timings_ms"].items())
    print(
        f"latency for K={k}: single query {latency['single']:.1f} ms (median of 5), "
        f"{len(members)} concurrent requests {latency['batched']:.1f} ms (slowest; batched "
        f"by the server); last single request's stages in ms: {stages}"
    )
    return {"value": means, "latency_ms": latency, "artifacts": exported["directory"]}


def run_demo(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs every demo stage, printing a short report; returns the figures it printed."""
    from lf_jax.report_plots import loss_curves_png, recall_by_dim_png

    workdir = Path(workdir)
    start = time.perf_counter()
    _section("1. device mesh")
    mesh = make_mesh(dict(config.mesh))
    print(describe_mesh(mesh))
    print(mesh.devices)

    _section("2. synthetic feed logs + embedding plan (tiny feed ranker)")
    ranker_metrics = _train_ranker(_with_data_dir(config.ranker, workdir), workdir)
    encoder_config = _with_data_dir(config.dual_encoder, workdir)
    _section(
        f"4. train the dual encoder (tiny Llama, {encoder_config.train.steps} steps, batch "
        f"{encoder_config.batch_size}, Matryoshka dims "
        f"{tuple(encoder_config.loss.matryoshka_dims)})"
    )
    encoder_metrics, encoder_dir = _train_encoder(encoder_config, workdir)

    _section("5. export: dual encoder items -> ScaNN index + KV store, members -> KV store")
    encoder_source, manifests = _export(config, encoder_dir, workdir)

    _section("6. serving: export artifacts, lf-jax serve, retrieve top K -> rank -> top N")
    served = _serve(config, workdir)

    _section("7. where things went")
    k = int(encoder_config.eval.recall_k)
    dims = [int(d) for d in encoder_config.loss.matryoshka_dims]
    plots = {
        "loss_curves.png": loss_curves_png(
            {
                "feed ranker": workdir / "ranker" / "history.jsonl",
                "dual encoder": encoder_dir / "history.jsonl",
            },
            workdir / "loss_curves.png",
        ),
        "recall_by_dim.png": recall_by_dim_png(
            {d: encoder_metrics[f"recall@{k}/dim{d}"] for d in dims},
            workdir / "recall_by_dim.png",
            k=k,
            baseline=("popularity", encoder_metrics[f"recall@{k}/popularity"]),
        ),
    }
    for name, what in (
        ("ranker/plan.json", "embedding plan of the ranker"),
        ("ranker/checkpoints", "ranker checkpoints (Orbax; logical tables, any mesh)"),
        ("ranker/history.jsonl", "ranker loss and eval history (also tensorboard/)"),
        ("dual_encoder/checkpoints", "dual encoder checkpoints"),
        ("dual_encoder/tokenizer.json", "the dual encoder's word-level tokenizer"),
        ("export/items", "item vectors + ids + manifest, index/ (ScaNN), kv/ (LMDB)"),
        ("export/members", "member vectors + ids + manifest, kv/ (LMDB)"),
        ("serving", "serving artifacts (versions/, CURRENT) and the feature store (features/)"),
        ("loss_curves.png", "training loss of both models"),
        ("recall_by_dim.png", "recall@10 by Matryoshka dimension"),
        ("tfds", "the feed_logs and member_items datasets (array_record)"),
    ):
        path = workdir / name
        if path.exists():
            print(f"  {str(path.resolve()):<60} {what}")
    elapsed = time.perf_counter() - start
    print(f"\ndemo finished in {elapsed:.0f}s")
    get_logger().info("demo done")
    encoder_source.close()
    return {
        "mesh": dict(mesh.shape),
        "metrics": ranker_metrics,
        "encoder_metrics": encoder_metrics,
        "exports": manifests,
        "serving": served,
        "plots": plots,
        "seconds": elapsed,
    }
