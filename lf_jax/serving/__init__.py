"""Serving: self-contained artifacts (jax.export), the feature store and the HTTP server.

See README "Serving" and docs/architecture.md; modules: feed_features (row layouts),
feature_store, functions (served computations), artifact (files, loader), export and
export_serving (writers), service (batching, hot swap), server (HTTP), commands (CLI).
"""
