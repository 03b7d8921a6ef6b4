"""``lf-jax demo``: the end-to-end tour on simulated CPU devices.

Stages: the mesh; the embedding plan of the tiny feed ranker; the synthetic feed logs
(built offline with tfds); a short training run of the ranker with IPS weights,
checkpoints and evaluation against the oracle AUC; a report of where files went.

Example:
    >>> from lf_jax.configuration import load_config
    >>> run_demo(load_config("configs/demo.py"), "runs/demo")
"""

from pathlib import Path
import time

import ml_collections

from lf_jax.console import get_logger
from lf_jax.distributed.mesh import describe_mesh, make_mesh


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def run_demo(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs every demo stage, printing a short report; returns the figures it printed."""
    from lf_jax.train.loop import build_task, prepare_workdir, run_training
    workdir = Path(workdir)
    start = time.perf_counter()
    _section("1. device mesh")
    mesh = make_mesh(dict(config.mesh))
    print(describe_mesh(mesh))
    print(mesh.devices)

    _section("2. synthetic feed logs + embedding plan (tiny feed ranker)")
    ranker_config = config.ranker
    if not ranker_config.data.data_dir:
        with ranker_config.unlocked():
            ranker_config.data.data_dir = str((workdir / "tfds").resolve())
    ranker_dir = prepare_workdir(workdir / "ranker", ranker_config)
    task = build_task(ranker_config, ranker_dir)
    meta = task.meta
    print(f"dataset feed_logs/{meta['config']} in {meta['data_dir']}: "
          + ", ".join(f"{split} {count:,}" for split, count in meta["num_examples"].items())
          + f" impressions; {meta['num_members']:,} members, {meta['num_hashtags']:,} hashtags")
    print("(the embedding plan is logged above: member and post by hand, the rest by the planner)")

    _section(f"3. train the ranker ({ranker_config.train.steps} steps, batch "
             f"{ranker_config.batch_size}, IPS {'on' if ranker_config.train.ips else 'off'})")
    metrics = run_training(task, ranker_config.train, ranker_dir)
    print(f"{'split':<16}{'task':<12}{'auc':>8}{'oracle':>8}{'ne':>8}{'calib':>8}")
    for split in ("holdout_ranked", "holdout_random"):
        for name in task.tasks:
            key = f"{split}/{name}"
            print(f"{split:<16}{name:<12}{metrics[key + '/auc']:>8.3f}{metrics[key + '/oracle_auc']:>8.3f}"
                  f"{metrics[key + '/ne']:>8.3f}{metrics[key + '/calibration']:>8.3f}")

    _section("4. where things went")
    for name, what in (("ranker/plan.json", "embedding plan"),
                       ("ranker/ips_weights.json", "IPS weights per position and task"),
                       ("ranker/checkpoints", "Orbax checkpoints (logical tables, any mesh)"),
                       ("ranker/tensorboard", "TensorBoard event files"),
                       ("ranker/history.jsonl", "loss and eval history"),
                       ("tfds", "the feed_logs dataset (array_record)")):
        path = workdir / name
        if path.exists():
            print(f"  {str(path.resolve()):<60} {what}")
    elapsed = time.perf_counter() - start
    print(f"\ndemo finished in {elapsed:.0f}s")
    get_logger().info("demo done")
    return {"mesh": dict(mesh.shape), "metrics": metrics, "seconds": elapsed}
