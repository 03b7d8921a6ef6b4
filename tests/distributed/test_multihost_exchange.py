"""2 processes x 4 CPU devices train the tiny ranker with ``embedding.exchange=auto`` like
1 process x 8 devices: member rows spread over all 8 devices, so its group is probed in
the rows exchange and bag mode (4 steps each), then keeps one mode, the same in every
process (the exchange counts each process reads are the mesh's maxima); the bag steps'
all_to_alls run across the processes.
"""

import time
from pathlib import Path

import numpy as np
import pytest

from lf_jax.testing.multiprocess import (
    small_ranker_overrides,
    train_in_one_process,
    train_in_processes,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
WORKER = str(Path(__file__).with_name("mp_train_worker.py"))
CONFIG = "configs/feed_ranker.py:size=tiny"
HEARTBEAT_S = 4
LIMIT_S = 420  # outer time limit of one multi-process start
MEMBER_OVER_ALL = '{"member": {"strategy": "row_wise", "axes": ("data", "model")}}'


def _overrides(data_dir) -> dict[str, str]:
    return small_ranker_overrides(
        data_dir,
        **{
            "embedding.plan": MEMBER_OVER_ALL,
            "embedding.exchange": "auto",
            "train.steps": "10",  # 4 rows steps, 4 bag steps, 2 in the chosen mode
            "train.checkpoint_every": "10",
        },
    )


def test_auto_exchange_trains_in_two_processes_like_one(
    repo_root, feed_builder, feed_data_dir, tmp_path
):
    overrides = _overrides(feed_data_dir)
    task, expected, data_state = train_in_one_process(
        f"{repo_root}/{CONFIG}", overrides, tmp_path / "one"
    )
    assert [r.modes for r in task.collection.routes].count(("rows", "bags")) == 1
    mode = next(iter(data_state["exchange_modes"].values()))

    root = tmp_path / "two"
    root.mkdir()
    t0 = time.monotonic()
    got, results = train_in_processes(
        WORKER,
        root,
        f"{repo_root}/{CONFIG}",
        overrides,
        limit_s=LIMIT_S,
        heartbeat_s=HEARTBEAT_S,
        cwd=repo_root,
    )
    print(f"2-process auto-exchange run: {time.monotonic() - t0:.1f} s")
    for r in results:
        assert f": {mode} mode (probed per owner and step:" in r.output, r.output[-3000:]
        assert "/entries" in r.output  # the bag probe steps ran
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)
