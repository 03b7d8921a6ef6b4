"""Sharded embedding tables: specs, plans, lookups and sparse optimizers.

Example:
    >>> from lf_jax import embedding as emb
    >>> tables = [emb.TableSpec(name="member", vocab_size=1000, dim=16,
    ...                         optimizer=emb.rowwise_adagrad(0.05))]
    >>> features = [emb.FeatureSpec(name="actor", table="member", max_ids=1)]
    >>> collection = emb.EmbeddingCollection(tables, features, {"member": emb.row_wise()}, mesh)
"""
