"""2 processes x 4 CPU devices train the tiny ranker with ``embedding.exchange=auto`` like
1 process x 8 devices: member rows spread over all 8 devices, so its group is probed in
the rows exchange and bag mode (4 steps each), then keeps one mode, the same in every
process (the exchange counts each process reads are the mesh's maxima); the bag steps'
all_to_alls run across the processes.
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
CONFIG = "configs/feed_ranker.py:size=tiny"
HEARTBEAT_S = 4
LIMIT_S = 420  # outer time limit of one multi-process start
MEMBER_OVER_ALL = '{"member": {"strategy": "row_wise", "axes": ("data", "model")}}'


def _overrides(data_dir) -> dict[str, str]:
    return {
        "batch_size": "64",
        "model.mlp_dims": "(32,)",
        "model.dcn_layers": "1",
        "embedding.features.history_actors.max_ids": "10",
        "embedding.features.history_hashtags.max_ids": "10",
        "embedding.plan": MEMBER_OVER_ALL,
        "embedding.exchange": "auto",
        "train.steps": "10",  # 4 rows steps, 4 bag steps, 2 in the chosen mode
        "train.eval_every": "0",
        "train.checkpoint_every": "10",
        "train.log_every": "1",
        "train.ips": "false",
        "data.data_dir": str(data_dir),
    }


def test_auto_exchange_trains_in_two_processes_like_one(
    repo_root, feed_builder, feed_data_dir, tmp_path
):
    overrides = _overrides(feed_data_dir)
    config = apply_overrides(load_config(f"{repo_root}/{CONFIG}"), overrides)
    task = RankerTask(
        config, make_mesh(dict(config.mesh)), prepare_workdir(tmp_path / "one", config)
    )
    assert [r.modes for r in task.collection.routes].count(("rows", "bags")) == 1
    run_training(task, config.train, tmp_path / "one")
    expected, data_state = restored_arrays(task, tmp_path / "one")
    mode = next(iter(data_state["exchange_modes"].values()))

    root = tmp_path / "two"
    root.mkdir()
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
    print(f"2-process auto-exchange run: {time.monotonic() - t0:.1f} s")
    for r in results:
        assert not r.stopped_by_limit, f"process {r.process} hung:\n{r.output[-3000:]}"
        assert r.returncode == 0, f"process {r.process}: {r.returncode}\n{r.output[-3000:]}"
        assert f": {mode} mode (probed per owner and step:" in r.output, r.output[-3000:]
        assert "/entries" in r.output  # the bag probe steps ran
    got = dict(np.load(root / "final.npz"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)
