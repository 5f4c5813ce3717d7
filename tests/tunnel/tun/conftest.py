"""Fixtures for the TUN tests: each test runs in its own network namespace."""

from collections.abc import Iterator

import pytest
import trio

from tests.tunnel.tun.fakes import HostUplink
from tests.tunnel.tun.netns import entered, namespace
from tunnel.tun import TunFront, TunSettings

ROUTES = ("198.18.0.0/15", "192.0.2.0/24")


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh namespace the test (the main thread) runs in."""
    with namespace() as name, entered(name):
        yield name


@pytest.fixture
def uplink() -> HostUplink:
    return HostUplink()


@pytest.fixture
def tun_settings() -> TunSettings:
    return TunSettings("uc0", routes=ROUTES)


@pytest.fixture
async def front(
    netns: str, nursery: trio.Nursery, uplink: HostUplink, tun_settings: TunSettings
) -> TunFront:
    tun = TunFront(uplink, tun_settings)
    with trio.fail_after(10):
        await nursery.start(tun.serve)
    return tun
