"""``lf-jax demo``: the end-to-end tour on simulated CPU devices.

Stages: the mesh; the synthetic feed logs and the tiny feed ranker's embedding plan; a
short ranker run (IPS weights, checkpoints, AUC against the oracle); a short dual
encoder run (tiny Llama, Matryoshka InfoNCE, recall@10 per dim against popularity);
export of the dual encoder's items to a ScaNN index + KV store and of its members to a KV
store; two-stage serving (dual encoder -> ScaNN top K -> ranker -> top N) for a few
members, with what each stage buys in true engagement and the latency; a report of where
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


def _serve(config, encoder_source, workdir: Path) -> dict:
    from lf_jax.export.embed_corpus import open_source
    from lf_jax.export.scann_index import VectorIndex
    from lf_jax.export.two_stage import (
        FeedWorldFeatures,
        RankerScorer,
        TwoStageService,
        dual_encoder_queries,
    )

    ranker_source = open_source(config.ranker, workdir / "ranker")
    features = FeedWorldFeatures(config.ranker.data.config, seed=config.seed)
    serving = config.serving
    service = TwoStageService(
        dual_encoder_queries(encoder_source),
        VectorIndex.load(workdir / "export" / "items" / "index"),
        RankerScorer(ranker_source),
        features,
        num_candidates=serving.num_candidates,
        top_n=serving.top_n,
        task_weights=dict(serving.task_weights),
    )
    members = list(serving.members)
    service.serve(members)  # compiles the ranker's shapes
    latency = {}
    for name, ids in (("single", members[:1]), ("batched", members)):
        totals = []
        for _ in range(5):
            service.serve(ids)
            totals.append(service.timings["total_ms"])
        latency[name] = float(np.median(totals))
    results, batch = service.serve(members), service.last_batch
    k, n = service.num_candidates, service.top_n
    weights = service.weights_t
    truth = features.true_relevance(batch) @ weights  # [Q*K]
    rng = np.random.default_rng(config.seed)
    random_batch = features.batch(
        np.array([int(m[1:]) for m in members]),
        rng.integers(0, features.num_posts, (len(members), n)),
    )
    value = {"random posts": float(np.mean(features.true_relevance(random_batch) @ weights))}
    per_member = [truth[q * k : (q + 1) * k] for q in range(len(members))]
    value[f"dual encoder top {n} (retrieval order)"] = float(
        np.mean([t[:n].mean() for t in per_member])
    )
    value[f"two-stage top {n} (ranker over {k})"] = float(
        np.mean([t[r.rows].mean() for t, r in zip(per_member, results, strict=False)])
    )
    value[f"best {n} of the {k} (oracle)"] = float(
        np.mean([np.sort(t)[-n:].mean() for t in per_member])
    )
    first = results[0]
    print(f"member {first.member_id}: top {n} of {first.num_candidates} candidates")
    print(
        f"  {'post':<8}{'score':>8}{'retrieval':>11}"
        + "".join(f"{t:>12}" for t in first.task_probs)
    )
    for i, post in enumerate(first.post_ids):
        print(
            f"  {post:<8}{first.score[i]:>8.3f}{first.retrieval_score[i]:>11.3f}"
            + "".join(f"{p[i]:>12.3f}" for p in first.task_probs.values())
        )
    print(
        f"true engagement (weighted sum of the world's true probabilities), mean over "
        f"{len(members)} members:"
    )
    for name, number in value.items():
        print(f"  {name:<40}{number:>8.4f}")
    stages = ", ".join(
        f"{key[:-3]} {ms:.1f}" for key, ms in service.timings.items() if key != "total_ms"
    )
    print(
        f"latency for K={k}: single query {latency['single']:.0f} ms, batch of {len(members)} "
        f"{latency['batched']:.0f} ms (median of 5; last call's stages in ms: {stages})"
    )
    ranker_source.close()
    return {"value": value, "latency_ms": latency}


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

    _section("6. two-stage serving: dual encoder -> ScaNN top K -> feed ranker -> top N")
    served = _serve(config, encoder_source, workdir)

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
