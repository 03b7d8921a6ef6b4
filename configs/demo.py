"""End-to-end demo on 8 simulated CPU devices.

Command:  lf-jax demo                      (or `make demo`)
Devices:  8 simulated CPU devices, mesh data=2 x model=4
Time:     under a minute on 2 CPU cores
Metric:   the demo prints each stage's result (mesh, plan, losses) and where files went.
"""

import ml_collections

from lf_jax.configuration import parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"devices": 8})
    config = ml_collections.ConfigDict()
    config.devices = args["devices"]
    config.mesh = ml_collections.ConfigDict({"data": 2, "model": -1})
    config.seed = 0
    config.batch_size = 256
    config.steps = 30
    config.learning_rate = 0.1
    return config
