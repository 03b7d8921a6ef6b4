"""The one registry of model families: config ``model_family`` -> its training task and,
when it can be exported, its corpus source (lf_jax/export/corpus_sources.py).

Entries are "module:Class" strings, imported on first use, so that naming a family does
not import every family's model code.

Example:
    >>> family_class("feed_ranker", "task")        # <class 'lf_jax.train.ranker.RankerTask'>
    >>> family_class("dual_encoder", "corpus")     # its export CorpusSource
"""

import dataclasses
import importlib
from typing import Literal

from lf_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    task: str  # "module:Class" of its TrainingTask (lf_jax/train/loop.py)
    corpus: str | None = None  # "module:Class" of its CorpusSource; None: not exportable


FAMILIES = {
    "feed_ranker": Family(
        task="lf_jax.train.ranker:RankerTask",
        corpus="lf_jax.export.corpus_sources:RankerCorpus",
    ),
    "post_encoder": Family(task="lf_jax.train.post_encoder:PostEncoderTask"),
    "dual_encoder": Family(
        task="lf_jax.train.dual_encoder:DualEncoderTask",
        corpus="lf_jax.export.corpus_sources:DualEncoderCorpus",
    ),
}


def family_class(
    family: str, role: Literal["task", "corpus"], error: type[Exception] = UserInputError
) -> type:
    """The class registered for ``family`` in ``role``; ``error`` names the known ones."""
    target = getattr(FAMILIES[family], role) if family in FAMILIES else None
    if target is None:
        known = sorted(name for name, entry in FAMILIES.items() if getattr(entry, role))
        problem = "cannot be exported; families:" if role == "corpus" else "is not one of"
        raise error(f"config model_family={family!r} {problem} {known}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
