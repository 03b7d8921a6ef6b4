"""A ``lf-jax train`` run of the feed ranker as an ``lf_jax.Ranker``: one scoring path.

``ranker_from_workdir(workdir)`` reads the run's config.json, rebuilds the run's tables,
features and FeedRanker (``train/ranker_model.RankerModel``, from the built dataset's
files: no builder code, no simulator), restores the newest checkpoint (or ``step``) and
hands the parameters, the logical tables and the dense-feature standardisation to a
``Ranker`` of the same specs. Its ``predict`` is what the run's evaluation computes on the
same host batch, and its ``save`` writes a directory that ``Ranker.load`` opens without
the config or the dataset.

A run with dynamic tables (``feed_ranker:dynamic=...``: member/post ids as 64-bit keys)
restores its hash tables with the state (``Checkpointer.restore(..., dynamic=)``) and
hands the tables, optimizer slots and hash tables to the Ranker as they are (rehashed
only where its shards differ from the run's; ``lf_jax.api.ranker_dynamic``). Its
``predict`` finds keys as the run's evaluation does (``resolve(insert=False)``: a key
the tables do not hold, never admitted or evicted, reads as padding) and its ``fit``
goes on inserting and evicting.

Example:
    >>> ranker = lf_jax.Ranker.from_workdir("runs/feed_ranker")
    >>> ranker.save("models/feed_ranker")                       # ranker.json + npz files
    >>> probs_bt = lf_jax.Ranker.load("models/feed_ranker").predict(host_batch)
"""

from collections.abc import Mapping
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.errors import UserInputError
from lf_jax.workdir import reject_remote


def ranker_from_workdir(
    workdir: str | Path, *, step: int | None = None, mesh: Mapping[str, int] | None = None
):
    """The ``lf_jax.Ranker`` of the feed ranker run in ``workdir`` at its newest checkpoint
    (or ``step``), placed on ``mesh`` (default: every device on "data")."""
    from lf_jax.api.ranker import Ranker
    from lf_jax.api.ranker_dynamic import place_logical
    from lf_jax.configuration import load_workdir_config
    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.embedding.config_specs import memory_budget_from_config
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import latest_checkpoint_step
    from lf_jax.train.ranker_model import RankerModel, ranker_specs
    from lf_jax.train.step import dense_optimizer

    reject_remote(workdir, "workdir")
    workdir = Path(workdir)
    config = load_workdir_config(workdir)
    family = config.get("model_family", "")
    if family != "feed_ranker":
        raise UserInputError(
            f"'{workdir}' is a run of model_family={family!r}; Ranker.from_workdir opens "
            "feed_ranker runs"
        )
    if latest_checkpoint_step(workdir) is None:
        raise UserInputError(f"no checkpoint in '{(workdir / 'checkpoints').absolute()}'")
    run = RankerModel.from_config(
        config,
        make_mesh(dict(config.mesh)),
        micro_batches=config.train.grad_accum_steps,
        build=False,
    )
    checkpointer = Checkpointer(workdir / "checkpoints", create=False)
    try:
        template = run.init_state(dense_optimizer(config.train), config.seed)
        state, _, restored = checkpointer.restore_newest(
            template, run.collection, step, dynamic=run.dynamic
        )
    finally:
        checkpointer.close()
    tables, features, _ = ranker_specs(config, run.meta)  # the planner plans for ``mesh``
    ranker = Ranker(
        tables,
        features,
        num_dense=int(run.meta["dense_dim"]),
        tasks=run.tasks,
        batch_size=config.batch_size,
        mesh=mesh,
        model=config.model.to_dict(),
        learning_rate=config.train.learning_rate,
        weight_decay=config.train.weight_decay,
        memory_budget_bytes=memory_budget_from_config(config.embedding),
        seed=config.seed,
        dense_mean=run.dense_mean_k.tolist(),
        dense_std=run.dense_std_k.tolist(),
    )
    params = ranker.params
    nnx.replace_by_pure_dict(params, nnx.to_pure_dict(jax.device_get(state["params"])))
    ranker.params = jax.device_put(params, NamedSharding(ranker.mesh, PartitionSpec()))
    if run.dynamic is None:
        logical = run.collection.logical_tables(state["embedding"])
        ranker.embedding = ranker.collection.state_from_logical(logical)
    else:  # keys, rows, slots and hash tables; rehashed where the shards differ
        place_logical(
            ranker,
            run.collection.logical_tables(state["embedding"]),
            run.collection.logical_slots(state["embedding"]),
            state["dynamic"],
            int(state["embedding"]["step"]),
        )
    ranker.steps_trained = restored
    return ranker
