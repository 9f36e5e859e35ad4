"""The local Temporal dev server: finding the ``temporal`` CLI and running ``server start-dev``.

Used when no ``TEMPORAL_ADDRESS`` is configured. For a server we did not start,
:func:`ensure_search_attributes` registers the search attributes the workflows use.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

TEMPORAL_CLI_VERSION = "v1.5.1"
TEMPORAL_CLI_MODULE = "github.com/temporalio/cli/cmd/temporal"
SEARCH_ATTRIBUTES = {
    "PaymentStatus": "Keyword",
    "OrderId": "Keyword",
    "Provider": "Keyword",
    "AmountMinor": "Int",
    "Currency": "Keyword",
    "ReviewReason": "Keyword",
}

SDK_DOWNLOAD_TIMEOUT_SECONDS = 90.0
GO_INSTALL_TIMEOUT_SECONDS = 30 * 60.0
VERSION_CHECK_TIMEOUT_SECONDS = 30.0

T = TypeVar("T")


class TemporalCliUnavailable(RuntimeError):
    """The ``temporal`` CLI is not installed and could not be obtained."""


class DevServerError(RuntimeError):
    """The dev server could not be started or did not become ready."""


# --- Finding or obtaining the CLI -------------------------------------------------------------


# Go's official tarball installs here, often not on a service's PATH.
GO_FALLBACK_DIRS: tuple[str, ...] = ("/usr/local/go/bin",)


def ensure_temporal_cli(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Return a working ``temporal`` CLI, obtaining it into ``cache_dir/bin`` if needed.

    Tries, in order: ``temporal`` on PATH, the cached binary, the Temporal SDK's own
    download, and ``go install``. Raises :class:`TemporalCliUnavailable` listing every
    attempt if none works.
    """
    cache_dir = Path(cache_dir)
    cached = cache_dir / "bin" / "temporal"
    attempts: list[str] = []

    on_path = shutil.which("temporal")
    if on_path is None:
        log("Temporal CLI: not on PATH")
        attempts.append("PATH: no `temporal` executable on PATH")
    else:
        found = _try_binary(Path(on_path), "on PATH", attempts, log)
        if found:
            return found

    if cached.exists():
        found = _try_binary(cached, "cached", attempts, log)
        if found:
            return found
    else:
        log(f"Temporal CLI: no cached binary at {cached}")
        attempts.append(f"cache: {cached} does not exist")

    download_dir = cache_dir / "sdk-download"
    log(f"Temporal CLI: downloading it with the Temporal SDK into {download_dir} ...")
    try:
        downloaded = _download_with_sdk(download_dir, SDK_DOWNLOAD_TIMEOUT_SECONDS)
        _install_file(downloaded, cached)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the user
        log(f"Temporal CLI: SDK download failed: {_describe(exc)}")
        attempts.append(f"SDK download into {download_dir}: {_describe(exc)}")
    else:
        found = _try_binary(cached, "downloaded", attempts, log)
        if found:
            return found

    go = shutil.which("go") or shutil.which("go", path=os.pathsep.join(GO_FALLBACK_DIRS))
    target = f"{TEMPORAL_CLI_MODULE}@{TEMPORAL_CLI_VERSION}"
    if go is None:
        log("Temporal CLI: `go` is not on PATH, cannot build it from source")
        attempts.append(f"go install {target}: `go` is not on PATH")
    else:
        log(f"Temporal CLI: building it with `go install {target}` (takes a few minutes the first time) ...")
        try:
            _go_install(go, target, cached.parent, log)
        except Exception as exc:  # noqa: BLE001
            log(f"Temporal CLI: go install failed: {_describe(exc)}")
            attempts.append(f"go install {target} (GOBIN={cached.parent}): {_describe(exc)}")
        else:
            found = _try_binary(cached, "built", attempts, log)
            if found:
                return found

    raise TemporalCliUnavailable(_unavailable_message(attempts, cached))


def temporal_cli_version(path: Path) -> str:
    """Run ``temporal --version`` and return its first line; raise if it does not work."""
    try:
        result = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_CHECK_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{path} --version` did not finish in {exc.timeout:.0f}s") from exc
    except OSError as exc:
        raise RuntimeError(f"`{path} --version` could not run: {exc}") from exc
    output = (result.stdout or "").strip()
    if result.returncode != 0 or not output:
        detail = (result.stderr or result.stdout or "").strip().splitlines()
        raise RuntimeError(f"`{path} --version` exited with code {result.returncode}" + (f": {detail[-1]}" if detail else ""))
    return output.splitlines()[0]


def _try_binary(path: Path, where: str, attempts: list[str], log: Callable[[str], None]) -> Path | None:
    try:
        version = temporal_cli_version(path)
    except RuntimeError as exc:
        log(f"Temporal CLI: {where} binary {path} does not work: {exc}")
        attempts.append(f"{where} binary {path}: {exc}")
        return None
    log(f"Temporal CLI: using {where} binary {path} ({version})")
    return path


def _download_with_sdk(dest_dir: Path, timeout: float) -> Path:
    """Let the Temporal SDK download its dev server CLI into ``dest_dir``; return the file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    error: BaseException | None = None
    try:
        _run_coroutine(asyncio.wait_for(_start_and_stop_sdk_server(dest_dir), timeout))
    except asyncio.TimeoutError:
        error = TimeoutError(f"no result within {timeout:.0f}s")
    except Exception as exc:  # noqa: BLE001 - the binary may be there even if the server failed
        error = exc
    # The SDK names the file "temporal-sdk-python-<sdk version>" (or "temporal-<version>").
    candidates = [
        p for p in dest_dir.glob("temporal-*") if p.is_file() and not p.name.endswith(".downloading") and os.access(p, os.X_OK)
    ]
    if candidates:
        return max(candidates, key=lambda p: p.stat().st_mtime)
    if error is not None:
        raise error
    raise FileNotFoundError(f"the SDK started a server but no `temporal-*` executable is in {dest_dir}")


async def _start_and_stop_sdk_server(dest_dir: Path) -> None:
    from temporalio.testing import WorkflowEnvironment

    env = await WorkflowEnvironment.start_local(
        download_dest_dir=str(dest_dir),
        dev_server_startup_timeout=timedelta(seconds=30),
    )
    await env.shutdown()


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _install_file(source: Path, dest: Path) -> None:
    """Hard-link (or copy) ``source`` to ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)


def _go_install(go: str, target: str, gobin: Path, log: Callable[[str], None]) -> None:
    gobin.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(gobin)}
    proc = subprocess.Popen(
        [go, "install", target],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(GO_INSTALL_TIMEOUT_SECONDS, kill_on_timeout)
    timer.start()
    tail: deque[str] = deque(maxlen=5)
    downloads = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if line.startswith("go: downloading "):
                downloads += 1
                if downloads % 25 == 0:
                    log(f"  go: {downloads} modules downloaded so far ...")
            else:
                log(f"  {line}")
        returncode = proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise TimeoutError(f"`go install` did not finish within {GO_INSTALL_TIMEOUT_SECONDS / 60:.0f} minutes")
    if returncode != 0:
        detail = " | ".join(tail) or "no output"
        raise RuntimeError(f"`go install` exited with code {returncode}: {detail}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _unavailable_message(attempts: list[str], cached: Path) -> str:
    lines = ["The Temporal CLI (`temporal`) is not available; tried:"]
    lines += [f"  {i}. {attempt}" for i, attempt in enumerate(attempts, start=1)]
    lines += [
        "What you can do:",
        "  - install the Temporal CLI (https://docs.temporal.io/cli#install) and put it on PATH,",
        f"    or place the binary at {cached};",
        "  - or run a Temporal server yourself and set TEMPORAL_ADDRESS=host:port to use it.",
    ]
    return "\n".join(lines)


# --- Running the dev server -------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something else holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class DevServer:
    """``temporal server start-dev`` as a child process.

    ``ui_port=None`` runs it headless; ``db_filename=None`` keeps its state in memory.
    Use :meth:`start`, :meth:`wait_ready` and :meth:`stop`, or ``async with DevServer(...)``.
    """

    def __init__(
        self,
        cli: Path,
        *,
        log_file: Path,
        ip: str = "127.0.0.1",
        port: int = 7233,
        ui_port: int | None = None,
        db_filename: Path | None = None,
        namespace: str = "default",
        stop_timeout: float = 5.0,
        ui_codec_endpoint: str | None = None,
    ) -> None:
        self.cli = Path(cli)
        self.log_file = Path(log_file)
        self.ip = ip
        self.port = port
        self.ui_port = ui_port
        self.db_filename = Path(db_filename) if db_filename is not None else None
        self.namespace = namespace
        self.stop_timeout = stop_timeout
        self.ui_codec_endpoint = ui_codec_endpoint  # the Web UI decodes payloads there (starters/codec_api.py)
        self.client: Client | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def ui_url(self) -> str | None:
        return None if self.ui_port is None else f"http://{self.ip}:{self.ui_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        cmd = [
            str(self.cli),
            "server",
            "start-dev",
            "--ip",
            self.ip,
            "--port",
            str(self.port),
            "--namespace",
            self.namespace,
            "--log-level",
            "warn",
        ]
        cmd += ["--headless"] if self.ui_port is None else ["--ui-port", str(self.ui_port)]
        if self.ui_port is not None and self.ui_codec_endpoint:
            cmd += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        if self.db_filename is not None:
            cmd += ["--db-filename", str(self.db_filename)]
        for name, kind in SEARCH_ATTRIBUTES.items():
            cmd += ["--search-attribute", f"{name}={kind}"]
        return cmd

    def start(self) -> None:
        if self.running:
            return
        self._check_ports()
        if self.db_filename is not None:
            self.db_filename.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _check_ports(self) -> None:
        if port_in_use(self.ip, self.port):
            raise DevServerError(
                f"port {self.port} is in use: another Temporal server? "
                "set TEMPORAL_ADDRESS to use it, or PAYSENTINEL_TEMPORAL_PORT to pick another port"
            )
        if self.ui_port is not None and port_in_use(self.ip, self.ui_port):
            raise DevServerError(
                f"port {self.ui_port} (Temporal UI) is in use: set PAYSENTINEL_TEMPORAL_UI_PORT to pick another port"
            )

    async def wait_ready(self, timeout: float = 30.0) -> Client:
        """Wait until the server accepts a client connection; return that client."""
        if self._process is None:
            raise DevServerError("the dev server has not been started")
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            code = self._process.poll()
            if code is not None:
                raise DevServerError(
                    f"the Temporal dev server exited with code {code} during start-up; "
                    f"its log ({self.log_file}) ends with:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self.client = await asyncio.wait_for(Client.connect(self.address, namespace=self.namespace), min(5.0, remaining))
                return self.client
            except Exception as exc:  # noqa: BLE001 - not up yet; retry until the deadline
                last_error = exc
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        raise DevServerError(
            f"the Temporal dev server at {self.address} was not ready after {timeout:.0f}s "
            f"(last error: {_describe(last_error) if last_error else 'none'}); "
            f"its log ({self.log_file}) ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read the log: {exc})"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(the log is empty)"

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited after ``stop_timeout``."""
        process, self._process = self._process, None
        self.client = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def __aenter__(self) -> DevServer:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)


# --- Search attributes on a server we did not start -------------------------------------------


async def ensure_search_attributes(client: Client, namespace: str | None = None) -> list[str]:
    """Register any of :data:`SEARCH_ATTRIBUTES` missing on the server; return the names added.

    Raises ``RuntimeError`` if an attribute exists with a different type.
    """
    namespace = namespace or client.namespace
    listed = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    existing = {**dict(listed.system_attributes), **dict(listed.custom_attributes)}
    missing: dict[str, Any] = {}
    for name, kind in SEARCH_ATTRIBUTES.items():
        wanted = IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{_snake_upper(kind)}")
        if name not in existing:
            missing[name] = wanted
        elif existing[name] != wanted:
            actual = IndexedValueType.Name(existing[name]).removeprefix("INDEXED_VALUE_TYPE_")
            raise RuntimeError(
                f"search attribute {name} exists in namespace {namespace!r} as {actual}, but paysentinel needs {kind}"
            )
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(search_attributes=missing, namespace=namespace)
        )
    except RPCError as exc:
        if exc.status != RPCStatusCode.ALREADY_EXISTS:
            raise
    return list(missing)


def _snake_upper(kind: str) -> str:
    # "KeywordList" -> "KEYWORD_LIST"
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(kind)).upper()
