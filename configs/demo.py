"""End-to-end demo on 8 simulated CPU devices.

Command:  lf-jax demo                      (or `make demo`)
Devices:  8 simulated CPU devices, mesh data=2 x model=4
Time:     about 2 minutes on 2 CPU cores (dataset build, plan, a short ranker run)
Metric:   the report prints the plan table, the ranker's loss and its holdout AUC next
          to the oracle AUC; files land in the workdir (default runs/demo).

The ranker section is configs/feed_ranker.py:size=tiny with a shorter run, so any
ranker override works here too: ``--config.ranker.train.steps=300``.
"""

from pathlib import Path

import ml_collections

from lf_jax.configuration import load_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"devices": 8})
    config = ml_collections.ConfigDict()
    config.devices = args["devices"]
    config.mesh = ml_collections.ConfigDict({"data": 2, "model": -1})
    config.seed = 0
    ranker = load_config(Path(__file__).with_name("feed_ranker.py").as_posix() + ":size=tiny")
    with ranker.unlocked():
        ranker.devices = args["devices"]
        ranker.train.steps = 150
        ranker.train.eval_every = 150
        ranker.train.checkpoint_every = 150
        ranker.train.log_every = 25
        # Show several strategies on the tiny tables (the planner fills in the rest):
        ranker.embedding.plan = {"member": {"strategy": "row_wise", "axes": ("model",)},
                                 "post": {"strategy": "column_wise", "num_shards": 4}}
    config.ranker = ranker
    return config
