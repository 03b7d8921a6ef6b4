"""DynamicPolicy: how a dynamic table admits, places and forgets keys.

A table whose TableSpec sets ``dynamic=DynamicPolicy(...)`` takes 64-bit keys instead of
row ids. Its ``vocab_size`` is the total row capacity, split evenly over the shards
(``vocab_size // shards`` slots per shard); each key lives on the shard
``hash(key) % shards`` in one of the ``probe_limit`` slots after its home slot.

Fields:
  probe_limit: slots a key may occupy (its window: home, home+1, ... mod capacity).
  admit_after: a new key gets a slot once it was seen in this many steps (counted in a
    count-min sketch of ``sketch_depth`` x ``sketch_width`` counters per shard; 1 admits
    at first sight and keeps no sketch).
  eviction: "none" (a key whose window is full is refused and counted), "lru" (the
    window's least recently seen key is evicted) or "lfu" (the least frequently seen,
    then least recently seen). A key seen in the current step is never evicted.
  ttl_steps: a key not seen for more than this many steps is forgotten (its slot is
    free again, its row reset when reused); None keeps keys until evicted.
  seed: salts the owner, home-slot and sketch hashes.

Example:
    >>> TableSpec(name="post", vocab_size=8 * 4096, dim=32,
    ...           dynamic=DynamicPolicy(admit_after=2, eviction="lru", ttl_steps=1000))
"""

import dataclasses

from lf_jax.checks import check_int
from lf_jax.errors import UserInputError

EVICTIONS = ("none", "lru", "lfu")


class DynamicPolicyError(UserInputError):
    """A DynamicPolicy field out of range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicPolicy:
    """Admission, placement and eviction of one dynamic table (see module docstring)."""

    probe_limit: int = 8
    admit_after: int = 1
    sketch_width: int = 4096
    sketch_depth: int = 2
    eviction: str = "lru"
    ttl_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        for field in ("probe_limit", "admit_after", "sketch_width", "sketch_depth"):
            check_int(f"DynamicPolicy.{field}", getattr(self, field), DynamicPolicyError)
        if self.eviction not in EVICTIONS:
            raise DynamicPolicyError(
                f"DynamicPolicy.eviction must be one of {EVICTIONS}, got {self.eviction!r}"
            )
        if self.ttl_steps is not None:
            check_int("DynamicPolicy.ttl_steps", self.ttl_steps, DynamicPolicyError)
        check_int("DynamicPolicy.seed", self.seed, DynamicPolicyError, minimum=0)
        if self.seed >= 2**32:
            raise DynamicPolicyError(f"DynamicPolicy.seed must be < 2**32, got {self.seed}")

    @property
    def uses_sketch(self) -> bool:
        return self.admit_after > 1
