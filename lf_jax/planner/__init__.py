"""The embedding planner: a cost model and a greedy rule set that emit plain plan dicts.

lf_jax.embedding never imports this package; a plan from here is an ordinary dict that
lf_jax.embedding.plan.validate_plan accepts, the same as a hand-written one.

Example:
    >>> from lf_jax.planner import plan_tables
    >>> result = plan_tables(tables, features, {"data": 8, "model": 8}, batch_size=16384,
    ...                      memory_budget_bytes=8_000_000_000)
    >>> print(result.format_table())
    >>> save_plan(result.plan, "plan.json")
"""

from lf_jax.planner.cost import (
    StepCost,
    Traffic,
    format_bytes,
    simulate_layout,
    step_cost,
    table_bytes,
)
from lf_jax.planner.greedy import PlanResult, TableRow, plan_tables, strategy_label

__all__ = [
    "PlanResult",
    "StepCost",
    "TableRow",
    "Traffic",
    "format_bytes",
    "plan_tables",
    "simulate_layout",
    "step_cost",
    "strategy_label",
    "table_bytes",
]
