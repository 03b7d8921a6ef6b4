"""Feed ranker ablations on the tiny feed_logs dataset, one `lf-jax train` subprocess each.

Every variant runs ``lf-jax train --config configs/feed_ranker.py:size=tiny`` with CI=true in
its own workdir ``<root>/<variant>``, strictly one after another (never in parallel), then
this script reads the workdir's metrics.json, history.jsonl and config.json and prints +
writes a markdown table (``<root>/ranker_table.md``) and the raw numbers
(``<root>/ranker_results.json``).

Variants (same seed; quality variants run the config's steps, 800 on tiny, with one
evaluation at the end unless a variant names its own step count):

  baseline        defaults: IPS on, GateNet on, DCNv2 2 layers full rank, batch 512
  ips_off         --config.train.ips=false
  ips_positives   --config.train.ips_target=positives (weights on the responses only)
  gatenet_off     --config.model.gatenet=false --config.model.hidden_gates=false
  dcn_off         --config.model.dcn_layers=0
  dcn_lowrank8    --config.model.dcn_low_rank=8
  baseline_s1     baseline with --config.seed=1 --config.data.seed=2 (run-to-run noise)
  ips_off_s1      ips_off with the same second seed
  small_b256      gradient accumulation study, 400 steps: batch 256, no accumulation
  accum5_b1280    400 steps of 5 accumulated micro-batches of 256 (batch 1280): the same
                  micro-batch (memory per step) as small_b256, 5x the examples per update
  accum5_eq       80 steps of 5 x 256: the examples of small_b256 in 5x fewer updates
  unlogged        baseline on the tiny_unlogged data (--config.data.config=tiny_unlogged:
                  the old ranker also saw a relevance term the logs lack)
  unlogged_ips_off, unlogged_ips_positives   the same with IPS off / on responses only
  tput_8dev       throughput only: default 8 simulated CPU devices (mesh data=2 x model=4),
                  steps=100, no eval, log every 10 steps
  tput_1dev       the same on --devices cpu:1 --config.mesh.data=1 --config.mesh.model=1
  tput_8dev_w2, tput_1dev_w2   the same with --config.data.worker_count=2 (batches decoded
                  in 2 grain worker processes instead of threads of the training process)

Wall time is the whole subprocess (jax start, dataset open, IPS table, compile, 600 steps,
checkpoints, eval). Training throughput is the median examples_per_second of the last half
of the history.jsonl log rows (each row averages the steps since the previous row).

Usage:
    .venv/bin/python bench/ranker_experiments.py --root /tmp/ranker_bench
    .venv/bin/python bench/ranker_experiments.py --root /tmp/ranker_bench --variants
    baseline,ips_off
    .venv/bin/python bench/ranker_experiments.py --root /tmp/ranker_bench --reuse   # skip finished
    .venv/bin/python bench/ranker_experiments.py --root /tmp/ranker_bench --table-only
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LF_JAX = [str(Path(PYTHON).parent / "lf-jax")]  # the venv's `lf-jax` console script
TASKS = ("like", "comment", "share", "long_dwell")
HOLDOUTS = ("holdout_random", "holdout_ranked")
SEED1 = ["--config.seed=1", "--config.data.seed=2"]
ACCUM5 = ["--config.batch_size=1280", "--config.train.grad_accum_steps=5"]
UNLOGGED = ["--config.data.config=tiny_unlogged"]
ONE_DEVICE = ["--devices", "cpu:1", "--config.mesh.data=1", "--config.mesh.model=1"]

# name -> (description, extra CLI arguments, kind, steps or None for --steps)
# kind: "quality" (evaluated at the end) or "throughput"
VARIANTS = {
    "baseline": ("IPS on, GateNet on, DCNv2 2x full rank, batch 512", [], "quality", None),
    "ips_off": ("IPS off", ["--config.train.ips=false"], "quality", None),
    "ips_positives": (
        "IPS weights on responses only",
        ["--config.train.ips_target=positives"],
        "quality",
        None,
    ),
    "gatenet_off": (
        "GateNet off (embedding + hidden gates)",
        ["--config.model.gatenet=false", "--config.model.hidden_gates=false"],
        "quality",
        None,
    ),
    "dcn_off": ("DCNv2 off", ["--config.model.dcn_layers=0"], "quality", None),
    "dcn_lowrank8": ("DCNv2 low rank 8", ["--config.model.dcn_low_rank=8"], "quality", None),
    "baseline_s1": ("baseline, seed=1 data.seed=2", SEED1, "quality", None),
    "ips_off_s1": (
        "IPS off, seed=1 data.seed=2",
        ["--config.train.ips=false", *SEED1],
        "quality",
        None,
    ),
    "small_b256": (
        "batch 256, no accumulation, 400 steps",
        ["--config.batch_size=256"],
        "quality",
        400,
    ),
    "accum5_b1280": ("5 accumulated micro-batches of 256, 400 steps", ACCUM5, "quality", 400),
    "accum5_eq": (
        "5 accumulated micro-batches of 256, 80 steps (small_b256's examples)",
        ACCUM5,
        "quality",
        80,
    ),
    "unlogged": ("tiny_unlogged data, IPS on (every ranked impression)", UNLOGGED, "quality", None),
    "unlogged_ips_off": (
        "tiny_unlogged data, IPS off",
        [*UNLOGGED, "--config.train.ips=false"],
        "quality",
        None,
    ),
    "unlogged_ips_positives": (
        "tiny_unlogged data, IPS weights on responses only",
        [*UNLOGGED, "--config.train.ips_target=positives"],
        "quality",
        None,
    ),
    "tput_8dev": ("throughput, 8 simulated CPU devices (data=2 x model=4)", [], "throughput", None),
    "tput_1dev": ("throughput, 1 CPU device (data=1 x model=1)", ONE_DEVICE, "throughput", None),
    "tput_8dev_w2": (
        "throughput, 8 simulated CPU devices, 2 grain worker processes",
        ["--config.data.worker_count=2"],
        "throughput",
        None,
    ),
    "tput_1dev_w2": (
        "throughput, 1 CPU device, 2 grain worker processes",
        [*ONE_DEVICE, "--config.data.worker_count=2"],
        "throughput",
        None,
    ),
}
DEFAULT_ORDER = (
    "baseline",
    "ips_off",
    "ips_positives",
    "gatenet_off",
    "dcn_off",
    "dcn_lowrank8",
    "baseline_s1",
    "ips_off_s1",
    "small_b256",
    "accum5_b1280",
    "accum5_eq",
    "unlogged",
    "unlogged_ips_off",
    "unlogged_ips_positives",
    "tput_8dev",
    "tput_1dev",
    "tput_8dev_w2",
    "tput_1dev_w2",
)


def command(name: str, workdir: Path, data_dir: str, steps: int, tput_steps: int) -> list[str]:
    _, extra, kind, own_steps = VARIANTS[name]
    base = [
        *LF_JAX,
        "train",
        "--config",
        "configs/feed_ranker.py:size=tiny",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
    ]
    if kind == "quality":
        steps = own_steps or steps
        base += [
            f"--config.train.steps={steps}",
            f"--config.train.eval_every={steps}",
            f"--config.train.checkpoint_every={steps}",
        ]
    else:
        base += [
            f"--config.train.steps={tput_steps}",
            "--config.train.eval_every=0",
            "--config.train.log_every=10",
            f"--config.train.checkpoint_every={tput_steps}",
        ]
    return base + list(extra)


def prebuild(data_dir: str, data_config: str = "tiny") -> float:
    """Prepares feed_logs/<data_config> in data_dir (no-op when present) so no variant times a
    build."""
    tic = time.perf_counter()
    code = (
        "from lf_jax.input.datasets import build_dataset; "
        f"b = build_dataset('feed_logs', {data_config!r}, {data_dir!r}); print(b.data_dir)"
    )
    out = subprocess.run(
        [PYTHON, "-c", code],
        cwd=REPO,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
    )
    if out.returncode:
        sys.exit(f"building feed_logs/{data_config} in {data_dir} failed:\n{out.stderr[-4000:]}")
    elapsed = time.perf_counter() - tic
    print(
        f"[prebuild] dataset at {out.stdout.strip().splitlines()[-1]} ({elapsed:.1f} s)", flush=True
    )
    return elapsed


def run_variant(name: str, root: Path, data_dir: str, steps: int, tput_steps: int) -> dict:
    workdir = root / name
    if workdir.exists():  # a stale workdir would resume from its checkpoints: start clean
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    cmd = command(name, workdir, data_dir, steps, tput_steps)
    print(f"[{name}] lf-jax {' '.join(cmd[1:])}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()[0]
    tic = time.perf_counter()
    with open(workdir / "run.log", "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "CI": "true"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        for line in proc.stdout:
            log.write(line)
            if " step " in line or "error" in line.lower() or "Traceback" in line:
                print(f"[{name}] {line.rstrip()[-150:]}", flush=True)
        proc.wait()
    wall = time.perf_counter() - tic
    info = {
        "name": name,
        "command": cmd,
        "returncode": proc.returncode,
        "wall_s": wall,
        "started": started,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
    }
    (workdir / "bench_run.json").write_text(json.dumps(info, indent=1))
    print(
        f"[{name}] exit {proc.returncode}, {wall:.0f} s wall (load1 {load_before:.1f} -> "
        f"{info['load1_after']:.1f})",
        flush=True,
    )
    return info


def collect(name: str, root: Path) -> dict | None:
    """Reads one finished workdir; None when it has not run (or failed)."""
    workdir = root / name
    if not (workdir / "bench_run.json").exists():
        return None
    info = json.loads((workdir / "bench_run.json").read_text())
    if info["returncode"] != 0:
        return {**info, "failed": True}
    config = json.loads((workdir / "config.json").read_text())
    rows = [
        json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines() if line
    ]
    train_rows = [r for r in rows if "examples_per_second" in r]
    rates = [r["examples_per_second"] for r in train_rows]
    last_half = rates[len(rates) // 2 :]
    steps = max((r["step"] for r in rows), default=0)
    metrics_path = workdir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {
        **info,
        "failed": False,
        "steps": steps,
        "batch_size": config["batch_size"],
        "grad_accum_steps": config["train"]["grad_accum_steps"],
        "examples": steps * config["batch_size"],
        "rates": rates,
        "median_rate_last_half": statistics.median(last_half) if last_half else float("nan"),
        "final_loss": train_rows[-1]["loss"] if train_rows else float("nan"),
        "metrics": metrics,
    }


def _mean(values):
    return sum(values) / len(values)


def _f(x, digits=4):
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def tables(results: dict[str, dict]) -> str:
    quality = {n: r for n, r in results.items() if VARIANTS[n][2] == "quality" and not r["failed"]}
    lines = []
    if quality:
        head = [
            "variant",
            "steps",
            "batch (micro)",
            "examples seen",
            "wall s",
            "train ex/s",
            *[f"random AUC {t}" for t in TASKS],
            "random AUC mean",
            *[f"ranked AUC {t}" for t in TASKS],
            "ranked AUC mean",
            "oracle AUC mean (random / ranked)",
            "NE mean (random / ranked)",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in quality.items():
            m = r["metrics"]
            auc = {h: [m[f"{h}/{t}/auc"] for t in TASKS] for h in HOLDOUTS}
            oracle = {h: _mean([m[f"{h}/{t}/oracle_auc"] for t in TASKS]) for h in HOLDOUTS}
            ne = {h: _mean([m[f"{h}/{t}/ne"] for t in TASKS]) for h in HOLDOUTS}
            micro = r["batch_size"] // r["grad_accum_steps"]
            batch = (
                f"{r['batch_size']} ({r['grad_accum_steps']}x{micro})"
                if r["grad_accum_steps"] > 1
                else str(r["batch_size"])
            )
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        str(r["steps"]),
                        batch,
                        f"{r['examples']:,}",
                        f"{r['wall_s']:.0f}",
                        f"{r['median_rate_last_half']:,.0f}",
                        *[_f(a) for a in auc["holdout_random"]],
                        _f(_mean(auc["holdout_random"])),
                        *[_f(a) for a in auc["holdout_ranked"]],
                        _f(_mean(auc["holdout_ranked"])),
                        f"{_f(oracle['holdout_random'])} / {_f(oracle['holdout_ranked'])}",
                        f"{_f(ne['holdout_random'])} / {_f(ne['holdout_ranked'])}",
                    ]
                )
                + " |"
            )
        lines += [
            "",
            "Random-session holdout, per task: AUC - oracle AUC (gap), NE, calibration "
            "(sum of predictions / positives).",
            "",
        ]
        head = ["variant", *[f"{t} gap / NE / cal" for t in TASKS], "mean gap"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in quality.items():
            m, h = r["metrics"], "holdout_random"
            gaps = [m[f"{h}/{t}/auc"] - m[f"{h}/{t}/oracle_auc"] for t in TASKS]
            cells = [
                f"{g:+.4f} / {_f(m[f'{h}/{t}/ne'], 3)} / {_f(m[f'{h}/{t}/calibration'], 2)}"
                for g, t in zip(gaps, TASKS, strict=False)
            ]
            lines.append("| " + " | ".join([name, *cells, f"{_mean(gaps):+.4f}"]) + " |")
    tput = {n: r for n, r in results.items() if VARIANTS[n][2] == "throughput" and not r["failed"]}
    if tput:
        lines += [
            "",
            "Training throughput (median examples/s of the last half of the log rows, "
            "10 steps per row; batch 512):",
            "",
            "| variant | devices / mesh | steps | wall s | examples/s (median, last half) | all "
            "rows |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in tput.items():
            lines.append(
                f"| {name} | {VARIANTS[name][0]} | {r['steps']} | {r['wall_s']:.0f} | "
                f"{r['median_rate_last_half']:,.0f} | "
                f"{', '.join(f'{x:,.0f}' for x in r['rates'])} |"
            )
        if "tput_8dev" in tput and "tput_1dev" in tput:
            ratio = (
                tput["tput_8dev"]["median_rate_last_half"]
                / tput["tput_1dev"]["median_rate_last_half"]
            )
            lines += ["", f"8 simulated devices / 1 device: {ratio:.2f}x"]
    failed = [n for n, r in results.items() if r["failed"]]
    if failed:
        lines += ["", f"FAILED (see <root>/<variant>/run.log): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="one workdir per variant under it")
    parser.add_argument("--data-dir", default="/tmp/tfds_ranker_bench")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_ORDER),
        help=f"comma list, run in this order (known: {', '.join(VARIANTS)})",
    )
    parser.add_argument("--steps", type=int, default=800, help="steps of the quality variants")
    parser.add_argument("--throughput-steps", type=int, default=100)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip variants whose workdir already holds a successful run",
    )
    parser.add_argument("--table-only", action="store_true", help="run nothing; tabulate <root>")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    args.root.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        prebuild(args.data_dir)
        if any(UNLOGGED[0] in VARIANTS[name][1] for name in names):
            prebuild(args.data_dir, "tiny_unlogged")
        for index, name in enumerate(names, 1):
            done = collect(name, args.root)
            if args.reuse and done is not None and not done["failed"]:
                print(f"[{name}] reusing the finished run in {args.root / name}", flush=True)
                continue
            print(f"=== {index}/{len(names)} {name}: {VARIANTS[name][0]}", flush=True)
            run_variant(name, args.root, args.data_dir, args.steps, args.throughput_steps)
    results = {n: r for n in names if (r := collect(n, args.root)) is not None}
    table = tables(results)
    print(table)
    (args.root / "ranker_table.md").write_text(table)
    (args.root / "ranker_results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.root / 'ranker_table.md'} and {args.root / 'ranker_results.json'}")


if __name__ == "__main__":
    main()
