"""Dynamic embedding tables: 64-bit keys -> rows through a per-shard hash table under jit.

``policy.py`` (what a TableSpec's ``dynamic`` field holds), ``keys.py`` (host-side keys
and the uint32 hashes shared by device code and the test reference), ``hash_table.py``
(one shard's batched find/admit/insert/evict), ``tables.py`` (``DynamicTables``: keys
routed to their owners over the mesh, rows and optimizer slots kept by an
EmbeddingCollection). Import the names from their modules.
"""
