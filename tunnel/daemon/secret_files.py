"""Secrets from a private file or the environment, so none has to be on a command line.

Every local user can read `/proc/PID/cmdline`: a `--password` there is public. A secret file
must be a regular file that no "other" user may read, write or run (refused, with the chmod
that fixes it). Group access is let through with a warning: the systemd unit runs as a
transient user that reaches its files through the `dialout` group, and a member of that group
can read the stored password back from the modem (AT+QICSGP=<contextID>, 2.1) anyway.

This module only reads; what a value may be is config.py's business. Messages name the key
and the file, never the content.
"""

import logging
import os
import stat
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

# The password of the PDP context (the `password` key); beats the config file, loses to flags.
ENV_PASSWORD: Final = "UC20_TUNNEL_PASSWORD"
# A secret file is a password or a table of SOCKS users: 64 KiB is far beyond either.
MAX_SECRET_FILE: Final = 64 * 1024


class SecretFileError(ValueError):
    """A secret file cannot be used; the message names the key and the path."""


def read_private_text(key: str, path: Path) -> str:
    """The UTF-8 text of a secret file, after checking its type, size and permissions."""
    try:
        # O_NONBLOCK: a FIFO put at the path must not hang the start-up in open().
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretFileError(f"{key}: {path}: {exc.strerror or exc}") from None
    try:
        # fstat, not stat: the checks are about the file we read, whatever the path does.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{key}: {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o007:
            raise SecretFileError(
                f"{key}: {path} is open to every local user (mode {mode:04o}); "
                f"refusing it: chmod o-rwx {path}"
            )
        if mode & 0o070:
            log.warning(
                "secret file open to its group key=%s path=%s mode=%04o gid=%d: chmod 0600 "
                "unless that group is the daemon's own",
                key,
                path,
                mode,
                info.st_gid,
            )
        data = os.read(fd, MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise SecretFileError(f"{key}: {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise SecretFileError(f"{key}: {path} is larger than {MAX_SECRET_FILE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{key}: {path} is not UTF-8 text") from None


def read_secret_file(key: str, path: Path) -> str:
    """A one-value secret file: its text without the line end an editor leaves."""
    text = read_private_text(key, path)
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text
