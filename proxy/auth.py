"""RFC 1929 username/password: the credentials, the check, and the per-source pause.

The answer to a guess must teach nothing but "wrong": passwords are kept and compared as keyed
digests (fixed length, so the comparison takes the same time whatever the guess's length;
`hmac.compare_digest` on raw bytes of different lengths returns early), an unknown user pays
the same digest and comparison, and a guess that arrives while its source is paused is answered
with the same failure byte, unchecked. Never logs a password.
"""

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from typing import Final

from proxy.admission import AuthThrottle
from proxy.ratelog import LogLimiter
from proxy.socks5 import Authenticate, AuthPolicy

_RFC1929_MAX: Final = 255  # ULEN and PLEN are one octet


class Authenticator:
    """The configured users (username → password; none: no authentication)."""

    def __init__(self, users: Mapping[str, str], throttle: AuthThrottle, logs: LogLimiter) -> None:
        self._secret = secrets.token_bytes(32)  # per process: the digests mean nothing outside
        self._users = {
            _credential("username", name): self._digest(_credential("password", password))
            for name, password in users.items()
        }
        self._nobody = self._digest(b"")
        self.policy = AuthPolicy.USERNAME_PASSWORD if self._users else AuthPolicy.NO_AUTH
        self.throttle = throttle
        self._logs = logs

    def check(self, key: str, peer: str, event: Authenticate) -> bool:
        """Whether `event` from source `key` logs in; counts the failure against the source."""
        user = event.username.decode("utf-8", "backslashreplace")
        if self.throttle.paused_for(key) > 0:  # a connection accepted before the pause began
            self._logs.log(
                logging.WARNING, "auth-paused", "auth refused client=%s user=%r reason=paused",
                peer, user,
            )  # fmt: skip
            return False
        if self._password_ok(event.username, event.password):
            self.throttle.succeeded(key)
            return True
        self._logs.log(logging.WARNING, "auth-failed", "auth failed client=%s user=%r", peer, user)
        pause = self.throttle.failed(key)
        if pause is not None:
            self._logs.log(
                logging.WARNING, "auth-pause", "auth paused source=%s secs=%.0f client=%s",
                key, pause, peer,
            )  # fmt: skip
        return False

    def _digest(self, password: bytes) -> bytes:
        return hmac.new(self._secret, password, hashlib.sha256).digest()

    def _password_ok(self, username: bytes, password: bytes) -> bool:
        # The username lookup is not constant-time: names are not secrets.
        expected = self._users.get(username)
        match = hmac.compare_digest(self._digest(password), expected or self._nobody)
        return match and expected is not None


def _credential(what: str, value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > _RFC1929_MAX:
        raise ValueError(f"users: {what} longer than {_RFC1929_MAX} bytes (RFC 1929)")
    return raw
