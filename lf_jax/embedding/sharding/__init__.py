"""One module per sharding strategy, all placing tables into stacked shard groups.

Every strategy answers one question: where does row r of table t live? The answer is
a Piece: a column slice of the table whose rows are spread over ``num_slots`` slots
(devices along the group's mesh axes) in blocks of ``rows_per_slot``. Pieces of the
same dim, mesh axes and optimizer share one stored array [slots, rows, dim], so jit
sees one device set per argument. The lookup protocol (lf_jax.embedding.lookup) is the
same for all: route ids to owners -> local lookup on the shard -> combine back.
"""

from lf_jax.embedding.sharding import (
    column_wise,
    data_parallel,
    row_wise,
    table_wise,
    table_wise_row_wise,
)

STRATEGY_MODULES = {
    "data_parallel": data_parallel,
    "table_wise": table_wise,
    "row_wise": row_wise,
    "column_wise": column_wise,
    "table_wise_row_wise": table_wise_row_wise,
}
