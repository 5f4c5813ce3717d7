"""`uc20-tunnel`: the command line (run, emulator)."""

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from tunnel.at.errors import ModemError
from tunnel.daemon import config, control, render
from tunnel.daemon.app import Daemon
from tunnel.daemon.config import ConfigError, Settings
from tunnel.daemon.control_protocol import PING_COUNT, PING_WAIT
from tunnel.daemon.control_socket import ControlSocketError
from tunnel.daemon.secret_files import ENV_PASSWORD

log = logging.getLogger("tunnel")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="uc20-tunnel",
        description="PPP-less network adapter: SOCKS5 and TUN over the UC20 TCP/IP stack.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon", description="Run the daemon.")
    run.add_argument("--config", type=Path, help=f"TOML settings (default {config.DEFAULT_PATH})")
    run.add_argument(
        "--device",
        action="append",
        help="modem AT port: tty path, symlink, or socket://HOST:PORT; repeat for several "
        "modems (same APN and auth for all)",
    )
    run.add_argument("--baud", type=int, help="serial speed (with --emulate: pace the emulator)")
    run.add_argument("--apn", help="access point name")
    run.add_argument("--username", help="APN user name")
    run.add_argument(
        "--password",
        help="APN password (every local user can read it in /proc: prefer --password-file, "
        f"password_file in the config or {ENV_PASSWORD})",
    )
    run.add_argument(
        "--password-file",
        metavar="PATH",
        help="read the APN password from this file (no access for others: chmod 0600)",
    )
    run.add_argument("--auth", choices=("none", "pap", "chap"), help="APN authentication")
    run.add_argument("--context", type=int, help="PDP context id 1-16 (default 1)")
    run.add_argument(
        "--socks",
        action="append",
        metavar="HOST:PORT",
        help="proxy listen address (SOCKS5 and HTTP), repeatable (default 127.0.0.1:1080)",
    )
    run.add_argument("--tun", metavar="NAME", help="also expose a TUN interface with this name")
    run.add_argument(
        "--tun-route",
        action="append",
        metavar="CIDR",
        dest="tun_routes",
        help="route this prefix through the TUN interface, repeatable",
    )
    run.add_argument(
        "--emulate",
        nargs="?",
        type=_modem_count,
        const=1,
        default=None,
        metavar="N",
        help="run N built-in UC20 emulators (default 1) on pseudo-terminals (no modem needed)",
    )
    run.add_argument(
        "--control",
        metavar="PATH",
        help=f"control socket path (default {config.SYSTEM_CONTROL} for root, else "
        "$XDG_RUNTIME_DIR/uc20-tunnel/control.sock)",
    )
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default off)",
    )
    run.add_argument("--log-level", choices=config.LOG_LEVELS, help="log level (default info)")
    run.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, print it (secrets masked) and exit",
    )

    def control_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        cmd.add_argument(
            "--control",
            metavar="PATH",
            help="control socket of the daemon (default: the config's, else "
            f"$XDG_RUNTIME_DIR/uc20-tunnel/control.sock for a user, then {config.SYSTEM_CONTROL})",
        )
        cmd.add_argument("--config", type=Path, help="read the control path from this config")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        return cmd

    control_command("status", "show the daemon's and the modem's state")
    ping = control_command("ping", "ping a host through the modem (AT+QPING)")
    ping.add_argument("host")
    ping.add_argument(
        "--count", type=_int_in(PING_COUNT), default=4, help="requests, 1-10 (default 4)"
    )
    ping.add_argument(
        "--wait", type=_int_in(PING_WAIT), default=1, help="seconds per request, 1-10 (default 1)"
    )
    ntp = control_command("ntp", "ask an NTP server for the time through the modem (AT+QNTP)")
    ntp.add_argument("server", nargs="?", default="pool.ntp.org")
    ntp.add_argument("--port", type=int, default=123)
    resolve = control_command("resolve", "resolve a name through the modem (AT+QIDNSGIP)")
    resolve.add_argument("name")
    for cmd in (ping, ntp, resolve):
        cmd.add_argument(
            "--modem", metavar="NAME", default="",
            help="with several modems: ask this one (default: the one the policy picks)",
        )  # fmt: skip

    emu = sub.add_parser(
        "emulator",
        help="run a standalone fake UC20 on a pty",
        description="Run a fake UC20 on a pseudo-terminal linked at PATH until killed.",
    )
    emu.add_argument("--link", required=True, metavar="PATH", help="symlink to create for the pty")
    emu.add_argument(
        "--baud", type=int, default=0, help="pace the line at this rate (0: no pacing)"
    )
    emu.add_argument("--fault", action="append", default=[], metavar="SPEC", help=_fault_help())
    emu.add_argument("--log-level", choices=config.LOG_LEVELS, default="info")
    return top


def _int_in(allowed: range) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value not in allowed:
            raise argparse.ArgumentTypeError(
                f"{value} out of range {allowed.start}-{allowed.stop - 1}"
            )
        return value

    return parse


def _fault_help() -> str:
    try:
        from tunnel.emulator.faults import FAULT_SPECS
    except ImportError:  # pragma: no cover - the emulator ships with the package
        return "fault to inject"
    return str(FAULT_SPECS)


def _setup_logging(level: str) -> None:
    """Once: the format; each call: the level (set again once the config has named it)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(getattr(logging, level.upper()))


def _modem_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of modems, 1-16")
    return int(text)


def settings_from(args: argparse.Namespace) -> Settings:
    path = args.config
    file_values: dict[str, Any] = {}
    if path is not None:
        file_values = config.load(path)
    elif config.DEFAULT_PATH.exists():
        file_values = config.load(config.DEFAULT_PATH)
    devices: list[str] = args.device or []
    modems = None
    if len(devices) > 1:
        modems = config.modems_for_devices(devices)
    elif args.emulate is not None and args.emulate > 1:
        # Each emulator gets its own pseudo-terminal when the daemon starts.
        modems = tuple(
            config.ModemConfig(f"emu{i + 1}", 1.0, {"device": f"emulator:{i + 1}"})
            for i in range(args.emulate)
        )
    overrides = {
        "device": devices[0] if len(devices) == 1 else None,
        "modems": modems,
        "baud": args.baud,
        "apn": args.apn,
        "username": args.username,
        "password": args.password,
        "password_file": args.password_file,
        "auth": args.auth,
        "context": args.context,
        "listen": args.socks,  # the flag kept its name: config key `listen`
        "tun": args.tun,
        "tun_routes": args.tun_routes,
        "emulate": None if args.emulate is None else True,
        "control": args.control,
        "metrics": args.metrics,
        "log_level": args.log_level,
    }
    return config.build(file_values, overrides)


async def _run_daemon(daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_then_stop_listening() -> None:
                await daemon.run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_then_stop_listening)
            async for signum in signals:
                if daemon.stopping:
                    log.warning("second signal: exiting now")
                    nursery.cancel_scope.cancel()
                    return
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                daemon.stop()


def _control_paths(args: argparse.Namespace) -> list[str]:
    """The socket to ask: --control, else the config's `control`, else the defaults (a
    user's own $XDG_RUNTIME_DIR one, then the system daemon's) that exist; else the first."""
    if args.control:
        return [str(args.control)]
    path = args.config or (config.DEFAULT_PATH if config.DEFAULT_PATH.exists() else None)
    values = config.load(path) if path is not None else {}
    if "control" in values:
        return [str(values["control"])]
    candidates = config.control_candidates()
    return [p for p in candidates if os.path.exists(p)] or candidates[:1]


def _client(args: argparse.Namespace) -> int:
    message: dict[str, Any] = {"cmd": args.command}
    if args.command == "ping":
        message.update(host=args.host, count=args.count, wait=args.wait)
    elif args.command == "ntp":
        message.update(server=args.server, port=args.port)
    elif args.command == "resolve":
        message.update(name=args.name)
    if getattr(args, "modem", ""):
        message["modem"] = args.modem
    try:
        path = _control_paths(args)[0]
    except ConfigError as exc:
        print(f"uc20-tunnel: {exc}", file=sys.stderr)
        return 2
    try:
        answer = trio.run(control.request, path, message)
    except OSError as exc:
        print(f"uc20-tunnel: no daemon at {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except trio.TooSlowError:
        print(f"uc20-tunnel: the daemon at {path} did not answer in time", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"uc20-tunnel: bad answer from the daemon at {path}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("ok"):
        print(render.human(args.command, answer))
    else:
        print(f"uc20-tunnel {args.command}: {answer.get('error')}", file=sys.stderr)
    return 0 if answer.get("ok") else 1


def _expected_failures(exc: BaseException) -> list[BaseException] | None:
    """The leaves of `exc` when all are failures the daemon reports plainly; else None."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            found = _expected_failures(inner)
            if found is None:
                return None
            leaves += found
        return leaves
    return [exc] if isinstance(exc, ModemError | OSError | ControlSocketError) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("status", "ping", "ntp", "resolve"):
        return _client(args)
    if args.command == "emulator":
        _setup_logging(args.log_level)
        from tunnel.emulator import run_standalone

        try:
            run_standalone(args.link, baud=args.baud or None, faults=args.fault)
        except ValueError as exc:
            print(f"uc20-tunnel emulator: {exc}", file=sys.stderr)
            return 2
        return 0
    _setup_logging("info")  # warnings while reading the config are shown in the log's format
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"uc20-tunnel: {exc}", file=sys.stderr)
        return 2
    if args.password is not None:
        log.warning(
            "password given with --password: every local user can read it in /proc/%d/cmdline;"
            " use --password-file, password_file in the config or %s instead",
            os.getpid(),
            ENV_PASSWORD,
        )
    if args.check:
        for key, value in settings.redacted().items():
            print(f"{key} = {value!r}")
        print("configuration ok")
        return 0
    _setup_logging(settings.log_level)
    log.debug("settings %s", settings.redacted())
    try:
        trio.run(_run_daemon, Daemon(settings))
    except (ModemError, OSError, BaseExceptionGroup) as exc:
        # OSError: a taken SOCKS port, a TUN device that cannot be made (tun.DeviceError), ...
        reasons = _expected_failures(exc)
        if reasons is None:
            raise
        for reason in reasons:
            log.error("giving up: %s", reason)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
