"""Small helpers shared by the modem-side modules."""

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Unwrap an exception group holding exactly one exception.

    An async context manager that owns a nursery (Modem.open, SocketPool.open) would otherwise
    hand its caller `ExceptionGroup([SimError(...)])` for a SimError raised in the `async with`
    body, and `except SimError` would miss it. Several errors at once stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
