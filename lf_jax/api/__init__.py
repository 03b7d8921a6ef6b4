"""The notebook-facing Python API: models trained on a user's own numpy batches.

Example:
    >>> from lf_jax.api import Encoder, Ranker      # also lf_jax.Encoder, lf_jax.Ranker
"""

from lf_jax.api.encoder import Encoder
from lf_jax.api.ranker import Ranker

__all__ = ["Encoder", "Ranker"]
