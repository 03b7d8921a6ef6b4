"""The synthetic tfds datasets, one builder per folder: ``<name>/<name>.py`` plus the
simulator it draws from.

``lf_jax.input.datasets.build_dataset(name, config, data_dir)`` imports a builder by its
file and builds it offline; the simulators are importable on their own, e.g.
``lf_jax.data.feed_logs.simulator`` (the world the feed_logs sessions are drawn from).
"""
