"""Every config value with a range, checked in one place when a config is loaded.

``check_config`` runs before any device work, dataset build or file write: the CLI calls
it right after ``--config`` and its overrides are applied, ``train_and_evaluate`` again for
Python callers. It checks the keys a config has (a plan config has no ``train`` section;
the demo config holds whole training configs as sections, each checked the same way):

  devices >= 1, mesh sizes (positive or one -1, dividing ``devices``), batch_size >= 1,
  model_family known, train.steps >= 1, train.checkpoint_every >= 1, train.log_every >= 1,
  train.eval_every >= 0, train.keep_checkpoints >= 1, train.grad_accum_steps >= 1,
  train.warmup_steps >= 0, train.learning_rate > 0, train.ips_fit / ips_target enums,
  data.order enum,
  0 < train.ips_clip[0] <= 1 <= train.ips_clip[1], data.eval_batch_size >= 1,
  data.eval_examples >= 0, data.worker_count >= 0, loss.temperature > 0, and batch_size
  splitting into grad_accum_steps micro-batches over the devices (feed ranker) or the mesh's
  data axis (encoders) when the device count is known.

Example:
    >>> check_config(load_config("configs/feed_ranker.py"), device_count=8)
    >>> check_config(apply_overrides(cfg, {"train.steps": "0"}))
    ConfigError: config train.steps must be a positive int (steps to train), got 0
"""

import math

import ml_collections

from lf_jax.checks import check_int
from lf_jax.configuration import ConfigError
from lf_jax.distributed.mesh import MeshShapeError, resolve_mesh_shape
from lf_jax.train.families import FAMILIES

# train.<key>: (minimum, what it is)
TRAIN_INTS = {
    "steps": (1, "steps to train"),
    "checkpoint_every": (1, "steps between checkpoints"),
    "log_every": (1, "steps between log lines"),
    "eval_every": (0, "steps between evaluations; 0: never"),
    "keep_checkpoints": (1, "checkpoints kept on disk"),
    "grad_accum_steps": (1, "micro-batches per step"),
    "warmup_steps": (0, "learning-rate warmup steps"),
}
ENUMS = {
    "train.ips_fit": ("power_law", "per_position"),
    "train.ips_target": ("all", "positives"),
    "data.order": ("shuffled", "time"),
}
# how a family splits batch_size: over every device or over the mesh's data axis
BATCH_UNITS = {"feed_ranker": "devices", "dual_encoder": "data", "post_encoder": "data"}


def check_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ConfigError naming the first key whose value is out of range (see module
    docstring). ``device_count``: the devices the run will use when known before they
    exist (``config.devices`` for simulated CPU devices and the planner); None (real
    accelerators, counted only once they start) skips the mesh and batch-split checks,
    which ``make_mesh`` and the task repeat on the real devices."""
    _check_section(config, "", device_count)
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and "model_family" in value:
            _check_section(value, f"{name}.", device_count)  # e.g. the demo's ranker section


def _int(config, key: str, prefix: str, minimum: int, what: str) -> int | None:
    if key.split(".")[-1] not in _parent(config, key):
        return None
    value = _parent(config, key)[key.split(".")[-1]]
    return check_int(
        f"config {prefix}{key}", value, ConfigError, minimum=minimum, hint=f" ({what})"
    )


def _parent(config, key: str):
    node = config
    for part in key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            return {}
    return node if isinstance(node, ml_collections.ConfigDict) else {}


def _check_section(config, prefix: str, device_count: int | None) -> None:
    family = config.get("model_family")
    if family is not None and family not in FAMILIES:
        raise ConfigError(
            f"config {prefix}model_family={family!r} is not one of {sorted(FAMILIES)}"
        )
    _int(config, "devices", prefix, 1, "devices the run is laid over")
    mesh_shape = None
    if "mesh" in config and device_count:
        try:
            mesh_shape = resolve_mesh_shape(dict(config.mesh), device_count)
        except MeshShapeError as error:
            raise ConfigError(f"config {prefix}mesh: {error}") from None
    batch = _int(config, "batch_size", prefix, 1, "global examples per step")
    for key, (minimum, what) in TRAIN_INTS.items():
        _int(config, f"train.{key}", prefix, minimum, what)
    for key, allowed in ENUMS.items():
        parent = _parent(config, key)
        leaf = key.split(".")[-1]
        if leaf in parent and parent[leaf] not in allowed:
            raise ConfigError(f"config {prefix}{key}={parent[leaf]!r} must be one of {allowed}")
    train = _parent(config, "train.x")
    for key in ("learning_rate",):
        if key in train and not (_is_number(train[key]) and train[key] > 0):
            raise ConfigError(f"config {prefix}train.{key}={train[key]!r} must be > 0")
    if "ips_clip" in train:
        clip = tuple(train.ips_clip)
        if len(clip) != 2 or not all(map(_is_number, clip)) or not 0 < clip[0] <= 1 <= clip[1]:
            raise ConfigError(
                f"config {prefix}train.ips_clip={clip!r} must be (low, high) with "
                "0 < low <= 1 <= high"
            )
    _int(config, "data.eval_batch_size", prefix, 1, "examples per eval batch")
    _int(config, "data.eval_examples", prefix, 0, "examples per holdout to evaluate; 0: all")
    _int(config, "data.worker_count", prefix, 0, "grain worker processes; 0 decodes in-process")
    loss = _parent(config, "loss.x")
    if "temperature" in loss and not (_is_number(loss.temperature) and loss.temperature > 0):
        raise ConfigError(f"config {prefix}loss.temperature={loss.temperature!r} must be > 0")
    if mesh_shape is not None and batch is not None and family in BATCH_UNITS:
        micro = train.get("grad_accum_steps", 1)
        if BATCH_UNITS[family] == "devices":
            unit, name = math.prod(mesh_shape.values()), "devices"
        else:
            unit, name = mesh_shape.get("data", 1), "the mesh's data axis"
        if batch % (micro * unit):
            raise ConfigError(
                f"config {prefix}batch_size={batch} must split into "
                f"train.grad_accum_steps={micro} micro-batches of a multiple of {unit} "
                f"({name}, mesh {mesh_shape})"
            )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
