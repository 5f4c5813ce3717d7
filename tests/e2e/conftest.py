"""Fixtures for end-to-end tests."""

from collections.abc import AsyncIterator

import pytest
import trio

from tests.e2e.harness import Tunnel, start_tunnel


@pytest.fixture
async def tunnel(nursery: trio.Nursery) -> AsyncIterator[Tunnel]:
    async with start_tunnel(nursery) as t:
        yield t
