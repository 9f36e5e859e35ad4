"""The local Temporal dev server: running ``temporal server start-dev``.

Used when no ``TEMPORAL_ADDRESS`` is configured; the CLI that runs it is found or obtained by
paysentinel/temporal_cli.py (re-exported here). For a server we did not start,
:func:`ensure_search_attributes` registers the search attributes the workflows use.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

# The CLI that runs the dev server (found or obtained there; importable from here too).
from paysentinel.temporal_cli import (
    TEMPORAL_CLI_MODULE,
    TEMPORAL_CLI_VERSION,
    TemporalCliUnavailable,
    _describe,
    ensure_temporal_cli,
    temporal_cli_version,
)

__all__ = [
    "SEARCH_ATTRIBUTES",
    "TEMPORAL_CLI_MODULE",
    "TEMPORAL_CLI_VERSION",
    "DevServer",
    "DevServerError",
    "TemporalCliUnavailable",
    "ensure_search_attributes",
    "ensure_temporal_cli",
    "free_port",
    "port_in_use",
    "temporal_cli_version",
]

SEARCH_ATTRIBUTES = {
    "PaymentStatus": "Keyword",
    "OrderId": "Keyword",
    "Provider": "Keyword",
    "AmountMinor": "Int",
    "Currency": "Keyword",
    "ReviewReason": "Keyword",
}


class DevServerError(RuntimeError):
    """The dev server could not be started or did not become ready."""


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
