"""One module per sharding strategy, all placing tables into stacked shard groups.

Every strategy answers one question: where does row r of table t live? The answer is
a Piece: a column slice of the table whose rows are spread over ``num_slots`` slots
(devices along the group's mesh axes), row r on slot r % num_slots. Pieces of the
same dim, mesh axes and optimizer share one stored array [slots, rows, dim], so jit
sees one device set per argument. The lookup protocol (lf_jax.embedding.lookup) and the
owner-routed exchange (lf_jax.embedding.exchange) are the same for all: route ids to
owners -> local lookup on the shard -> combine back; the planner's cost model reads the
same pieces (lf_jax.planner.cost).

A strategy module is the whole strategy, behind this protocol:

    NAME                                the plan entry's "strategy" value
    <NAME>(...) -> dict                 the plan-entry constructor users call
    validate(table, entry, mesh_shape)  -> entry normalised, or PlanError naming the table
    place(table, entry, mesh_shape)     -> (group mesh axes, [Piece])
    label(entry) -> str                 the planner's short text, e.g. "row_wise(model)"

A new strategy is one new module listed in STRATEGY_MODULES below.
"""

from lf_jax.embedding.sharding import (
    column_wise,
    data_parallel,
    row_wise,
    table_wise,
    table_wise_row_wise,
)

STRATEGY_MODULES = {
    module.NAME: module
    for module in (data_parallel, table_wise, row_wise, column_wise, table_wise_row_wise)
}
