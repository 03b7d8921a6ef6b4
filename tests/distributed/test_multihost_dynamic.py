"""2 processes x 4 CPU devices train the tiny ranker with dynamic member and post tables
like 1 process x 8 devices, twice: the second start loads its programs from the run's
persistent compilation cache (the timing under which cross-process collectives issued in
different orders hung, lf_jax.embedding.ordering).

The dynamic tables' resolve (keys to rows through the owners' hash tables: a 0-or-1
round loop of all_to_alls) runs before the lookup's exchange and after the update's, so
these runs check that the engine's chain of collective phases covers it.
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
CONFIG = "configs/feed_ranker.py:size=tiny,dynamic=0.5"
HEARTBEAT_S = 4
LIMIT_S = 420  # outer time limit of one multi-process start


def _overrides(data_dir) -> dict[str, str]:
    return small_ranker_overrides(data_dir, **{"train.steps": "4", "train.checkpoint_every": "2"})


def _two_processes(repo_root, root: Path, data_dir) -> dict[str, np.ndarray]:
    t0 = time.monotonic()
    final, _ = train_in_processes(
        WORKER,
        root,
        f"{repo_root}/{CONFIG}",
        _overrides(data_dir),
        limit_s=LIMIT_S,
        heartbeat_s=HEARTBEAT_S,
        cwd=repo_root,
    )
    print(f"2-process dynamic run: {time.monotonic() - t0:.1f} s")
    return final


def _one_process(repo_root, workdir: Path, data_dir) -> dict[str, np.ndarray]:
    return train_in_one_process(f"{repo_root}/{CONFIG}", _overrides(data_dir), workdir)[1]


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
