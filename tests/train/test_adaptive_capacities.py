"""The trainer's owner-exchange capacities follow the traffic and change no result."""

import logging

import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.capacity import exchanged_routes
from lf_jax.train.checkpoint import flatten_to_dict
from lf_jax.train.loop import prepare_workdir
from lf_jax.train.ranker import RankerTask
from lf_jax.train.step import make_train_step

ROW_SPREAD_PLAN = {
    "member": {"strategy": "row_wise", "axes": ("data", "model")},
    "hashtag": {"strategy": "table_wise_row_wise", "group": 1},
}


def _run(config, workdir, adaptive: bool, steps: int):
    task = RankerTask(config, make_mesh(dict(config.mesh)), prepare_workdir(workdir, config))
    step = make_train_step(
        task.graphdef, task.collection, task.tx, task.loss_fn, adaptive_capacities=adaptive
    )
    state, batches = task.init_state(), task.train_iterator()
    used, losses = [], []
    for _ in range(steps):
        state, metrics = step(state, task.device_batch(next(batches)))
        used.append(step.last_capacities)
        losses.append(float(metrics["loss"]))
    dense = {k: np.asarray(v) for k, v in flatten_to_dict(state["params"]).items()}
    return task, step, used, losses, (dense, task.collection.logical_tables(state["embedding"]))


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_adaptive_capacities_equal_static_ones(
    small_ranker_config, tmp_path, micro_batches, caplog
):
    with small_ranker_config.unlocked():
        small_ranker_config.embedding.plan = ROW_SPREAD_PLAN
        small_ranker_config.embedding.exchange = "rows"  # auto: tests/train/test_auto_exchange.py
        small_ranker_config.train.grad_accum_steps = micro_batches
    with caplog.at_level(logging.INFO, logger="lf_jax.train.step"):
        task, step, used, losses, adaptive = _run(small_ranker_config, tmp_path / "a", True, 4)
    assert "owner exchange capacities per owner (<group>: distinct ids; " in caplog.text
    _, static_step, static_used, static_losses, static = _run(
        small_ranker_config, tmp_path / "s", False, 4
    )
    groups = sorted(r.group.name for r in exchanged_routes(task.collection))
    assert groups and static_used == [None] * 4
    chooser = next(iter(step.choosers.values()))
    assert used[0] == tuple(sorted(chooser.static.items()))  # static until a count is seen
    for chosen in used[1:]:
        assert [name for name, _ in chosen] == groups
        assert all(c in chooser.ladders[name] for name, c in chosen)
    # the small ranker's batches hold far fewer distinct keys than the static sizing
    assert any(c < chooser.static[name] for name, c in used[-1])
    assert step.jitted._cache_size() == len(set(used))  # one compile per capacity set
    assert static_step.jitted._cache_size() == 1
    np.testing.assert_allclose(losses, static_losses, rtol=1e-6)
    for part_a, part_b in zip(adaptive, static, strict=True):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            np.testing.assert_allclose(part_a[key], part_b[key], rtol=1e-6, atol=1e-7, err_msg=key)
