"""Fixtures of the netns layer."""

import pytest

from tests.support.redis_server import password_server


@pytest.fixture
def server(tmp_path):
    """A password-protected redis-server on its own unix socket, for one test."""
    yield from password_server(tmp_path)
