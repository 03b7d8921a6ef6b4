"""Export: a ScaNN vector index keyed by string ids, and an int8 LMDB key-value store.

Example:
    >>> from lf_jax.export import VectorIndex, KVStore
"""

from lf_jax.export.index_inputs import VectorIndexError
from lf_jax.export.kv_inputs import KVStoreError
from lf_jax.export.kv_store import KVStore
from lf_jax.export.quantize import dequantize_int8, quantization_error, quantize_int8
from lf_jax.export.scann_index import VectorIndex
from lf_jax.export.scann_tuning import SearchParams, exact_search, recall_at_k

__all__ = [
    "KVStore",
    "KVStoreError",
    "SearchParams",
    "VectorIndex",
    "VectorIndexError",
    "dequantize_int8",
    "exact_search",
    "quantization_error",
    "quantize_int8",
    "recall_at_k",
]
