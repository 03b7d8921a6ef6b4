"""One process of a multi-process ranker run, started by tests/distributed/test_multihost*.py.

    python mp_train_worker.py OUT_DIR --config FILE.py:ARG --workdir DIR [--config.a.b=V ...]

Starts jax.distributed from the LF_JAX_* variables (lf_jax.testing.multiprocess sets them),
trains like ``lf-jax train``, records the example keys (session_id * 20 + position) this
process consumed to OUT_DIR/consumed_p<I>.npy and, from process 0, the final dense
parameters and logical tables gathered from all processes to OUT_DIR/final.npz.
"""

import os
import sys

from lf_jax.distributed import multihost


def main(argv):
    out_dir, rest = argv[0], argv[1:]
    multihost.initialize(cpu_devices=multihost.cpu_devices_from_env())
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from lf_jax.configuration import apply_overrides, load_config, split_override_args
    from lf_jax.console import set_verbosity
    from lf_jax.train.checkpoint import flatten_to_dict
    from lf_jax.train.loop import build_task, prepare_workdir, run_training

    set_verbosity("info")
    overrides, rest = split_override_args(rest)
    args = dict(zip(rest[::2], rest[1::2], strict=False))
    config = apply_overrides(load_config(args["--config"]), overrides)
    workdir = prepare_workdir(args["--workdir"], config)
    task = build_task(config, workdir)
    consumed = []
    make_iterator = task.train_iterator

    def recording_iterator():
        iterator = make_iterator()
        real_next = iterator.__next__

        class Recording(type(iterator)):
            def __next__(self):
                batch = real_next()
                consumed.append(batch["session_id"].astype(np.int64) * 20 + batch["position"])
                return batch

        iterator.__class__ = Recording
        return iterator

    task.train_iterator = recording_iterator
    final = {}
    run_training(task, config.train, workdir)
    np.save(
        os.path.join(out_dir, f"consumed_p{jax.process_index()}.npy"),
        np.stack(consumed) if consumed else np.zeros((0, 0), np.int64),
    )
    # the final state as these processes restore it on their own mesh, gathered to process 0
    from lf_jax.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(workdir / "checkpoints")
    state, _ = checkpointer.restore(checkpointer.latest_step(), task.init_state(), task.collection)
    checkpointer.close()
    for name, leaf in flatten_to_dict(state["params"]).items():
        final[f"params/{name}"] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    logical = jax.jit(
        task.collection.to_logical, out_shardings=task.collection.logical_shardings()
    )(state["embedding"])
    for name, leaf in flatten_to_dict(logical).items():
        final[f"embedding/{name}"] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "final.npz"), **final)
    print(f"WORKER DONE process {jax.process_index()} steps {len(consumed)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
