"""The notebook-facing Python API: models trained on a user's own numpy batches.

Example:
    >>> from lf_jax.api import Ranker      # also lf_jax.Ranker
"""

from lf_jax.api.ranker import Ranker

__all__ = ["Ranker"]
