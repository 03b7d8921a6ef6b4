"""Exchange capacities sized from the traffic: a ladder of static sizes and a chooser.

The one-round exchange (lf_jax.embedding.buckets) sends every owner an [S, C] block of
distinct keys, and the owner gathers, sends back, sums and updates all S x C places
whatever the batch holds. The static C (``GroupRoute.capacity``: the expected real
entries per owner + 5 sigma) assumes every entry is a distinct row; under skewed ids
(zipf) a device has far fewer distinct keys per owner than entries, and most of the
S x C places are empty.

Each step's layout reports ``most``, the largest count of distinct keys any device sends
one owner (``exchange_counts`` reads them from ``EmbeddingCollection.routing``'s
layouts). ``CapacityChooser`` keeps the last ``window`` counts per group and picks, from
a short fixed ladder, the smallest capacity that holds the largest of them plus
``margin`` standard deviations (sqrt of the count). The step is compiled once per rung
it visits, never per step (the capacities are a static argument of the jitted step: a
hashable tuple). A batch with more keys than the chosen rung is still exact: it takes
the sorted multi-round exchange (lf_jax.embedding.exchange), and its count moves the
next choice up.

A bag-mode group (lf_jax.embedding.bag_exchange) has two capacities, its entries and
its bags per owner, named "<group>/entries" and "<group>/bags", each with its own ladder.

Ladder of a group: the static capacity C0 times 2^(k/4) for integer k, from C0 / 16
(at least 8 keys) up to the first rung that always fits (every entry, or every row of
an owner), rounded up to a multiple of 8: rungs 19% apart, a handful of them in use.

Example:
    >>> chooser = CapacityChooser(coll, batch_size=4096)
    >>> step = jax.jit(train_step, static_argnames="capacities", donate_argnums=0)
    >>> for batch in batches:   # train_step(..., capacities) builds coll.routing(batch,
    ...     state, counts = step(state, batch, capacities=chooser.capacities())
    ...     chooser.observe(counts)  # counts = exchange_counts(routing)
"""

import collections
import math
from collections.abc import Mapping

import numpy as np

from lf_jax.embedding import bag_exchange
from lf_jax.errors import UserInputError

RUNG_RATIO = 2**0.25  # consecutive rungs of a ladder
LOWEST_FRACTION = 1 / 16  # lowest rung: the static capacity times this
SMALLEST = 8  # keys per owner of the lowest rung, at least


def capacity_ladder(static: int, always: int) -> tuple[int, ...]:
    """Ascending capacities: ``static`` x RUNG_RATIO^k, k from the lowest rung (static /
    16, at least SMALLEST) to the first rung >= ``always`` (replaced by ``always``:
    a capacity that covers every distinct key an owner can get), multiples of 8 except
    ``always``."""
    if static < 1 or always < 1:
        raise UserInputError(f"capacities must be positive, got {static} and {always}")
    low = max(SMALLEST, static * LOWEST_FRACTION)
    k = math.floor(math.log(low / static, RUNG_RATIO))
    rungs: list[int] = []
    while True:
        rung = -(-math.ceil(static * RUNG_RATIO**k) // 8) * 8
        if rung >= always:
            rungs.append(always)
            break
        if not rungs or rung > rungs[-1]:
            rungs.append(rung)
        k += 1
    return tuple(rungs)


def exchanged_routes(collection) -> list:
    """The collection's routes that may exchange rows with owners: rows over several
    slots, "rows" among their modes (``bag_routes``: those that may exchange bags)."""
    return [
        r for r in collection.routes if r.blocks and r.group.num_slots > 1 and "rows" in r.modes
    ]


BAG_PARTS = ("entries", "bags")  # a bag-mode group's two capacities: "<group>/entries" ...


def bag_routes(collection) -> list:
    """The collection's routes that may exchange bags (lf_jax.embedding.bag_exchange)."""
    return [r for r in collection.routes if r.blocks and "bags" in r.modes]


def capacity_names(collection) -> list[str]:
    """The names capacities go by: each rows-exchanging group, and "<group>/entries",
    "<group>/bags" of each bag-mode group (both kinds for an ``exchange="auto"`` group)."""
    names = [r.group.name for r in exchanged_routes(collection)]
    return names + [f"{r.group.name}/{part}" for r in bag_routes(collection) for part in BAG_PARTS]


def checked_capacities(collection, capacities) -> dict[str, int]:
    """{name: C} from a mapping or its items (None: {}), checked: positive ints, for
    ``capacity_names`` of ``collection``, no group given both a rows and a bag capacity."""
    given = dict(capacities or {})
    names = sorted(capacity_names(collection))
    if set(given) - set(names) or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in given.values()
    ):
        raise UserInputError(
            f"capacities {given} must be positive ints for exchanging shard groups {names}"
        )
    both = [
        r.group.name
        for r in bag_routes(collection)
        if r.group.name in given and _bags_given(r, given)
    ]
    if both:
        raise UserInputError(
            f"capacities {given}: shard groups {both} are given both a rows capacity and a "
            "bag capacity (<group>/entries, <group>/bags); a step takes one mode per group"
        )
    return given


def _bags_given(route, given: Mapping) -> bool:
    return any(f"{route.group.name}/{part}" in given for part in BAG_PARTS)


def step_modes(collection, given: Mapping) -> dict[str, str]:
    """{group: "rows" | "bags"} of each exchanging group for ``checked_capacities``
    ``given``: bags where a bag capacity is given, rows where a rows capacity is, else
    the group's default mode (``route.modes[0]``)."""
    modes = {}
    for route in collection.routes:
        if route.blocks and route.group.num_slots > 1:
            name = route.group.name
            bags = _bags_given(route, given) or (name not in given and route.modes[0] == "bags")
            modes[name] = "bags" if bags else "rows"
    return modes


def settled_modes(collection, modes: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``modes`` ({group: mode}, e.g. a checkpoint's) that apply to
    ``collection``: groups offering both modes (``exchange="auto"``), and one of them."""
    offered = {r.group.name: r.modes for r in collection.routes if len(r.modes) > 1}
    return {group: mode for group, mode in modes.items() if mode in offered.get(group, ())}


def entries_per_device(collection, route, batch_size: int) -> int:
    """M: a device's padded entries of ``route``'s group for a global ``batch_size``."""
    if batch_size % collection.num_devices:
        raise UserInputError(
            f"batch size {batch_size} does not divide over {collection.num_devices} devices"
        )
    return batch_size // collection.num_devices * len(route.out_col_e)


def static_capacities(collection, batch_size: int) -> dict[str, int]:
    """Each capacity name's capacity when none is given (``capacity_sizes``)."""
    return {name: static for name, (static, _) in capacity_sizes(collection, batch_size).items()}


def capacity_sizes(collection, batch_size: int) -> dict[str, tuple[int, int]]:
    """Each capacity name's (capacity when none is given, capacity that always fits):
    ``GroupRoute.capacity`` and the entries or rows of an owner; a bag-mode group's
    ``bag_exchange.capacities`` and every entry, every bag."""
    out = {}
    for route in exchanged_routes(collection):
        entries = entries_per_device(collection, route, batch_size)
        out[route.group.name] = (route.capacity(entries), min(entries, route.group.rows))
    for route in bag_routes(collection):
        examples = batch_size // collection.num_devices
        static = bag_exchange.capacities(route, examples, len(route.out_col_e))
        always = (examples * len(route.out_col_e), examples * route.num_out)
        for part, c, a in zip(BAG_PARTS, static, always, strict=True):
            out[f"{route.group.name}/{part}"] = (c, a)
    return out


def exchange_counts(routing: Mapping) -> dict:
    """Inside the jitted step: each group's ``most`` from ``EmbeddingCollection.routing``'s
    layouts, to return for ``CapacityChooser.observe``: an [n] array, one element per
    device, all equal (the routing takes their maximum over the mesh). It is returned
    whole: taking one device's element inside the jitted step costs an all-reduce (a
    rendezvous of every device per step); the host reads it in ``observe``. A bag-mode
    group gives two: "<group>/entries" and "<group>/bags"."""
    counts = {}
    for name, layout in routing.items():
        if isinstance(layout, bag_exchange.BagLayout):  # most [n, 2]: entries, bags
            counts.update({f"{name}/{p}": layout.most[:, i] for i, p in enumerate(BAG_PARTS)})
        else:
            counts[name] = layout.most
    return counts


def _largest(count) -> int:
    """The largest element of a count: of this process's shards for a jax.Array (every
    device holds the same value, and in a multi-process run the others' shards are not
    addressable here)."""
    shards = getattr(count, "addressable_shards", None)
    if shards is None:
        return int(np.max(np.asarray(count)))
    return max(int(np.max(np.asarray(shard.data))) for shard in shards)


class CapacityChooser:
    """Capacities (and, for ``exchange="auto"`` groups, the mode) per shard group from
    the last ``window`` steps' exchange counts.

    ``capacities()`` returns ((name, C), ...) for ``EmbeddingCollection.routing``: the
    static capacities until a count is observed, then per name the smallest rung of its
    ladder >= need = the window's largest count + ``margin`` x sqrt(that count).

    An ``auto`` group offering both modes is probed: rows for its first ``probe_steps``
    observed steps, then bags for as many, then the mode whose capacities move fewer
    bytes per owner (``bag_exchange.bag_bytes`` < ``rows_bytes``) for good: ``chosen``
    holds {group: mode}, ``probed`` {group: (rows bytes, bag bytes)}. ``modes``: modes
    decided before (a resumed run's), not probed again.
    """

    def __init__(
        self,
        collection,
        batch_size: int,
        window: int = 16,
        margin: float = 2.0,
        probe_steps: int = 4,
        modes: Mapping[str, str] | None = None,
    ):
        """``batch_size``: examples of the global batch the step routes."""
        if window < 1 or margin < 0 or probe_steps < 1:
            raise UserInputError(
                f"window and probe_steps must be >= 1 and margin >= 0, got window={window}, "
                f"margin={margin}, probe_steps={probe_steps}"
            )
        sizes = capacity_sizes(collection, batch_size)
        self.static = {name: static for name, (static, _) in sizes.items()}
        self.ladders = {name: capacity_ladder(*size) for name, size in sizes.items()}
        self.margin = margin
        self.probe_steps = probe_steps
        self.recent: dict[str, collections.deque] = {
            name: collections.deque(maxlen=window) for name in self.ladders
        }
        self.observed: collections.Counter[str] = collections.Counter()  # counts per name
        self.routes = {
            r.group.name: r for r in exchanged_routes(collection) + bag_routes(collection)
        }
        self.chosen: dict[str, str] = settled_modes(collection, modes or {})
        self.probed: dict[str, tuple[int, int]] = {}

    def observe(self, counts: Mapping) -> None:
        """Records one step's ``exchange_counts`` (device arrays, read here and reduced
        with a max: pass the previous step's counts to keep the next step's dispatch
        asynchronous)."""
        for name, count in counts.items():
            self.recent[name].append(_largest(count))
            self.observed[name] += 1

    def need(self, name: str) -> int | None:
        """Keys per owner the group's next step should hold (None before any count)."""
        if not self.recent[name]:
            return None
        most = max(self.recent[name])
        return math.ceil(most + self.margin * math.sqrt(most))

    def capacity(self, name: str) -> int:
        """The capacity ``name``'s next step gets: the rung of ``need`` (static before any
        count)."""
        need = self.need(name)
        if need is None:
            return self.static[name]
        rungs = self.ladders[name]
        return next((r for r in rungs if r >= need), rungs[-1])

    def mode(self, group: str) -> str:
        """The exchange mode of ``group``'s next step; an ``auto`` group's probe ends
        here (recorded in ``chosen``) once both modes have ``probe_steps`` counts."""
        modes = self.routes[group].modes
        if len(modes) == 1:
            return modes[0]
        if group in self.chosen:
            return self.chosen[group]
        if self.observed[group] < self.probe_steps:
            return "rows"
        entries, bags = (f"{group}/{part}" for part in BAG_PARTS)
        if self.observed[entries] < self.probe_steps:
            return "bags"
        dim = self.routes[group].group.dim
        rows_b = bag_exchange.rows_bytes(self.capacity(group), dim)
        bag_b = bag_exchange.bag_bytes(self.capacity(entries), self.capacity(bags), dim)
        self.probed[group] = (rows_b, bag_b)
        self.chosen[group] = "bags" if bag_b < rows_b else "rows"
        return self.chosen[group]

    def capacities(self) -> tuple[tuple[str, int], ...]:
        """((name, C), ...) sorted by name: hashable, a jit static argument. Each group
        is named in its next step's mode (``mode``): "<group>" for rows,
        "<group>/entries" and "<group>/bags" for bags."""
        chosen = []
        for group in self.routes:
            names = [group] if self.mode(group) == "rows" else [f"{group}/{p}" for p in BAG_PARTS]
            chosen += [(name, self.capacity(name)) for name in names]
        return tuple(sorted(chosen))
