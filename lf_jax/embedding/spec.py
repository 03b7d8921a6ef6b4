"""Table and feature specs: what the tables are, and which features read them.

Several features may share one table (actor and root actor both read ``member``).

Example:
    >>> member = TableSpec(name="member", vocab_size=1_000_000, dim=64,
    ...                    optimizer=rowwise_adagrad(0.05))
    >>> actor = FeatureSpec(name="actor", table="member", max_ids=1)
    >>> history = FeatureSpec(name="history_actors", table="member", max_ids=50,
    ...                       combiner="mean")
"""

import dataclasses
import math
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.checks import check_int
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.sparse_optim import SparseOptimizer, sgd
from lf_jax.errors import UserInputError

COMBINERS = ("sum", "mean", "sqrtn", "none")
INITIALIZERS = ("normal", "uniform", "zeros")
DTYPES = ("float32", "bfloat16", "float16")


class SpecError(UserInputError):
    """A table or feature spec with a bad field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableSpec:
    """One logical embedding table [vocab_size, dim].

    initializer: normal | uniform | zeros, scaled by ``init_scale`` (default
    1/sqrt(dim)). The values depend only on the seed and the table name, never on the
    plan, so any plan starts from the same logical table.

    dynamic: a DynamicPolicy makes the table take 64-bit keys through per-shard hash
    tables (lf_jax.embedding.dynamic); ``vocab_size`` is then its total row capacity.
    """

    name: str
    vocab_size: int
    dim: int
    initializer: str = "normal"
    init_scale: float | None = None
    optimizer: SparseOptimizer = dataclasses.field(default_factory=lambda: sgd(0.01))
    dtype: str = "float32"
    dynamic: DynamicPolicy | None = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise SpecError(f"TableSpec.name must be a non-empty string, got {self.name!r}")
        for field in ("vocab_size", "dim"):
            value = getattr(self, field)
            check_int(f"table '{self.name}': {field}", value, SpecError)
        if self.initializer not in INITIALIZERS:
            raise SpecError(
                f"table '{self.name}': initializer must be one of {INITIALIZERS}, "
                f"got {self.initializer!r}"
            )
        if self.dtype not in DTYPES:
            raise SpecError(
                f"table '{self.name}': dtype must be one of {DTYPES}, got {self.dtype!r}"
            )
        if not isinstance(self.optimizer, SparseOptimizer):
            raise SpecError(
                f"table '{self.name}': optimizer must come from "
                f"lf_jax.embedding.sparse_optim, got {self.optimizer!r}"
            )
        if self.dynamic is not None and not isinstance(self.dynamic, DynamicPolicy):
            raise SpecError(
                f"table '{self.name}': dynamic must be a DynamicPolicy or None, "
                f"got {self.dynamic!r}"
            )

    @property
    def scale(self) -> float:
        return self.init_scale if self.init_scale is not None else 1.0 / math.sqrt(self.dim)

    @property
    def bytes_per_row(self) -> int:
        return self.dim * np.dtype(self.dtype if self.dtype != "bfloat16" else "float16").itemsize

    def slot_bytes_per_row(self) -> int:
        """Optimizer-slot bytes per row (float32 slots)."""
        return 4 * sum(math.prod(shape) for shape in self.optimizer.slot_shapes(self.dim).values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """One input feature: up to ``max_ids`` ids per example, read from ``table``.

    combiner: sum | mean | sqrtn pool the ids into [batch, dim]; none keeps the
    sequence [batch, max_ids, dim]. ``weighted`` features carry one weight per id.
    Ids outside [0, vocab_size) raise an error unless ``oov_row`` names a row to send
    them to. Bags longer than ``max_ids`` are truncated (the first max_ids ids are kept)
    unless ``truncate`` is False, which makes them an error.
    """

    name: str
    table: str
    max_ids: int = 1
    combiner: str = "sum"
    weighted: bool = False
    oov_row: int | None = None
    truncate: bool = True

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise SpecError(f"FeatureSpec.name must be a non-empty string, got {self.name!r}")
        check_int(f"feature '{self.name}': max_ids", self.max_ids, SpecError)
        if self.combiner not in COMBINERS:
            raise SpecError(
                f"feature '{self.name}': combiner must be one of {COMBINERS}, got {self.combiner!r}"
            )

    @property
    def pooled(self) -> bool:
        return self.combiner != "none"


def validate_specs(
    tables: Sequence[TableSpec], features: Sequence[FeatureSpec]
) -> dict[str, TableSpec]:
    """Checks names are unique and every feature's table and oov_row exist.

    Returns the tables by name.
    """
    by_name: dict[str, TableSpec] = {}
    for table in tables:
        if table.name in by_name:
            raise SpecError(f"table name '{table.name}' is used twice")
        by_name[table.name] = table
    seen: set[str] = set()
    for feature in features:
        if feature.name in seen:
            raise SpecError(f"feature name '{feature.name}' is used twice")
        seen.add(feature.name)
        if feature.table not in by_name:
            raise SpecError(
                f"feature '{feature.name}' reads table '{feature.table}', which is not "
                f"defined (tables: {sorted(by_name)})"
            )
        vocab = by_name[feature.table].vocab_size
        if feature.oov_row is not None and not 0 <= feature.oov_row < vocab:
            raise SpecError(
                f"feature '{feature.name}': oov_row {feature.oov_row} is outside table "
                f"'{feature.table}' rows [0, {vocab})"
            )
    return by_name


def initial_table(spec: TableSpec, key) -> jax.Array:
    """[vocab_size, dim] float32 initial rows of ``spec`` (its initializer and scale), from
    ``key`` folded with the table's name, so that each table draws its own rows."""
    key = jax.random.fold_in(key, zlib.crc32(spec.name.encode()) & 0x7FFFFFFF)
    shape = (spec.vocab_size, spec.dim)
    if spec.initializer == "zeros":
        return jnp.zeros(shape, jnp.float32)
    if spec.initializer == "uniform":
        return jax.random.uniform(key, shape, jnp.float32, -spec.scale, spec.scale)
    return spec.scale * jax.random.normal(key, shape, jnp.float32)
