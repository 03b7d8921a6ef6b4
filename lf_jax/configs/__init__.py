"""The shipped config files, one ``get_config(arg)`` per module.

They are plain Python files loaded by path (``lf_jax.configuration.load_config``); an
installed package names them without a path: ``lf-jax plan --config feed_ranker:size=large``
loads ``lf_jax/configs/feed_ranker.py`` with ``size=large``. In a checkout the top-level
``configs`` link points here, so ``--config configs/feed_ranker.py`` works as well.
"""
