"""Greedy planner: one strategy per table, each with the reason it was chosen.

Thresholds are fractions of the per-device memory budget (``small_fraction`` 1%,
``medium_fraction`` 25%); "bytes" of a table are its weights plus optimizer slots.

  0. A hand plan wins for every table it names (table_wise without a device is placed
     by rule 2's balancing). Its tables are charged first, and so are dynamic tables
     (TableSpec.dynamic) it does not name: row_wise over every mesh axis.
  1. small  (bytes <= 1% of budget)  -> data_parallel: replicated, no forward exchange,
     unless its update (every replica gathers every device's row gradients) would
     exchange more than EXCHANGE_FACTOR (4) x the bytes of rows split over all devices
     (and more than EXCHANGE_FLOOR, 32 MB per device and step).
  2. medium (bytes <= 25% of budget) -> table_wise (same exchange check: one owner
     serves the whole batch's ids of the table) on the device with the fewest rows in
     its stacked same-dim array, then the fewest bytes overall (largest table first), but
     only where the table fits the stack's gaps: a stacked array is as tall on every
     device as its tallest slot, so otherwise rows split over all devices cost less.
  3. big and wide (dim >= ``wide_dim``) -> column_wise(k), the smallest divisor k of dim
     whose column piece is <= 25% of budget (pieces placed table-wise).
  4. big -> row_wise over the ``model`` axis when its row shard is <= 25% of budget:
     the forward collectives stay within the model axis.
  5. otherwise row_wise over all axes: the smallest per-device share there is.

Tables go largest first. Each starts at the rule of its size class and falls to the
next rule whenever its choice would push the per-device total (allocated weights and
slots, padding of stacked arrays included, plus activations) over the budget. A table
that fits under no rule raises PlanError naming it, its bytes and the budget, before
anything is allocated. Costs come from lf_jax.planner.cost.

Example:
    >>> result = plan_tables(tables, features, {"data": 2, "model": -1}, batch_size=1024,
    ...                      memory_budget_bytes=2_000_000_000, device_count=8)
    >>> print(result.format_table())
    >>> validate_plan(result.plan, {t.name: t for t in tables}, mesh)
"""

import math
from collections.abc import Mapping, Sequence

from lf_jax.distributed.mesh import resolve_mesh_shape
from lf_jax.embedding import (
    PlanError,
    column_wise,
    data_parallel,
    row_wise,
    table_wise,
    validate_plan,
)
from lf_jax.embedding.plan import strategy_label
from lf_jax.embedding.spec import FeatureSpec, TableSpec, validate_specs
from lf_jax.planner.cost import (
    Layout,
    format_bytes,
    num_devices,
    plan_step_cost,
    table_bag_comm,
    table_bytes,
    table_step_cost,
)
from lf_jax.planner.result import PlanResult, TableRow

# A replicated or whole-table placement is taken only while its exchange bytes stay
# within this factor of a row split over every device (fewer collectives, more bytes),
# or under the floor (per device and step), where the collectives' latency dominates.
EXCHANGE_FACTOR = 4
EXCHANGE_FLOOR = 32_000_000


class _Planner:
    """The state of one greedy run: chosen entries, their reasons, and cost checks."""

    def __init__(self, tables, features, mesh_shape, batch_size, budget):
        self.tables, self.mesh_shape = list(tables), mesh_shape
        self.by_name = {t.name: t for t in self.tables}
        self.batch_size, self.budget = batch_size, budget
        self.n = num_devices(mesh_shape)
        self.features = list(features)
        self.chosen: dict[str, dict] = {}
        self.why: dict[str, str] = {}

    def layout(self, plan) -> Layout:
        return Layout.of(self.tables, plan, self.mesh_shape)

    def cost(self, plan) -> tuple[int, int]:
        """Per-device (allocated weights + slots, activations) bytes of ``plan``."""
        layout = self.layout(plan)
        activations = plan_step_cost(layout, self.features, self.batch_size).activation
        return layout.allocated_per_device(), activations

    def exchange_bytes(self, table: TableSpec, entry: dict) -> int:
        """Bytes a device receives per step for ``table`` alone under ``entry``."""
        layout = Layout.of([table], {table.name: entry}, self.mesh_shape)
        return table_step_cost(table, layout, self.features, self.batch_size).comm

    def least_loaded_device(self, table: TableSpec) -> int:
        """The device with the fewest rows in the table's stack, then fewest bytes."""
        layout = self.layout(self.chosen)
        stack = layout.stack_for(table)
        used = layout.used_per_device()
        stack_used = stack.used_rows() if stack else [0] * self.n
        return min(range(self.n), key=lambda d: (stack_used[d], int(used[d]), d))

    def candidates(
        self, table: TableSpec, small: float, medium: float, wide_dim: int, model_axis: str
    ):
        """(entry, reason) pairs in order of preference for ``table``'s size class."""
        size, every = table_bytes(table), tuple(self.mesh_shape)
        fsize = format_bytes(size)
        small_pct, medium_pct = f"{small:.0%}", f"{medium:.0%}"
        model = self.mesh_shape.get(model_axis, 1)
        has_model = 1 < model < self.n

        def shard(shards):
            return math.ceil(table.vocab_size / shards) * (
                table.bytes_per_row + table.slot_bytes_per_row()
            )

        skipped_tw = dp_note = None
        split_comm = self.exchange_bytes(table, row_wise(every))
        too_chatty = lambda comm: comm > max(EXCHANGE_FACTOR * split_comm, EXCHANGE_FLOOR)  # noqa: E731
        if size <= small * self.budget:
            dp_comm = self.exchange_bytes(table, data_parallel())
            if not too_chatty(dp_comm):
                yield (
                    data_parallel(),
                    f"{fsize} <= {small_pct} of budget: replicated, no forward exchange",
                )
            else:
                dp_note = (
                    f"{fsize} but replicas would exchange {format_bytes(dp_comm)}/step "
                    f"(> {EXCHANGE_FACTOR}x the {format_bytes(split_comm)} of a row split)"
                )
                fsize = dp_note
        if size <= medium * self.budget:
            # Same-dim table-wise tables share one stacked array whose every slot is as tall
            # as its tallest, so a whole table only pays off where it fits the stack's gaps:
            # otherwise rows split over every device cost less memory for the same traffic.
            device = self.least_loaded_device(table)
            tw_bytes = self.cost({**self.chosen, table.name: table_wise(device)})[0]
            rw_bytes = self.cost({**self.chosen, table.name: row_wise(every)})[0]
            tw_comm = self.exchange_bytes(table, table_wise(device))
            if tw_bytes <= rw_bytes and too_chatty(tw_comm):
                skipped_tw = (
                    f"{fsize}; one owner would exchange {format_bytes(tw_comm)}/step "
                    f"(> {EXCHANGE_FACTOR}x a row split)"
                )
            elif tw_bytes <= rw_bytes:
                yield (
                    table_wise(device),
                    (
                        f"{fsize} <= {medium_pct} of budget: whole table on "
                        f"device {device}, fits its d{table.dim} stack"
                    ),
                )
            else:
                padded = (
                    f"table_wise would pad every device to {format_bytes(tw_bytes)} "
                    f"(stacked d{table.dim} array)"
                )
                skipped_tw = f"{dp_note}; {padded}" if dp_note else padded
        big = f"{fsize} > {medium_pct} of budget"
        if skipped_tw is not None:
            fsize = skipped_tw
        if size > medium * self.budget and table.dim >= wide_dim:
            for k in range(2, min(table.dim, self.n) + 1):
                if table.dim % k == 0 and size / k <= medium * self.budget:
                    yield (
                        column_wise(k),
                        (
                            f"wide (dim {table.dim} >= {wide_dim}), {big}: "
                            f"{k} column pieces of {table.dim // k} on {k} devices"
                        ),
                    )
                    break
        if has_model and (size <= medium * self.budget or shard(model) <= medium * self.budget):
            yield (
                row_wise((model_axis,)),
                (
                    f"{big if size > medium * self.budget else fsize}: "
                    f"rows split over {model_axis} ({model} devices)"
                ),
            )
        why = big if size > medium * self.budget else fsize
        if has_model and shard(model) > medium * self.budget:
            why += f" and a {model_axis} shard is {format_bytes(shard(model))}"
        yield row_wise(every), f"{why}: rows split over all {self.n} devices"

    def choose(self, table: TableSpec, **rules) -> None:
        """Takes the first candidate that fits the budget; PlanError when none does."""
        first_label, weights, activations = None, 0, 0
        for entry, reason in self.candidates(table, **rules):
            weights, activations = self.cost({**self.chosen, table.name: entry})
            if weights + activations <= self.budget:
                if first_label is not None:
                    reason = f"{first_label} over budget; {reason}"
                self.chosen[table.name], self.why[table.name] = entry, reason
                return
            first_label = first_label or strategy_label(entry)
        size = table_bytes(table)
        raise PlanError(
            f"table '{table.name}' ({format_bytes(size)}, {size} bytes of weights+slots) does not "
            f"fit the per-device memory budget of {format_bytes(self.budget)} ({self.budget} "
            f"bytes) under any strategy: rows split over all {self.n} devices still need "
            f"{format_bytes(weights + activations)} per device ({format_bytes(weights)} weights+"
            f"slots, {format_bytes(activations)} activations, tables placed before it included)"
        )

    def take_hand(self, name: str, entry: dict) -> None:
        """Applies a hand entry; PlanError when it pushes a device over the budget."""
        table = self.by_name[name]
        if entry["strategy"] == "table_wise" and entry.get("device") is None:
            entry = {**entry, "device": self.least_loaded_device(table)}
        self.chosen[name], self.why[name] = entry, "hand plan"
        total = sum(self.cost(self.chosen))
        if total > self.budget:
            size = table_bytes(table)
            raise PlanError(
                f"hand plan for table '{name}' ({strategy_label(entry)}, {format_bytes(size)}, "
                f"{size} bytes of weights+slots) needs {format_bytes(total)} per device, over the "
                f"memory budget of {format_bytes(self.budget)} ({self.budget} bytes)"
            )


def _check_inputs(mesh_shape, device_count, batch_size, budget) -> dict[str, int]:
    if any(size == -1 for size in mesh_shape.values()) and device_count is None:
        raise PlanError(f"mesh shape {dict(mesh_shape)} has a -1 axis: pass device_count")
    count = device_count if device_count is not None else math.prod(mesh_shape.values())
    sizes = resolve_mesh_shape(mesh_shape, count)
    for name, value in (("batch_size", batch_size), ("memory_budget_bytes", budget)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"planner: {name} must be a positive int, got {value!r}")
    n = num_devices(sizes)
    if batch_size % n:
        raise PlanError(
            f"planner: batch_size {batch_size} is not divisible by the {n} devices "
            f"of mesh {sizes} (the batch is sharded over all axes)"
        )
    return sizes


def plan_tables(
    tables: Sequence[TableSpec],
    features: Sequence[FeatureSpec],
    mesh_shape: Mapping[str, int],
    batch_size: int,
    memory_budget_bytes: int,
    hand_plan: Mapping[str, Mapping] | None = None,
    *,
    device_count: int | None = None,
    small_fraction: float = 0.01,
    medium_fraction: float = 0.25,
    wide_dim: int = 256,
    model_axis: str = "model",
) -> PlanResult:
    """Chooses a strategy for every table (see the module docstring for the rules).

    ``mesh_shape`` may hold one -1 axis, resolved against ``device_count``; no device is
    touched. ``hand_plan`` (full or partial) overrides the tables it names.
    """
    by_name = validate_specs(tables, features)
    sizes = _check_inputs(mesh_shape, device_count, batch_size, memory_budget_bytes)
    hand = {name: dict(entry) for name, entry in (hand_plan or {}).items()}
    unknown = sorted(set(hand) - set(by_name))
    if unknown:
        raise PlanError(f"hand plan names unknown table(s) {unknown} (tables: {sorted(by_name)})")
    dynamic = [t.name for t in tables if t.dynamic is not None and t.name not in hand]
    hand.update({name: {"strategy": "row_wise", "axes": tuple(sizes)} for name in dynamic})
    hand = validate_plan(hand, {name: by_name[name] for name in hand}, sizes)

    planner = _Planner(tables, features, sizes, batch_size, memory_budget_bytes)
    order = sorted(by_name.values(), key=lambda t: (-table_bytes(t), t.name))
    for table in order:
        if table.name in hand:
            planner.take_hand(table.name, hand[table.name])
    for name in dynamic:  # keys are hashed to owners: rows split over every device
        planner.why[name] = "dynamic table: keys hashed over every device"
    rules = dict(
        small=small_fraction, medium=medium_fraction, wide_dim=wide_dim, model_axis=model_axis
    )
    for table in order:
        if table.name not in hand:
            planner.choose(table, **rules)

    plan = validate_plan({t.name: planner.chosen[t.name] for t in tables}, by_name, sizes)
    layout = planner.layout(plan)
    total = plan_step_cost(layout, features, batch_size)
    rows = []
    for table in order:
        entry = plan[table.name]
        cost = table_step_cost(table, layout, features, batch_size)
        label = strategy_label(entry)
        if entry["strategy"] == "column_wise" and entry["num_shards"] <= 4:
            label += f" dev {','.join(map(str, layout.devices_of(table.name)))}"
        rows.append(
            TableRow(
                table=table.name,
                rows=table.vocab_size,
                dim=table.dim,
                bytes=table_bytes(table),
                strategy=label,
                per_device_bytes=int(layout.table_per_device(table.name).max()),
                activation_bytes=cost.activation,
                comm_bytes=cost.comm,
                why=planner.why[table.name],
                bag_comm_bytes=table_bag_comm(table, layout, features, batch_size),
            )
        )
    return PlanResult(
        plan=plan,
        rows=tuple(rows),
        mesh_shape=sizes,
        batch_size=batch_size,
        memory_budget_bytes=memory_budget_bytes,
        weight_bytes=layout.allocated_per_device(),
        activation_bytes=total.activation,
        used_bytes=tuple(int(x) for x in layout.used_per_device()),
        comm_bytes=total.comm,
    )
