"""Unit tests run without network: any attempt to open an internet socket fails the test."""

from __future__ import annotations

import pytest
import pytest_socket


@pytest.fixture(autouse=True)
def _no_network() -> object:
    # Unix sockets stay allowed: asyncio's event loop wakes itself up through a socketpair.
    pytest_socket.disable_socket(allow_unix_socket=True)
    yield
    pytest_socket.enable_socket()
