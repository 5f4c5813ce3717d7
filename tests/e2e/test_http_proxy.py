"""The HTTP side of the proxy port end to end: real clients (curl, wget, urllib, git, pip) ->
daemon -> emulated UC20 -> servers on 127.0.0.1 that the tests start.

Every transfer is checked byte for byte, and that it went through the modem: the servers are
named *.test where a name is possible (they resolve only on the emulator's side), and the
emulator's dial log shows each server's port.
"""

import base64
import contextlib
import hashlib
import http.server
import io
import os
import random
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import trio

from tests.helpers import http_handler, serve_tcp

NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n> \x1a\x00HTTP/1.1 200 OK\r\n\r\n'


def random_bytes(n: int, seed: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(n))
    data[1000 : 1000 + len(NASTY)] = NASTY
    return bytes(data)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for a client: none of this machine's proxy or pip settings (no
    no_proxy to bypass us, no local wheel directory), a HOME of its own, then `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("PIP_", "GIT_"))
    }
    env.update(HOME=str(home), PIP_CONFIG_FILE=os.devnull, GIT_CONFIG_NOSYSTEM="1", **extra)
    return env


async def run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    result = await trio.run_process(
        args, env=env, cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
    )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{args[0]} failed ({result.returncode}):\n{output}"
    return output


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[int]:
    """`python -m http.server` over `directory`, on 127.0.0.1 (a thread of this process)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dialled_ports(tunnel) -> set[int]:
    return {port for _, _, port in tunnel.emulator.stats.dialled}


async def test_curl_plain_and_tunnelled_downloads_and_an_upload(
    tunnel, nursery, tmp_path: Path
) -> None:
    big = random_bytes(2 * 1024 * 1024, 1)
    port = await nursery.start(serve_tcp, http_handler({"big": big}))
    proxy = f"http://127.0.0.1:{tunnel.socks_port}"
    env = clean_env(tmp_path)
    curl = ["curl", "--silent", "--show-error", "--fail", "--max-time", "120", "-x", proxy]
    with trio.fail_after(120):
        for how in ([], ["-p"]):  # absolute-URI GET, then CONNECT (--proxytunnel)
            out = tmp_path / f"big{len(how)}"
            await run([*curl, *how, f"http://files.test:{port}/big", "-o", str(out)], env)
            assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big).digest()
        upload = random_bytes(300 * 1024, 2)
        src = tmp_path / "up"
        src.write_bytes(upload)
        answer = await run([*curl, "-T", str(src), f"http://files.test:{port}/upload"], env)
    assert answer == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"
    assert port in dialled_ports(tunnel)


async def test_wget_with_http_proxy_in_the_environment(tunnel, nursery, tmp_path: Path) -> None:
    data = random_bytes(512 * 1024, 3)
    port = await nursery.start(serve_tcp, http_handler({"file.bin": data}))
    env = clean_env(tmp_path, http_proxy=f"http://127.0.0.1:{tunnel.socks_port}/")
    out = tmp_path / "file.bin"
    with trio.fail_after(120):
        url = f"http://w.test:{port}/file.bin"
        await run(["wget", "-q", "--tries=1", "-O", str(out), url], env)
    assert out.read_bytes() == data
    assert port in dialled_ports(tunnel)


async def test_python_urllib_with_a_proxy_handler(tunnel, nursery) -> None:
    data = random_bytes(256 * 1024, 4)
    port = await nursery.start(serve_tcp, http_handler({"u": data}))
    proxy = f"http://127.0.0.1:{tunnel.socks_port}"

    def fetch() -> bytes:
        # proxy_bypass() reads no_proxy from the environment: a *.test name is never in it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
        with opener.open(f"http://urllib.test:{port}/u", timeout=60) as response:
            return bytes(response.read())

    with trio.fail_after(120):
        got = await trio.to_thread.run_sync(fetch)
    assert got == data
    assert port in dialled_ports(tunnel)


async def test_git_clone_over_dumb_http_through_the_proxy(tunnel, tmp_path: Path) -> None:
    env = clean_env(tmp_path, GIT_TERMINAL_PROMPT="0")
    ident = ["-c", "user.name=t", "-c", "user.email=t@t.test", "-c", "init.defaultBranch=main"]
    src = tmp_path / "src"
    src.mkdir()
    content = random_bytes(100 * 1024, 5)
    (src / "data.bin").write_bytes(content)
    (src / "README").write_text("served through the modem\n")
    with trio.fail_after(120):
        await run(["git", *ident, "init", "-q"], env, cwd=src)
        await run(["git", *ident, "add", "."], env, cwd=src)
        await run(["git", *ident, "commit", "-q", "-m", "first"], env, cwd=src)
        served = tmp_path / "served"
        await run(["git", "clone", "-q", "--bare", str(src), str(served / "repo.git")], env)
        await run(["git", "update-server-info"], env, cwd=served / "repo.git")  # dumb HTTP
        with static_server(served) as port:
            proxied = {**env, "http_proxy": f"http://127.0.0.1:{tunnel.socks_port}"}
            dest = tmp_path / "clone"
            url = f"http://git.test:{port}/repo.git"
            await run(["git", "clone", "-q", url, str(dest)], proxied)
    assert (dest / "data.bin").read_bytes() == content
    assert (dest / "README").read_text() == "served through the modem\n"
    assert port in dialled_ports(tunnel)


def build_wheel(directory: Path) -> Path:
    """A minimal pure wheel (PEP 427), made here: demo_pkg 1.0."""
    path = directory / "demo_pkg-1.0-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": b"PAYLOAD = " + repr(NASTY).encode() + b"\n",
        "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = io.StringIO()
    for name, data in files.items():
        digest = hashlib.sha256(data).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.write(f"{name},sha256={b64},{len(data)}\n")
    record.write("demo_pkg-1.0.dist-info/RECORD,,\n")
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("demo_pkg-1.0.dist-info/RECORD", record.getvalue())
    return path


async def test_pip_download_from_a_local_index_through_the_proxy(tunnel, tmp_path: Path) -> None:
    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)
    wheel = build_wheel(root / "files")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "demo-pkg").mkdir(parents=True)
    (root / "simple" / "demo-pkg" / "index.html").write_text(
        f'<html><body><a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a>'
        "</body></html>\n"
    )
    out = tmp_path / "out"
    env = clean_env(tmp_path)
    before = len(tunnel.emulator.stats.dialled)
    with static_server(root) as port, trio.fail_after(180):
        pip = [sys.executable, "-m", "pip", "download", "--no-cache-dir", "--no-deps"]
        await run(
            [
                *pip,
                "--disable-pip-version-check",
                "--index-url",
                f"http://127.0.0.1:{port}/simple",
                "--proxy",
                f"http://127.0.0.1:{tunnel.socks_port}",
                "--dest",
                str(out),
                "demo-pkg==1.0",
            ],
            env,
        )
    assert (out / wheel.name).read_bytes() == wheel.read_bytes()
    # It went through the proxy: the modem dialled the index (the page, then the wheel).
    dials = [p for _, _, p in tunnel.emulator.stats.dialled[before:] if p == port]
    assert dials, tunnel.emulator.stats.dialled


def test_the_ci_script_installs_the_clients() -> None:
    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    for tool in ("curl:curl", "wget:wget", "git:git"):  # command:package, as .ci/run lists them
        assert tool in script, tool
