"""What the planner returns: the plan dict, one explained row per table, per-device bytes,
and the plan table ``lf-jax plan`` prints (``PlanResult.format_table``).

Example:
    >>> from lf_jax.planner import plan_tables
    >>> result = plan_tables(tables, features, {"data": 2, "model": 4}, 512, 64_000_000)
    >>> print(result.format_table())  # one row per table: strategy, bytes, exchange, why
"""

import dataclasses

from lf_jax.planner.cost import format_bytes


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One explained line of a plan (bytes are per device unless named otherwise)."""

    table: str
    rows: int
    dim: int
    bytes: int  # the whole table: weights + optimizer slots
    strategy: str
    per_device_bytes: int  # the table's own rows on the device holding most of them
    activation_bytes: int
    comm_bytes: int  # forward + update exchange, received per device per step
    why: str
    bag_comm_bytes: int | None = None  # the same in bag mode, where it applies


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """A plan dict plus what it costs on each device and why each table went where."""

    plan: dict[str, dict]
    rows: tuple[TableRow, ...]
    mesh_shape: dict[str, int]
    batch_size: int
    memory_budget_bytes: int
    weight_bytes: int  # weights + slots allocated on every device (stack padding included)
    activation_bytes: int
    used_bytes: tuple[int, ...]  # [N] bytes of real rows per device
    comm_bytes: int  # bytes each device receives per step through the id/row exchange

    @property
    def device_bytes(self) -> tuple[int, ...]:
        """[N] per-device totals: allocated weights + slots + activations."""
        return tuple(self.weight_bytes + self.activation_bytes for _ in self.used_bytes)

    @property
    def max_device_bytes(self) -> int:
        return max(self.device_bytes)

    def format_table(self) -> str:
        """An aligned text table, one row per table, with header and summary lines."""
        n = len(self.used_bytes)
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        head = (
            "table",
            "rows",
            "dim",
            "bytes",
            "strategy",
            "per-device",
            "activations",
            "exchanged/step",
            "why",
        )
        body = [
            (
                r.table,
                f"{r.rows:,}",
                str(r.dim),
                format_bytes(r.bytes),
                r.strategy,
                format_bytes(r.per_device_bytes),
                format_bytes(r.activation_bytes),
                format_bytes(r.comm_bytes)
                + ("" if r.bag_comm_bytes is None else f" (bags {format_bytes(r.bag_comm_bytes)})"),
                r.why,
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        right = {1, 2, 3, 5, 6, 7}

        def line(cells):
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=False))
            ).rstrip()

        share = self.max_device_bytes / self.memory_budget_bytes
        padding = self.weight_bytes - min(self.used_bytes)
        padded = f" (up to {format_bytes(padding)} of it stack padding)" if padding else ""
        return "\n".join(
            [
                f"plan for mesh {mesh} ({n} devices), batch {self.batch_size:,} "
                f"({self.batch_size // n:,} per device), budget "
                f"{format_bytes(self.memory_budget_bytes)} per device",
                line(head),
                line(["-" * w for w in widths]),
                *map(line, body),
                f"max per device: {format_bytes(self.max_device_bytes)} of "
                f"{format_bytes(self.memory_budget_bytes)} budget ({share:.0%}) = weights+slots "
                f"{format_bytes(self.weight_bytes)}{padded} + activations "
                f"{format_bytes(self.activation_bytes)}; exchange {format_bytes(self.comm_bytes)} "
                f"received per device and step",
            ]
        )
