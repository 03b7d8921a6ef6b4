"""Builds feed_logs/tiny once per test session, offline, into a temporary directory."""

import socket

import pytest


@pytest.fixture(scope="session")
def feed_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def feed_builder(feed_data_dir):
    from lf_jax.input import build_dataset

    def no_network(*args, **kwargs):
        raise AssertionError("building feed_logs tried to reach the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "create_connection", no_network)
        return build_dataset("feed_logs", config="tiny", data_dir=feed_data_dir)
