"""One shard's hash table (key -> slot) under jit: find, admit, insert and evict a step's keys.

A shard holds ``capacity`` slots. Key k may live only in its window: the ``probe_limit``
slots home(k), home(k)+1, ... (mod capacity), home(k) = key_hash(k, HOME) % capacity. A
lookup compares the whole window (no early stop), so freeing a slot never hides another
key and needs no tombstone. A slot is *alive* when it holds a key that has not expired
(``ttl_steps``: seen within the last ttl_steps steps).

A step at an owner, on its keys in any order, repeats allowed (each distinct key is
resolved once; when keys compete for a slot, the smaller 64-bit key has priority):

1. Find: a key matching an alive slot of its window is a hit; the slot records the step
   (``last``) and one more step seen (``freq``). Hit slots are *touched*: never evicted in
   this step.
2. Admit: every missing key adds one to its ``sketch_depth`` count-min counters; it is
   admitted when the smallest of them reaches ``admit_after`` (1: always admitted).
3. Insert, in at most ``probe_limit`` rounds: every admitted key still pending proposes
   the first slot of its window that is neither alive nor taken in this step; with no
   such slot, under ``lru``/``lfu``, the alive, untouched, untaken slot of its window with
   the lowest score (lru: last; lfu: freq, then last), ties to the first in window
   order. Each proposed slot goes to the smallest key proposing it; the others try again
   next round. A key left without a slot is *refused* (counted; it reads the default
   row and is tried again when seen next). Nothing is ever overwritten except an
   evicted key, which is counted.

Repeated keys: the entries that find their key are told apart by the slot they find (one
scatter of entry positions into the touched slots, which the eviction needs anyway); the
entries that miss are deduplicated by ``key_leaders`` (hash probe rounds, skipped by a
``cond`` when no entry misses, as in a warm table's step of hits), and only one entry
per missing key counts in the sketch, proposes slots and is marked new.

Each losing proposal means a slot of the key's window was taken, so after probe_limit
rounds a refused key's window is full of keys alive and (lru/lfu) untouchable: refusals
are exactly the keys that had no room. The returned ``new_n`` marks keys given a slot,
whose row and optimizer slots the caller resets to their initial values.

lf_jax/embedding/kernels/dynamic.cc runs this algorithm in C++ (the CPU default; the
collection's ``kernel`` setting decides), with a bit-identical state.

Shapes: C capacity, N keys (distinct among valid ones), P probe_limit.
State: key_hi, key_lo [C] uint32, last [C] int32 (-1 empty), freq [C] int32,
sketch [depth, width] int32, counters [2, len(COUNTERS)] int32 (cumulative, two words:
value = counters[0] + counters[1] * 2**31, so long runs never overflow; see
``counter_totals``).

Example:
    >>> state = init_shard(capacity=1024, policy=DynamicPolicy())
    >>> slot_n, new_n, state = resolve_shard(state, hi_n, lo_n, valid_n, step, policy)
"""

import jax
import jax.numpy as jnp
import numpy as np

from lf_jax.embedding.dynamic.key_dedupe import key_leaders
from lf_jax.embedding.dynamic.keys import HOME_SALT, SKETCH_SALT, key_hash, salt
from lf_jax.embedding.dynamic.policy import DynamicPolicy

COUNTERS = (
    "hits",
    "misses",
    "not_admitted",
    "inserts",
    "evictions",
    "refused",
    "probe_sum",
    "probe_max",
)
_BIG = jnp.iinfo(jnp.int32).max
_UMAX = np.uint32(0xFFFFFFFF)
WORD = 2**31  # counters: low word in [0, 2**31), high word counts 2**31s


def add_counts(counters, counts):
    """Two-word ``counters`` [2, N] plus ``counts`` [N] (each in [0, 2**31)), carried."""
    low = counters[0].astype(jnp.uint32) + counts.astype(jnp.uint32)  # < 2**32: no wrap
    high = counters[1] + (low >> 31).astype(jnp.int32)
    return jnp.stack([(low & jnp.uint32(WORD - 1)).astype(jnp.int32), high])


def counter_totals(counters) -> list[int]:
    """Exact totals (Python ints) of two-word counters [..., 2, N] summed over the
    leading axes (shards); probe_max, the last, is their largest."""
    words = np.asarray(counters, np.int64).reshape(-1, 2, len(COUNTERS))
    totals = [
        int(words[:, 0, i].sum()) + int(words[:, 1, i].sum()) * WORD for i in range(len(COUNTERS))
    ]
    totals[-1] = int((words[:, 0, -1] + words[:, 1, -1] * WORD).max())
    return totals


def split_totals(totals) -> np.ndarray:
    """[2, N] int32 words of exact totals (the inverse of one shard's counter_totals)."""
    values = np.asarray([int(v) for v in totals], dtype=object)
    return np.stack([values % WORD, values // WORD]).astype(np.int32)


def init_shard(capacity: int, policy: DynamicPolicy) -> dict:
    """An empty shard: every slot free, sketch and counters zero."""
    depth, width = (policy.sketch_depth, policy.sketch_width) if policy.uses_sketch else (1, 1)
    return {
        "key_hi": jnp.zeros((capacity,), jnp.uint32),
        "key_lo": jnp.zeros((capacity,), jnp.uint32),
        "last": jnp.full((capacity,), -1, jnp.int32),
        "freq": jnp.zeros((capacity,), jnp.int32),
        "sketch": jnp.zeros((depth, width), jnp.int32),
        "counters": jnp.zeros((2, len(COUNTERS)), jnp.int32),
    }


def alive_slots(state: dict, step, policy: DynamicPolicy) -> jax.Array:
    """[C] bool: slots holding a key that has not expired at ``step``."""
    return alive_last(state["last"], step, policy)


def alive_last(last, step, policy: DynamicPolicy) -> jax.Array:
    """Whether slots whose ``last`` (any shape) is given are alive at ``step``."""
    used = last >= 0
    if policy.ttl_steps is None:
        return used
    return used & (step - last <= policy.ttl_steps)


def home_slots(hi, lo, capacity: int, policy: DynamicPolicy) -> jax.Array:
    """Home slot of each key on its shard (int32)."""
    return (key_hash(jnp, hi, lo, salt(HOME_SALT, policy.seed)) % jnp.uint32(capacity)).astype(
        jnp.int32
    )


def _victim(evictable_np, last_np, freq_np, eviction: str):
    """Window offset of the lowest-score evictable slot, and whether there is one."""
    mask = evictable_np
    scores = (freq_np, last_np) if eviction == "lfu" else (last_np,)
    for score in scores:
        masked = jnp.where(mask, score, _BIG)
        mask = mask & (masked == jnp.min(masked, axis=1, keepdims=True))
    return jnp.argmax(mask, axis=1).astype(jnp.int32), jnp.any(evictable_np, axis=1)


def _find(state: dict, alive, home_n, pos_np, hi_n, lo_n, valid_n):
    """(found_n bool, found_off_n int32): whether each valid key is in an alive slot
    (``alive(slots)``) of its window ``pos_np`` [N, P] (slots home_n + 0 .. P - 1, mod
    capacity), and the first such offset (0 when none).

    Compares the windows' low halves only ([N, P] gathers of one array, not three),
    then the high half and liveness at each key's first low-half match ([N] gathers). A
    key whose first low-half match is not its slot but which has another low-half match
    in its window is ambiguous; when some key is, a ``cond`` takes the whole-window
    comparison of both halves and liveness for every key. Both give the same result."""
    capacity = state["key_lo"].shape[0]
    lo_np = (state["key_lo"][pos_np] == lo_n[:, None]) & valid_n[:, None]
    first_n = jnp.argmax(lo_np, axis=1).astype(jnp.int32)
    slot_n = (home_n + first_n) % capacity
    whole_n = jnp.any(lo_np, axis=1) & alive(slot_n) & (state["key_hi"][slot_n] == hi_n)
    ambiguous = jnp.any(~whole_n & (jnp.sum(lo_np, axis=1, dtype=jnp.int32) > 1))

    def whole_windows(_):
        match_np = lo_np & alive(pos_np) & (state["key_hi"][pos_np] == hi_n[:, None])
        return jnp.any(match_np, axis=1), jnp.argmax(match_np, axis=1).astype(jnp.int32)

    return jax.lax.cond(ambiguous, whole_windows, lambda _: (whole_n, first_n), None)


def resolve_shard(state: dict, hi_n, lo_n, valid_n, step, policy: DynamicPolicy, insert=True):
    """(slot_n int32, -1 when absent; new_n bool; new state) for one step's keys.

    Valid keys in any order, repeats allowed (the smaller (hi, lo) wins a slot; every
    entry of a key gets its slot; ``new_n`` marks one entry per inserted key). With
    ``insert`` False the keys are only found: the state comes back unchanged.
    """
    capacity = state["last"].shape[0]
    probes = min(policy.probe_limit, capacity)
    n = hi_n.shape[0]
    home_n = home_slots(hi_n, lo_n, capacity, policy)
    pos_np = (home_n[:, None] + jnp.arange(probes)) % capacity

    def alive(at):  # liveness of the slots ``at``: gathered, no [C]-wide array
        return alive_last(state["last"][at], step, policy)

    found_n, found_off_n = _find(state, alive, home_n, pos_np, hi_n, lo_n, valid_n)
    found_slot_n = (home_n + found_off_n) % capacity  # window offset -> slot
    if not insert:
        return jnp.where(found_n, found_slot_n, -1), jnp.zeros((n,), bool), state
    pos_n = jnp.arange(n, dtype=jnp.int32)
    touch_n = jnp.where(found_n, found_slot_n, capacity)
    # one entry position per touched slot (n: untouched): the entries of a found key
    # share its slot, and the one written there stands for them (counted once)
    # (int16 when positions fit: half the [C] array to fill)
    pos_dtype = jnp.int16 if n < 2**15 else jnp.int32
    toucher_c = (
        jnp.full((capacity,), n, pos_dtype).at[touch_n].set(pos_n.astype(pos_dtype), mode="drop")
    )
    hit_n = found_n & (toucher_c[jnp.minimum(touch_n, capacity - 1)] == pos_n.astype(pos_dtype))
    last_c = state["last"].at[touch_n].set(step, mode="drop")
    freq_c = state["freq"].at[jnp.where(hit_n, found_slot_n, capacity)].add(1, mode="drop")

    missed_n = valid_n & ~found_n
    leader_n = jax.lax.cond(
        jnp.any(missed_n), key_leaders, lambda hi, lo, valid: pos_n, hi_n, lo_n, missed_n
    )
    miss_n = missed_n & (leader_n == pos_n)  # one entry per missing key
    sketch = state["sketch"]
    admitted_n = miss_n
    if policy.uses_sketch:
        rows = jnp.arange(policy.sketch_depth)
        idx_dn = jnp.stack(
            [
                key_hash(jnp, hi_n, lo_n, salt(SKETCH_SALT, policy.seed, d))
                % jnp.uint32(policy.sketch_width)
                for d in range(policy.sketch_depth)
            ]
        ).astype(jnp.int32)
        sketch = sketch.at[rows[:, None], idx_dn].add(miss_n.astype(jnp.int32)[None, :])
        estimate_n = jnp.min(sketch[rows[:, None], idx_dn], axis=0)
        admitted_n = miss_n & (estimate_n >= policy.admit_after)

    # A slot won in a round becomes ``taken``, which excludes it from every later
    # choice, so the liveness, ``touched``, ``last`` and ``freq`` the rounds read do not
    # change between rounds: the rounds carry only ``taken``, and the winners' keys,
    # last and freq are written once after them.
    def insert_round(carry):
        rounds, pending_n, slot_n, off_n, taken_c, evicted = carry
        # gathered per round (indices depend on pending: XLA does not hoist them
        # out of the loop, so a step of hits gathers nothing)
        at_np = jnp.where(pending_n[:, None], pos_np, 0)
        # liveness from last after the touches: touched slots were alive and stay so
        alive_np, taken_np = alive_last(last_c[at_np], step, policy), taken_c[at_np]
        free_np = ~alive_np & ~taken_np
        has_room_n = jnp.any(free_np, axis=1)
        choice_n = jnp.argmax(free_np, axis=1).astype(jnp.int32)
        if policy.eviction != "none":
            evictable_np = alive_np & (toucher_c[at_np] == n) & ~taken_np
            victim_n, has_victim_n = _victim(
                evictable_np, last_c[at_np], freq_c[at_np], policy.eviction
            )
            choice_n = jnp.where(has_room_n, choice_n, victim_n)
            has_room_n = has_room_n | has_victim_n
        propose_n = pending_n & has_room_n
        cand_n = (home_n + choice_n) % capacity
        cand_n = jnp.where(propose_n, cand_n, capacity)
        # the smallest (hi, lo) proposing a slot wins it: min hi, then min lo among those
        safe_n = jnp.minimum(cand_n, capacity - 1)
        min_hi_c = jnp.full((capacity,), _UMAX, jnp.uint32).at[cand_n].min(hi_n, mode="drop")
        top_n = propose_n & (min_hi_c[safe_n] == hi_n)
        lo_cand_n = jnp.where(top_n, cand_n, capacity)
        min_lo_c = jnp.full((capacity,), _UMAX, jnp.uint32).at[lo_cand_n].min(lo_n, mode="drop")
        win_n = top_n & (min_lo_c[safe_n] == lo_n)
        evicted = evicted + jnp.sum(
            win_n & alive_last(last_c[safe_n], step, policy), dtype=jnp.int32
        )
        return (
            rounds + 1,
            pending_n & ~win_n,
            jnp.where(win_n, cand_n, slot_n),
            jnp.where(win_n, choice_n, off_n),
            taken_c.at[jnp.where(win_n, cand_n, capacity)].set(True, mode="drop"),
            evicted,
        )

    carry = (
        jnp.int32(0),
        admitted_n,
        jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), jnp.int32),
        jnp.zeros((capacity,), bool),
        jnp.int32(0),
    )
    # rounds end early once no key is pending (a step of hits runs none)
    _, pending_n, slot_n, off_n, _, evicted = jax.lax.while_loop(
        lambda c: (c[0] < probes) & jnp.any(c[1]), insert_round, carry
    )
    put_n = jnp.where(slot_n >= 0, slot_n, capacity)
    key_hi = state["key_hi"].at[put_n].set(hi_n, mode="drop")
    key_lo = state["key_lo"].at[put_n].set(lo_n, mode="drop")
    last_c = last_c.at[put_n].set(step, mode="drop")
    freq_c = freq_c.at[put_n].set(1, mode="drop")
    new_n = slot_n >= 0
    probe_n = jnp.where(hit_n, found_off_n, jnp.where(new_n, off_n, 0))
    # the per-entry counts summed in one reduction: [N, 6] -> [6]
    summed = jnp.sum(
        jnp.stack([hit_n, miss_n, miss_n & ~admitted_n, new_n, pending_n, probe_n], axis=1).astype(
            jnp.int32
        ),
        axis=0,
    )
    step_counts = jnp.concatenate(
        [summed[:4], evicted[None], summed[4:], jnp.zeros((1,), jnp.int32)]
    )
    counters = add_counts(state["counters"], step_counts)
    probe_max = jnp.maximum(state["counters"][0, -1], jnp.max(probe_n))
    counters = counters.at[:, -1].set(jnp.stack([probe_max, jnp.int32(0)]))
    new_state = {
        "key_hi": key_hi,
        "key_lo": key_lo,
        "last": last_c,
        "freq": freq_c,
        "sketch": sketch,
        "counters": counters,
    }
    return jnp.where(found_n, found_slot_n, slot_n[leader_n]), new_n, new_state
