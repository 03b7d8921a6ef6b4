"""2 processes x 4 CPU devices train the tiny ranker with dynamic member and post tables
like 1 process x 8 devices, twice: the second start loads its programs from the run's
persistent compilation cache (the timing under which cross-process collectives issued in
different orders hung, lf_jax.embedding.ordering).

The dynamic tables' resolve (keys to rows through the owners' hash tables: a 0-or-1
round loop of all_to_alls) runs before the lookup's exchange and after the update's, so
these runs check that the engine's chain of collective phases covers it.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lf_jax.configuration import apply_overrides, load_config
from lf_jax.distributed.mesh import make_mesh
from lf_jax.testing.environment import child_env
from lf_jax.testing.multiprocess import ProcessGroup, restored_arrays
from lf_jax.train.loop import prepare_workdir, run_training
from lf_jax.train.ranker import RankerTask

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
WORKER = str(Path(__file__).with_name("mp_train_worker.py"))
CONFIG = "configs/feed_ranker.py:size=tiny,dynamic=0.5"
HEARTBEAT_S = 4
LIMIT_S = 420  # outer time limit of one multi-process start


def _overrides(data_dir) -> dict[str, str]:
    return {
        "batch_size": "64",
        "model.mlp_dims": "(32,)",
        "model.dcn_layers": "1",
        "embedding.features.history_actors.max_ids": "10",
        "embedding.features.history_hashtags.max_ids": "10",
        "train.steps": "4",
        "train.eval_every": "0",
        "train.checkpoint_every": "2",
        "train.log_every": "1",
        "train.ips": "false",
        "data.data_dir": str(data_dir),
    }


def _two_processes(repo_root, root: Path, data_dir) -> dict[str, np.ndarray]:
    overrides = _overrides(data_dir)
    argv = [
        sys.executable,
        WORKER,
        str(root),
        "--config",
        f"{repo_root}/{CONFIG}",
        "--workdir",
        str(root / "run"),
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]
    t0 = time.monotonic()
    with ProcessGroup(
        argv, 2, 4, env=child_env(CI="true"), cwd=repo_root, heartbeat_timeout=HEARTBEAT_S
    ) as group:
        results = group.wait(LIMIT_S)
    print(f"2-process dynamic run: {time.monotonic() - t0:.1f} s")
    for r in results:
        assert not r.stopped_by_limit, f"process {r.process} hung:\n{r.output[-3000:]}"
        assert r.returncode == 0, f"process {r.process}: {r.returncode}\n{r.output[-3000:]}"
    return dict(np.load(root / "final.npz"))


def _one_process(repo_root, workdir: Path, data_dir) -> dict[str, np.ndarray]:
    config = apply_overrides(load_config(f"{repo_root}/{CONFIG}"), _overrides(data_dir))
    task = RankerTask(config, make_mesh(dict(config.mesh)), prepare_workdir(workdir, config))
    run_training(task, config.train, workdir)
    return restored_arrays(task, workdir)[0]


def test_dynamic_tables_train_in_two_processes_like_one_also_from_the_cache(
    repo_root, feed_builder, feed_data_dir, tmp_path
):
    expected = _one_process(repo_root, tmp_path / "one", feed_data_dir)
    for start in ("first", "cached"):
        got = _two_processes(repo_root, tmp_path / start, feed_data_dir)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_allclose(
                got[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=f"{start}: {key}"
            )
