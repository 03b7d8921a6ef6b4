"""Open vocabularies: the hashing trick and quotient-remainder (compositional) embeddings.

When ids keep arriving that no snapshot holds, two alternatives to ``ids.IdMap``:

- the hashing trick: ``hash_to_rows`` sends any string or integer id to one of
  ``num_rows`` rows (collisions share a row);
- quotient-remainder embeddings (Shi et al., 2020): integer id ``i`` in [0, vocab_size)
  reads row ``i // m`` of a quotient table and row ``i % m`` of a remainder table
  (m = num_remainder_rows), and the two rows are combined (elementwise product or sum).
  Two tables of about sqrt(vocab_size) rows each give every id its own pair of rows.

Shapes: ids are any shape; rows come back with the same shape. ``q_emb`` / ``r_emb`` are
[..., D] per id, or [B, L, D] with a [B, L] mask when pooling after combining.

Example:
    >>> rows = hash_to_rows(["urn:li:hashtag:jax", "urn:li:hashtag:tpu"], num_rows=1000)
    >>> qr = quotient_remainder_specs("member", vocab_size=1_000_000, num_remainder_rows=1000,
    ...                               dim=32, max_ids=1)
    >>> ids_by_feature = qr.split_ids(np.array([[5], [123456]]))   # feeds qr.features
    >>> member_emb_bd = qr.combine(outputs["member_quotient"], outputs["member_remainder"])
"""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lf_jax.checks import check_int
from lf_jax.embedding.sparse_optim import SparseOptimizer
from lf_jax.embedding.spec import COMBINERS, FeatureSpec, TableSpec
from lf_jax.embedding.string_hash import hash_strings, mix64
from lf_jax.errors import UserInputError

OPS = ("mult", "sum")
_INT_SALT = 0xA0761D6478BD642F


class OpenVocabError(UserInputError):
    """Bad ids or arguments for the hashing trick or quotient-remainder embeddings."""


def hash_to_rows(keys_or_ids, num_rows: int, seed: int = 0) -> np.ndarray:
    """The hashing trick: string or integer ids -> int32 rows in [0, num_rows), same shape.

    Deterministic for a seed on every machine; different seeds give independent maps.
    Integer ids (any int dtype, negative allowed) are hashed, not taken modulo, so
    consecutive ids spread over the rows.

    Example:
        >>> hash_to_rows(np.array([3, 3, 17]), num_rows=10, seed=1)   # same id, same row
    """
    num_rows = check_int("num_rows", num_rows, OpenVocabError)
    if num_rows >= 2**31:
        raise OpenVocabError(f"num_rows must be < 2**31 (int32 rows), got {num_rows}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise OpenVocabError(f"seed must be an int in [0, 2**64), got {seed!r}")
    ids = None
    if not isinstance(keys_or_ids, list) or (
        keys_or_ids and isinstance(keys_or_ids[0], (int, np.integer))
    ):
        ids = np.asarray(keys_or_ids)
    if ids is not None and ids.dtype.kind in "iu":
        seed_mix = mix64(np.uint64(int(seed) ^ _INT_SALT))
        hashes = mix64(ids.astype(np.int64).view(np.uint64) ^ seed_mix)
    elif ids is not None and ids.dtype.kind in "fb":
        raise OpenVocabError(
            f"keys_or_ids must be strings or integers, got an array of {ids.dtype}"
        )
    else:
        hashes = hash_strings(keys_or_ids, seed, field="keys_or_ids")
    return (((hashes >> np.uint64(32)) * np.uint64(num_rows)) >> np.uint64(32)).astype(np.int32)


def quotient_remainder_rows(ids, num_remainder_rows: int, vocab_size: int | None = None):
    """Integer ids -> (quotient rows, remainder rows): ``ids // m`` and ``ids % m``.

    Works on numpy arrays (checked: ids must lie in [0, vocab_size) when given) and on
    jax arrays inside jit (not checked). ``q * m + r == ids``.

    Example:
        >>> quotient_remainder_rows(np.array([0, 7, 1001]), num_remainder_rows=1000)
        (array([0, 0, 1]), array([0, 7, 1]))
    """
    m = check_int("num_remainder_rows", num_remainder_rows, OpenVocabError)
    if isinstance(ids, (list, tuple, int, np.integer)):
        ids = np.asarray(ids)
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise OpenVocabError(f"ids must be integers, got an array of {ids.dtype}")
        if ids.size and ids.min() < 0:
            raise OpenVocabError(f"ids must be >= 0, got {int(ids.min())}")
        if vocab_size is not None and ids.size and ids.max() >= vocab_size:
            raise OpenVocabError(f"ids must be < vocab_size={vocab_size}, got {int(ids.max())}")
    return ids // m, ids % m


def combine_quotient_remainder(
    q_emb, r_emb, op: str = "mult", *, combiner: str = "none", mask=None
):
    """Combines quotient and remainder rows per id (product or sum); optionally pools.

    q_emb, r_emb: [..., D]. With combiner sum | mean | sqrtn they are [B, L, D] and are
    pooled over L after combining, counting only ids where ``mask`` [B, L] is nonzero
    (all of them when mask is None) -> [B, D]. Pure jax: use it inside jit.

    Example:
        >>> combine_quotient_remainder(jnp.ones((2, 4)), jnp.full((2, 4), 3.0)).shape
        (2, 4)
    """
    if op not in OPS:
        raise OpenVocabError(f"op must be one of {OPS}, got {op!r}")
    if combiner not in COMBINERS:
        raise OpenVocabError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if q_emb.shape != r_emb.shape:
        raise OpenVocabError(
            f"q_emb and r_emb must have one shape, got {q_emb.shape} and {r_emb.shape}"
        )
    emb = q_emb * r_emb if op == "mult" else q_emb + r_emb
    if combiner == "none":
        return emb
    if emb.ndim < 2:
        raise OpenVocabError(
            f"pooling with combiner={combiner!r} needs [B, L, D] rows, got shape {emb.shape}"
        )
    weights = jnp.ones(emb.shape[:-1], emb.dtype) if mask is None else jnp.asarray(mask, emb.dtype)
    total = jnp.sum(emb * weights[..., None], axis=-2)
    count = jnp.sum(weights, axis=-1, keepdims=True)
    if combiner == "mean":
        return total / jnp.maximum(count, 1.0)
    if combiner == "sqrtn":
        return total / jnp.sqrt(jnp.maximum(count, 1.0))
    return total


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuotientRemainderSpecs:
    """The two tables and two features of one quotient-remainder feature, and how to use them.

    ``split_ids`` turns the feature's ids into ids for both features; ``combine`` merges
    the two looked-up outputs into the feature's embedding [B, D] (or [B, L, D]).
    ``pool_after_combine`` is True when a product of multi-id bags must be pooled after
    combining (the features then return [B, L, D] and ``combine`` pools with the mask).
    """

    name: str
    vocab_size: int
    num_remainder_rows: int
    op: str
    combiner: str
    quotient_table: TableSpec
    remainder_table: TableSpec
    quotient_feature: FeatureSpec
    remainder_feature: FeatureSpec

    @property
    def tables(self) -> tuple[TableSpec, TableSpec]:
        return self.quotient_table, self.remainder_table

    @property
    def features(self) -> tuple[FeatureSpec, FeatureSpec]:
        return self.quotient_feature, self.remainder_feature

    @property
    def pool_after_combine(self) -> bool:
        return self.quotient_feature.combiner != self.combiner

    def split_ids(self, ids) -> dict:
        """{quotient feature name: ids // m, remainder feature name: ids % m} (host-checked)."""
        quotient, remainder = quotient_remainder_rows(ids, self.num_remainder_rows, self.vocab_size)
        return {self.quotient_feature.name: quotient, self.remainder_feature.name: remainder}

    def combine(self, q_emb, r_emb, mask=None):
        """The feature's embedding from the two features' outputs (mask [B, L] when pooling)."""
        combiner = self.combiner if self.pool_after_combine else "none"
        return combine_quotient_remainder(q_emb, r_emb, self.op, combiner=combiner, mask=mask)


def quotient_remainder_specs(
    name: str,
    vocab_size: int,
    num_remainder_rows: int | None = None,
    dim: int = 32,
    max_ids: int = 1,
    combiner: str = "sum",
    optimizer: SparseOptimizer | None = None,
    *,
    op: str = "mult",
    initializer: str = "normal",
    init_scale: float | None = None,
    dtype: str = "float32",
) -> QuotientRemainderSpecs:
    """Table and feature specs for a quotient-remainder feature over ids [0, vocab_size).

    Tables ``{name}_quotient`` [ceil(vocab_size / m), dim] and ``{name}_remainder`` [m, dim],
    read by features of the same names. num_remainder_rows defaults to ceil(sqrt(vocab_size))
    (fewest rows in all). For op="mult" the default init_scale is dim**-0.25, so a product
    of two rows has the usual scale 1/sqrt(dim).

    Example:
        >>> qr = quotient_remainder_specs("member", 1_000_000, 1000, dim=32,
        ...                               optimizer=rowwise_adagrad(0.05))
        >>> [t.vocab_size for t in qr.tables]
        [1000, 1000]
    """
    vocab_size = check_int("vocab_size", vocab_size, OpenVocabError)
    if num_remainder_rows is None:
        num_remainder_rows = math.isqrt(vocab_size - 1) + 1
    m = check_int("num_remainder_rows", num_remainder_rows, OpenVocabError)
    if m > vocab_size:
        raise OpenVocabError(
            f"feature '{name}': num_remainder_rows must be <= vocab_size={vocab_size}, got {m}"
        )
    if op not in OPS:
        raise OpenVocabError(f"feature '{name}': op must be one of {OPS}, got {op!r}")
    if combiner not in COMBINERS:
        raise OpenVocabError(
            f"feature '{name}': combiner must be one of {COMBINERS}, got {combiner!r}"
        )
    if init_scale is None and op == "mult":
        init_scale = check_int("dim", dim, OpenVocabError) ** -0.25
    table_fields: dict[str, Any] = {
        "dim": dim,
        "initializer": initializer,
        "init_scale": init_scale,
        "dtype": dtype,
    }
    if optimizer is not None:
        table_fields["optimizer"] = optimizer
    quotient_table = TableSpec(
        name=f"{name}_quotient", vocab_size=-(-vocab_size // m), **table_fields
    )
    remainder_table = TableSpec(name=f"{name}_remainder", vocab_size=m, **table_fields)
    # A product does not commute with pooling: multi-id bags come back per id and are
    # pooled by combine(); sums (and single ids) pool inside the lookup as usual.
    feature_combiner = "none" if op == "mult" and max_ids > 1 else combiner
    features = [
        FeatureSpec(name=table.name, table=table.name, max_ids=max_ids, combiner=feature_combiner)
        for table in (quotient_table, remainder_table)
    ]
    return QuotientRemainderSpecs(
        name=name,
        vocab_size=vocab_size,
        num_remainder_rows=m,
        op=op,
        combiner=combiner,
        quotient_table=quotient_table,
        remainder_table=remainder_table,
        quotient_feature=features[0],
        remainder_feature=features[1],
    )
