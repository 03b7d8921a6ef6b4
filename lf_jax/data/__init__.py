"""The synthetic tfds datasets, one folder each: ``<name>/<name>.py`` (the builder) and
``<name>/simulator.py`` (the world it draws from).

Build them with ``lf_jax.input.build_dataset(name, config, data_dir)``, which imports the
builder by its file under a dot-free module name (tfds resolves the code of a builder in
a dotted module through importlib_resources, not a dependency of lf_jax). The simulators
are ordinary modules: ``from lf_jax.data.feed_logs import simulator``.
"""
