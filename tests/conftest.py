"""Forces 8 simulated CPU devices before jax is imported anywhere in the suite."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

# XLA:CPU settings that compile fast: the suite's programs run a few steps each, so
# compiling is most of its CPU time. LLVM at -O0 and the older loop emitter for fusions
# compile the tiny ranker's train step in 6.3 instead of 15.8 CPU s and run it at 0.4x the
# speed, with the same losses (README "Tests"). Child processes keep them
# (lf_jax.testing.environment.child_env); `make demo`, benchmarks and users run XLA's
# defaults.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
    f"{FAST_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}"
    " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after the environment is set)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def xla_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache per test run, shared by the run's xdist workers
    and by the processes tests start (they inherit the environment): many tests compile the
    same train steps and the same small helpers (to_logical, init, ...). Programs that
    compile in 0.2 s or more are cached (JAX's default is 1 s): a test that trains, saves
    and resumes compiles the same helpers twice. A cache hit still counts as a compilation
    for count_compilations; the size limit turns on the cache's file lock, which
    concurrent writers need."""
    cache = _shared_root(tmp_path_factory) / "xla_compilation_cache"
    cache.mkdir(parents=True, exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": str(cache),
        "jax_compilation_cache_max_size": 8 * 2**30,
        "jax_persistent_cache_min_compile_time_secs": 0.2,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    return cache


def pytest_collection_modifyitems(config, items):
    if any(device.platform == "gpu" for device in jax.devices()):
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The tiny feed_logs dataset, built offline once per test run: the first xdist worker
# that needs it builds it under a file lock in a directory shared by the run's workers;
# every worker hard-links the built files into its own data dir (which tests may also
# build other datasets into).
@pytest.fixture(scope="session")
def feed_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _shared_root(tmp_path_factory) -> Path:
    """The test run's temporary directory shared by its xdist workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def feed_builder(feed_data_dir, tmp_path_factory):
    from lf_jax.testing.offline_datasets import build_offline, build_shared_feed_logs

    shared = _shared_root(tmp_path_factory) / "feed_logs_tiny"
    build_shared_feed_logs(shared)  # waits for the background build when one runs
    target = feed_data_dir / "feed_logs"
    if not target.exists():
        shutil.copytree(shared / "feed_logs", target, copy_function=os.link)
    return build_offline("feed_logs", "tiny", feed_data_dir)


def _whole_suite_on_workers(config) -> bool:
    """True in the xdist controller of a run over the default test paths (`make test`)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.getoption("numprocesses", None):
        return False
    return config.args_source == pytest.Config.ArgsSource.TESTPATHS


_BACKGROUND_BUILD = pytest.StashKey[subprocess.Popen]()


def pytest_sessionstart(session):
    """`make test`: the controller starts the tiny feed_logs build in a background process
    that holds the build lock, so the first tests that need the data wait for it while the
    workers run other tests (xdist starts them after this hook)."""
    config = session.config
    if not _whole_suite_on_workers(config):
        return
    shared = _shared_root(config._tmp_path_factory) / "feed_logs_tiny"
    builder = subprocess.Popen(
        [sys.executable, "-m", "lf_jax.testing.offline_datasets", str(shared)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert builder.stdout is not None
    line = builder.stdout.readline().strip()
    if line != "locked":  # the builder failed before taking the lock: show why
        raise RuntimeError(f"background feed_logs build: {line!r}, exit {builder.wait()}")
    config.stash[_BACKGROUND_BUILD] = builder


def pytest_sessionfinish(session):
    builder = session.config.stash.get(_BACKGROUND_BUILD, None)
    if builder is not None and builder.poll() is None:
        builder.wait()


@pytest.fixture(scope="session")
def shrunk_ranker_config(repo_root, feed_data_dir):
    """Factory of the tiny feed ranker shrunk for tests (batch 64, id tables of dim 16,
    MLP (32,), one cross layer) reading the session's feed_logs build; each call returns a
    fresh ConfigDict for a test to add its own overrides to (``with config.unlocked():
    ...``). ``make("size=tiny,dynamic=0.5")`` passes another config argument."""
    from lf_jax.configuration import load_config

    def make(argument: str = "size=tiny"):
        config = load_config(f"{repo_root}/configs/feed_ranker.py:{argument}")
        with config.unlocked():
            config.batch_size = 64
            for table in ("member", "hashtag", "post"):
                config.embedding.tables[table].dim = 16
            config.model.mlp_dims = (32,)
            config.model.dcn_layers = 1
            config.data.data_dir = str(feed_data_dir)
        return config

    return make


@pytest.fixture(scope="session")
def ranker_workdir(shrunk_ranker_config, feed_builder, tmp_path_factory):
    """(config, workdir) of a feed ranker whose checkpoint holds its initial state."""
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import build_task

    config = shrunk_ranker_config()
    with config.unlocked():
        config.train.ips = False
        config.data.eval_examples = 20_000  # the serving export's int8 AUC check reads these
    workdir = tmp_path_factory.mktemp("serving_ranker")
    task = build_task(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(1, task.init_state(), task.collection, {})
    checkpointer.close()
    return config, workdir


@pytest.fixture(scope="session")
def mesh_of():
    """``mesh_of({"data": 2, "model": 4})``: one Mesh per shape for the whole session."""
    from lf_jax.distributed.mesh import make_mesh

    meshes = {}

    def get(shape):
        key = tuple(shape.items())
        if key not in meshes:
            meshes[key] = make_mesh(dict(shape))
        return meshes[key]

    return get


@pytest.fixture(scope="session")
def mesh_2x4(mesh_of):
    """The 8 simulated devices as data 2 x model 4."""
    return mesh_of({"data": 2, "model": 4})


DYNAMIC_STEPS = (3, 5)  # the dynamic_ranker_run's checkpoints
BEYOND_IDS = {"member": [5000, 2**40], "post": [7000]}  # alive keys that are no dataset id


def _with_keys(task, state, step, tables):
    """``state`` at ``step`` whose dynamic tables hold exactly ``tables``: {table: (keys
    ascending, rows [K, D])}."""
    from lf_jax.embedding.dynamic.checkpoint import from_checkpoint, to_checkpoint

    ckpt = to_checkpoint(task.dynamic, {"embedding": state["embedding"], "index": state["dynamic"]})
    ckpt["step"] = step
    for name, (keys, rows) in tables.items():
        ckpt["dynamic"][name].update(
            keys=np.asarray(keys, np.uint64),
            rows=np.asarray(rows, np.float32),
            slots={"accumulator": np.full(len(keys), 0.1, np.float32)},
            last=np.full(len(keys), step - 1, np.int32),
            freq=np.ones(len(keys), np.int32),
        )
    both = from_checkpoint(task.dynamic, ckpt)
    return {**state, "embedding": both["embedding"], "dynamic": both["index"]}


@pytest.fixture(scope="session")
def dynamic_ranker_run(shrunk_ranker_config, feed_builder, tmp_path_factory):
    """A `feed_ranker:size=tiny,dynamic=0.5` run (shrunk; member and post ids in dynamic
    tables) checkpointed at step 3 (members 0..299 and posts 0..999 in part, plus keys
    beyond the ids) and step 5 (some of them evicted), with its config.json. Returns
    {"config", "workdir", "step": 5, "beyond": BEYOND_IDS, "rows": {table: (keys, rows)
    at step 5}, "ids": {table: {"held": at step 5, "evicted": held at step 3 only,
    "never": never admitted}}}. Read-only: tests write elsewhere."""
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import build_task, prepare_workdir

    workdir = tmp_path_factory.mktemp("dynamic_ranker_run")
    config = shrunk_ranker_config("size=tiny,dynamic=0.5")
    with config.unlocked():
        config.train.ips = False
        config.data.eval_examples = 2048
    task = build_task(config, prepare_workdir(workdir, config))
    assert sorted(task.dynamic.specs) == ["member", "post"]
    rng = np.random.default_rng(0)
    state = task.init_state()
    ids = {}
    at_a, at_b = {}, {}
    for name, count, held in (("member", 300, 60), ("post", 1000, 200)):
        chosen = rng.choice(count, held + 10, replace=False)
        keys_a = np.sort(np.concatenate([chosen, BEYOND_IDS[name]]).astype(np.uint64))
        rows_a = rng.normal(size=(keys_a.size, 16)).astype(np.float32)
        evicted = np.sort(chosen[:10])
        keep = ~np.isin(keys_a, evicted.astype(np.uint64))
        at_a[name] = (keys_a, rows_a)
        at_b[name] = (keys_a[keep], rows_a[keep])
        ids[name] = {
            "held": np.sort(chosen[10:]),
            "evicted": evicted,
            "never": np.setdiff1d(np.arange(count), chosen),
        }
    step_a, step_b = DYNAMIC_STEPS
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(step_a, _with_keys(task, state, step_a, at_a), task.collection, {})
    checkpointer.save(step_b, _with_keys(task, state, step_b, at_b), task.collection, {})
    checkpointer.close()
    return {
        "config": config,
        "workdir": workdir,
        "step": step_b,
        "beyond": BEYOND_IDS,
        "ids": ids,
        "rows": at_b,
    }
