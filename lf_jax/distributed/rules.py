"""Logical axis names -> mesh axes, in one table.

Layers annotate parameters and activations with logical names ("batch", "vocab",
"embed", ...); only this module knows which mesh axis each name lives on.

Example:
    >>> spec = logical_to_mesh_axes(("batch", "embed"))
    >>> spec
    PartitionSpec('data', None)
"""

from collections.abc import Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Each logical name maps to a mesh axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": "data",  # examples of a global batch
    "sequence": None,  # token / history positions
    "vocab": "model",  # embedding-table rows (row-wise sharding)
    "table_stack": "model",  # stacked same-dim tables (table-wise sharding)
    "embed": None,  # embedding / hidden width
    "embed_shard": "model",  # embedding columns (column-wise sharding)
    "mlp": "model",  # MLP hidden units (tensor parallel)
    "heads": "model",  # attention heads
    "kv_heads": None,
    "head_dim": None,
    "fsdp": "data",  # parameters sharded over data for fully-sharded DP
    "task": None,
}


def logical_to_mesh_axes(
    names: Sequence[str | None],
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Translates logical axis names into a PartitionSpec.

    Unknown names raise KeyError naming the axis. With ``mesh``, mesh axes that the
    mesh lacks (e.g. "model" on a data-only mesh) become None, and a mesh axis used
    twice keeps only its first use.
    """
    table = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis '{name}' has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            axes = tuple(axis for axis in axes if axis in mesh.shape)
        axes = tuple(axis for axis in axes if axis not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules=None) -> NamedSharding:
    """NamedSharding on ``mesh`` for an array whose dims carry logical ``names``."""
    return NamedSharding(mesh, logical_to_mesh_axes(names, rules, mesh))


# Parameter placements of the text encoders (lf_jax/models/encoder_sharding.py), as rule
# tables over the same logical names: "tensor" splits heads, kv heads, MLP units and vocab
# rows over "model"; "fsdp" splits the embed dim of every weight over "data";
# "fsdp_tensor" does both; "replicated" places a full copy on every device.
ENCODER_PARAM_MODES = ("replicated", "fsdp", "tensor", "fsdp_tensor")


def encoder_param_rules(mode: str) -> dict[str, str | tuple[str, ...] | None]:
    """The rule table for placing encoder parameters in ``mode`` (one of ENCODER_PARAM_MODES).

    Example:
        >>> encoder_param_rules("tensor")["heads"]
        'model'
    """
    if mode not in ENCODER_PARAM_MODES:
        raise ValueError(f"encoder sharding mode {mode!r} is not one of {ENCODER_PARAM_MODES}")
    rules: dict[str, str | tuple[str, ...] | None] = {name: None for name in DEFAULT_RULES}
    if mode in ("tensor", "fsdp_tensor"):
        for name in ("vocab", "mlp", "heads"):
            rules[name] = DEFAULT_RULES[name]
        rules["kv_heads"] = DEFAULT_RULES["heads"]
    if mode in ("fsdp", "fsdp_tensor"):
        rules["embed"] = DEFAULT_RULES["fsdp"]
    return rules
