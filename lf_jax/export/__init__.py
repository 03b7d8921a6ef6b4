"""Export: a ScaNN vector index keyed by string ids, and an int8 LMDB key-value store.

Imported lazily, so ``import lf_jax.export`` loads neither scann nor lmdb until used.

Example:
    >>> from lf_jax.export import VectorIndex, KVStore
"""

_EXPORTS = {
    "VectorIndex": "lf_jax.export.scann_index",
    "VectorIndexError": "lf_jax.export.scann_index",
    "SearchParams": "lf_jax.export.scann_index",
    "exact_search": "lf_jax.export.scann_index",
    "recall_at_k": "lf_jax.export.scann_index",
    "KVStore": "lf_jax.export.kv_store",
    "KVStoreError": "lf_jax.export.kv_store",
    "quantize_int8": "lf_jax.export.kv_store",
    "dequantize_int8": "lf_jax.export.kv_store",
    "quantization_error": "lf_jax.export.kv_store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lf_jax.export' has no attribute {name!r}")
