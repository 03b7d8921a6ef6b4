"""The embedding planner: a cost model and a greedy rule set that emit plain plan dicts.

lf_jax.embedding never imports this package; a plan from here is an ordinary dict that
lf_jax.embedding.plan.validate_plan accepts, the same as a hand-written one. The cost
model prices the engine's own layout and exchange (lf_jax.planner.cost).

Example:
    >>> from lf_jax.planner import plan_tables
    >>> result = plan_tables(tables, features, {"data": 8, "model": 8}, batch_size=16384,
    ...                      memory_budget_bytes=8_000_000_000)
    >>> print(result.format_table())
    >>> save_plan(result.plan, "plan.json")
"""

from lf_jax.planner.cost import (
    Layout,
    StepCost,
    Traffic,
    format_bytes,
    plan_step_cost,
    table_bytes,
    table_step_cost,
)
from lf_jax.planner.greedy import plan_tables
from lf_jax.planner.result import PlanResult, TableRow

__all__ = [
    "Layout",
    "PlanResult",
    "StepCost",
    "TableRow",
    "Traffic",
    "format_bytes",
    "plan_step_cost",
    "plan_tables",
    "table_bytes",
    "table_step_cost",
]
