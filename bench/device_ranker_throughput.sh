#!/usr/bin/env bash
# Feed ranker (size=tiny) training throughput on a GPU machine next to a same-machine CPU baseline.
#
#   OUT=/some/dir bash bench/device_ranker_throughput.sh        (from the repository root)
#
# Needs the wheel bundle .whl/ at the repository root (ignored by git: the packages the
# machine's image lacks, e.g. grain, array-record, tensorflow-datasets, ml-collections;
# optax/orbax-checkpoint/flax pinned). It is installed with --target /tmp/site, which is put
# first on PYTHONPATH together with the repository, so `python3 -m lf_jax.cli` is `lf-jax`.
# The bundle measured in bench/BENCHMARKS.md (Python 3.12 image with jax 0.11.2; 13 MB):
#   for w in array-record==0.8.6 attrs==26.1.0 cloudpickle==3.1.3 dm-tree==0.1.10 \
#            docstring-parser==0.18.0 einops==0.8.2 flax==0.12.12 googleapis-common-protos==1.76.0 \
#            grain==0.2.18 immutabledict==4.3.1 ml-collections==1.1.0 optax==0.2.8 \
#            orbax-checkpoint==0.12.8 portpicker==1.6.0 simple-parsing==0.1.9 six==1.17.0 \
#            tensorboardx==2.6.5 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
#            termcolor==3.3.0 toml==0.10.2; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "$w"; done
#   python3 -m pip wheel --no-deps -w .whl promise==2.3        # sdist only on PyPI: pure Python
# (flax 0.12.8, the version pinned in constraints.txt, does not import under jax 0.11.2.)
#
# Runs, one after another, each in a fresh workdir /tmp/tput/NAME, no eval, a row in
# history.jsonl every 10 steps, one checkpoint at the end:
#   gpu_b512   --devices real, mesh 1x1, batch 512, 300 steps
#   gpu_b4096  --devices real, mesh 1x1, batch 4096, 150 steps, planner budget 4 GB
#   cpu8_b512  JAX_PLATFORMS=cpu --devices cpu:8 (config mesh data=2 x model=4), batch 512, 100 steps
#   cpu1_b512  JAX_PLATFORMS=cpu --devices cpu:1, mesh 1x1, batch 512, 60 steps
# Throughput = median examples_per_second over the last half of a run's rows (the first row
# includes compilation).
#
# Writes to $OUT (3 files): logs.txt (everything printed, a header per stage),
# histories.jsonl (every history row with a "run" field), summary.json.
# Env: SKIP_GPU=1 skips the GPU runs (CPU-only dry run); BUDGET_S (default 400) caps the
# whole script: each run's timeout shrinks to what is left; RUN_TIMEOUT_S (default 150) and
# BUILD_TIMEOUT_S (default 200) cap one run / the dataset build; PYTHON (default python3);
# SITE, TFDS_DIR, TPUT (defaults /tmp/site, /tmp/tfds, /tmp/tput) move the install, the
# dataset and the workdirs.
set -uo pipefail

: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SKIP_GPU=${SKIP_GPU:-0}
BUDGET_S=${BUDGET_S:-400}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-150}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-200}
SITE=${SITE:-/tmp/site}
TFDS_DIR=${TFDS_DIR:-/tmp/tfds}
TPUT=${TPUT:-/tmp/tput}
START=$(date +%s)
: > "$OUT/logs.txt"
: > "$TPUT.runs" 2>/dev/null || true

now() { date +%s.%N; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
header() { echo; echo "==================== $* ($(date -u +%H:%M:%S) UTC, $(( $(date +%s) - START )) s in) ===================="; }

install_bundle() {
  header "install .whl bundle -> $SITE"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "ERROR: no .whl/*.whl in $PWD (the bundle is git-ignored: carry '.whl' to this machine)"
    return 1
  fi
  ls -l .whl/*.whl | awk '{printf "  %9d  %s\n", $5, $NF}'
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl; then
    echo "pip install failed; unpacking the wheels with zipfile instead"
    rm -rf "$SITE" && mkdir -p "$SITE"
    "$PY" - "$SITE" .whl/*.whl <<'EOF' || return 1
import pathlib, shutil, sys, zipfile
target = pathlib.Path(sys.argv[1])
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(target)
for data in target.glob("*.data"):              # purelib/platlib of a .data dir go on the path
    for lib in ("purelib", "platlib"):
        if (data / lib).is_dir():
            shutil.copytree(data / lib, target, dirs_exist_ok=True)
    shutil.rmtree(data)
print("unpacked", len(sys.argv) - 2, "wheels")
EOF
  fi
  export PYTHONPATH="$SITE:$PWD"
  echo "PYTHONPATH=$PYTHONPATH"
}

environment() {
  header "environment"
  echo "nproc $(nproc); $(free -g | awk '/Mem:/{print "memory " $2 " GiB"}')"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for dist, mod in [("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"),
                  ("orbax-checkpoint", "orbax.checkpoint"), ("grain", "grain"),
                  ("tensorflow-datasets", "tensorflow_datasets"), ("array-record", "array_record"),
                  ("numpy", "numpy"), ("protobuf", "google.protobuf"), ("etils", "etils")]:
    try:
        version = md.version(dist)
        path = importlib.import_module(mod).__file__
        print(f"  {dist:<20} {version:<12} {path}")
    except Exception as error:                         # keep going: the runs show the damage
        print(f"  {dist:<20} ERROR {type(error).__name__}: {error}")
plugins = sorted(d.metadata["Name"] for d in md.distributions()
                 if d.metadata["Name"] and ("cuda" in d.metadata["Name"] or "pjrt" in d.metadata["Name"]))
print("  plugins:", ", ".join(plugins) or "none")
import jax
print("jax.devices():", jax.devices())
print("jax.default_backend():", jax.default_backend())
EOF
}

build_dataset() {
  header "build feed_logs/tiny -> $TFDS_DIR"
  local t0 t1 rc
  t0=$(now)
  timeout -k 10 "$BUILD_TIMEOUT_S" "$PY" -c "
from lf_jax.input.datasets import build_dataset, dataset_metadata
b = build_dataset('feed_logs', 'tiny', '$TFDS_DIR')
print(b.data_dir, dataset_metadata(b)['num_examples'])"
  rc=$?
  t1=$(now)
  echo "dataset build: rc=$rc, $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s"
  echo "build $rc $(awk "BEGIN{printf \"%.1f\", $t1-$t0}")" >> "$TPUT.runs"
  return $rc
}

# run NAME STEPS PLATFORMS(cpu|cuda|-: JAX_PLATFORMS for the run, so a GPU run cannot fall back to CPU) ARGS...
run() {
  local name=$1 steps=$2 platforms=$3; shift 3
  local remaining budget t0 t1 rc
  remaining=$(left)
  budget=$(( remaining - 15 ))
  (( budget > RUN_TIMEOUT_S )) && budget=$RUN_TIMEOUT_S
  if (( budget < 30 )); then
    header "run $name: skipped, only ${remaining} s of BUDGET_S=$BUDGET_S left"
    echo "$name skipped 0 $steps" >> "$TPUT.runs"
    return 0
  fi
  header "run $name: $steps steps, timeout ${budget} s"
  rm -rf "${TPUT:?}/$name"      # a leftover workdir would resume from its checkpoint
  mkdir -p "$TPUT"
  local env_cmd=(env)
  [[ $platforms != - ]] && env_cmd=(env JAX_PLATFORMS="$platforms")
  local cmd=("$PY" -m lf_jax.cli train --config configs/feed_ranker.py:size=tiny
             --workdir "$TPUT/$name" --config.data.data_dir="$TFDS_DIR"
             --config.train.steps="$steps" --config.train.eval_every=0
             --config.train.log_every=10 --config.train.checkpoint_every="$steps" "$@")
  echo "+ ${env_cmd[*]:1} ${cmd[*]}"
  t0=$(now)
  "${env_cmd[@]}" timeout -k 10 "$budget" "${cmd[@]}" 2>&1 | tee "$TPUT/$name.log"
  rc=${PIPESTATUS[0]}
  t1=$(now)
  echo "run $name: rc=$rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)'), wall $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s"
  echo "$name $rc $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") $steps" >> "$TPUT.runs"
}

summary() {
  header "summary"
  "$PY" - "$TPUT" "$OUT" <<'EOF'
import json, pathlib, statistics, subprocess, sys
tput, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs, build = {}, None
for line in pathlib.Path(f"{tput}.runs").read_text().splitlines():
    parts = line.split()
    if parts[0] == "build":
        build = {"rc": int(parts[1]), "wall_s": float(parts[2])}
        continue
    name, rc, wall, steps = parts
    runs[name] = {"rc": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                  "wall_s": float(wall), "steps_asked": int(steps)}
with open(out / "histories.jsonl", "w") as hist:
    for name, info in runs.items():
        path = tput / name / "history.jsonl"
        rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
        for row in rows:
            hist.write(json.dumps({"run": name, **row}) + "\n")
        rates = [r["examples_per_second"] for r in rows if "examples_per_second" in r]
        tail = rates[len(rates) // 2:]
        info.update(rows=len(rates), last_step=max((r["step"] for r in rows), default=0),
                    ex_per_s_median_last_half=round(statistics.median(tail), 1) if tail else None,
                    ex_per_s_all=[round(r, 1) for r in rates])
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:
    gpu = None
rate = {n: i["ex_per_s_median_last_half"] for n, i in runs.items()}
ratios = {}
for a, b in [("gpu_b512", "cpu8_b512"), ("gpu_b512", "cpu1_b512"), ("gpu_b4096", "gpu_b512"),
             ("cpu8_b512", "cpu1_b512")]:
    if rate.get(a) and rate.get(b):
        ratios[f"{a}/{b}"] = round(rate[a] / rate[b], 2)
summary = {"gpu": gpu, "dataset_build": build, "runs": runs, "ratios": ratios}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"dataset build: {build}")
print(f"{'run':<11}{'rc':>5}{'wall s':>9}{'steps':>11}{'rows':>6}{'ex/s (median, last half)':>27}")
for name, i in runs.items():
    rc = "skip" if i["skipped"] else i["rc"]
    med = f"{i['ex_per_s_median_last_half']:,.0f}" if i.get("ex_per_s_median_last_half") else "-"
    print(f"{name:<11}{rc!s:>5}{i['wall_s']:>9.1f}{str(i.get('last_step', 0)) + '/' + str(i['steps_asked']):>11}"
          f"{i.get('rows', 0):>6}{med:>27}")
    if i.get("ex_per_s_all"):
        print(f"{'':<11}rows: {', '.join(f'{r:,.0f}' for r in i['ex_per_s_all'])}")
print("ratios:", ratios or "-")
EOF
}

main() {
  header "device_ranker_throughput.sh in $PWD, OUT=$OUT, BUDGET_S=$BUDGET_S, SKIP_GPU=$SKIP_GPU"
  install_bundle || { echo "bundle install failed: stopping"; return 1; }
  environment
  build_dataset || { echo "dataset build failed: stopping"; summary; return 1; }
  if [[ $SKIP_GPU != 1 ]]; then
    run gpu_b512 300 cuda --devices real --config.mesh.data=1 --config.mesh.model=1
    run gpu_b4096 150 cuda --devices real --config.mesh.data=1 --config.mesh.model=1 --config.batch_size=4096 \
        --config.embedding.memory_budget_bytes=4000000000   # the planner's 64 MB default rejects 4096 on 1 device
  fi
  run cpu8_b512 100 cpu --devices cpu:8
  run cpu1_b512 60 cpu --devices cpu:1 --config.mesh.data=1 --config.mesh.model=1
  summary
  header "done"
}

main 2>&1 | tee -a "$OUT/logs.txt"
exit "${PIPESTATUS[0]}"
