"""Sharded embedding tables: specs, plans, lookups and sparse optimizers.

Example:
    >>> from lf_jax import embedding as emb
    >>> tables = [emb.TableSpec(name="member", vocab_size=1000, dim=16,
    ...                         optimizer=emb.rowwise_adagrad(0.05))]
    >>> features = [emb.FeatureSpec(name="actor", table="member", max_ids=1)]
    >>> collection = emb.EmbeddingCollection(tables, features, {"member": emb.row_wise()}, mesh)
"""

from lf_jax.embedding.collection import EmbeddingCollection, SparseBatch
from lf_jax.embedding.layer import Embedding, EmbeddingState
from lf_jax.embedding.plan import load_plan, save_plan, validate_plan
from lf_jax.embedding.preprocess import InvalidIdsError, preprocess
from lf_jax.embedding.sharding.column_wise import column_wise
from lf_jax.embedding.sharding.data_parallel import data_parallel
from lf_jax.embedding.sharding.piece import PlanError
from lf_jax.embedding.sharding.row_wise import row_wise
from lf_jax.embedding.sharding.table_wise import table_wise
from lf_jax.embedding.sharding.table_wise_row_wise import table_wise_row_wise
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, SpecError, TableSpec

__all__ = [
    "EmbeddingCollection",
    "SparseBatch",
    "Embedding",
    "EmbeddingState",
    "PlanError",
    "column_wise",
    "data_parallel",
    "load_plan",
    "row_wise",
    "save_plan",
    "table_wise",
    "table_wise_row_wise",
    "validate_plan",
    "InvalidIdsError",
    "preprocess",
    "adam",
    "rowwise_adagrad",
    "sgd",
    "FeatureSpec",
    "SpecError",
    "TableSpec",
]
