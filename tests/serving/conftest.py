"""Fixtures for serving tests: factories of serving artifact directories exported from the
session's feed ranker checkpoint (``ranker_workdir`` in tests/conftest.py)."""

import pytest

BUCKETS = {"queries": (1, 2), "candidates": (64,)}


@pytest.fixture(scope="session")
def export_version(ranker_workdir):
    """``export_version(root, dtype)``: one more version of the ranker under ``root``."""
    from lf_jax.serving.export_serving import export_serving

    config, workdir = ranker_workdir

    def export(root, dtype="float32", version=None):
        return export_serving(config, workdir, root, dtype=dtype, version=version, **BUCKETS)

    return export


@pytest.fixture(scope="session")
def serving_root(export_version, tmp_path_factory):
    """An artifacts directory with version v0001 (float32 tables) of the ranker."""
    root = tmp_path_factory.mktemp("serving")
    result = export_version(root, "float32")
    return root, result
