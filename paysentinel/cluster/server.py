"""The Temporal server as one process per service on its own PostgreSQL, frontend with mTLS:
set-up, the service processes, readiness, the namespace and search attributes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from paysentinel.devserver import _describe, ensure_search_attributes, port_in_use
from paysentinel.cluster.common import (
    COMMAND_TIMEOUT_SECONDS,
    CONFIG_ENV,
    DATABASES,
    PROCESSES,
    TEMPORAL_DB_USER,
    TLS_SERVER_NAME,
    UI,
    UI_CONFIG_DIR,
    ClusterError,
)
from paysentinel.cluster.binaries import ServerBinaries
from paysentinel.cluster.certificates import Certificates, make_certificates
from paysentinel.cluster.config import ClusterConfig
from paysentinel.cluster.ports import ClusterPorts, _label
from paysentinel.cluster.postgres import LocalPostgres


class TemporalCluster(ClusterConfig):
    """The Temporal server as one process per service on its own PostgreSQL, frontend with mTLS."""

    def __init__(
        self,
        binaries: ServerBinaries,
        cli: Path,
        state_dir: Path,
        *,
        ports: ClusterPorts | None = None,
        namespace: str = "default",
        pg_dir: Path | None = None,
        log: Callable[[str], None] = print,
        num_history_shards: int = 4,
        ui_codec_endpoint: str | None = None,
    ) -> None:
        self.binaries = binaries
        self.cli = Path(cli)
        self.state_dir = Path(state_dir)
        self.ports = ports or ClusterPorts()
        self.namespace = namespace
        self.log = log
        self.num_history_shards = num_history_shards
        self.postgres = LocalPostgres(pg_dir or self.state_dir / "postgres", self.ports.postgres, log)
        self.certs = Certificates(
            *(self.state_dir / "tls" / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"))
        )
        self.ui_codec_endpoint = ui_codec_endpoint  # the Web UI decodes payloads there (the operator API's /codec)
        self.processes: dict[str, subprocess.Popen] = {}

    # -- set-up --

    def prepare(self) -> None:
        """Certificates, Temporal's PostgreSQL with both schemas, the server's configuration."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        if not self.certs.ca.exists():
            make_certificates(self.certs.ca.parent)
        self.postgres.init()
        if not self.postgres.running:
            self.postgres.start()
        self.setup_schema()
        self.write_config()

    def _sql_tool(self, database: str, *args: str) -> None:
        cmd = [
            str(self.binaries.sql_tool),
            "--plugin",
            "postgres12",
            "--ep",
            "127.0.0.1",
            "-p",
            str(self.ports.postgres),
            "-u",
            TEMPORAL_DB_USER,
            "--pw",
            "temporal",
            "--db",
            database,
            *args,
        ]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"temporal-sql-tool {' '.join(args)} on {database} timed out") from exc
        if result.returncode != 0:
            raise ClusterError(
                f"temporal-sql-tool {' '.join(args)} on {database} failed: {(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def setup_schema(self) -> None:
        """Create both databases and bring their schema to this server version (idempotent)."""
        for database, schema in DATABASES.items():
            self._sql_tool(database, "create-database")  # ignores an existing database
            self._sql_tool(database, "setup-schema", "-v", "0.0")  # creates the version table if missing
            self._sql_tool(database, "update-schema", "-d", str(self.binaries.schema_dir / schema / "versioned"))

    # -- the service processes --

    def service_command(self, service: str) -> list[str]:
        return [
            str(self.binaries.server),
            "--root",
            str(self.state_dir),
            "--config",
            "config",
            "--env",
            CONFIG_ENV,
            "--allow-no-auth",
            "start",
            "--service",
            service,
        ]

    def ui_command(self) -> list[str]:
        """The Web UI server reads ``<root>/<config>/<env>.yaml``."""
        return [
            str(self.binaries.ui_server),
            "--root",
            str(self.state_dir),
            "--config",
            UI_CONFIG_DIR,
            "--env",
            CONFIG_ENV,
            "start",
        ]

    def start_service(self, service: str) -> subprocess.Popen:
        """Start one of the cluster's processes: a Temporal service or the Web UI server (``ui``)."""
        for port in self.ports.bound(service):
            if port_in_use("127.0.0.1", port):
                raise ClusterError(f"port {port} for {_label(service)} is in use")
        with open(self.log_file(service), "ab") as log:
            process = subprocess.Popen(
                self.ui_command() if service == UI else self.service_command(service),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.state_dir,
            )
        self.processes[service] = process
        return process

    def stop_service(self, service: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        process = self.processes.pop(service, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def restart_service(self, service: str) -> None:
        self.stop_service(service)
        self.wait_port_free(self.ports.listening(service))
        self.start_service(service)
        self.wait_listening(service)

    def wait_port_free(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while port_in_use("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise ClusterError(f"port {port} still in use {timeout:.0f}s after its service stopped")
            time.sleep(0.2)

    def start(self) -> None:
        """One service after the other (the first initialises the cluster's metadata in the
        database), then the Web UI server."""
        for process in PROCESSES:
            self.start_service(process)
            self.wait_listening(process)

    def wait_listening(self, service: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        port = self.ports.listening(service)
        while not port_in_use("127.0.0.1", port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{_label(service)} does not listen on {port} after {timeout:.0f}s; "
                    f"its log ({self.log_file(service)}) ends with:\n{self.log_tail(service)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        for process in reversed(PROCESSES):
            self.stop_service(process)

    def log_tail(self, service: str, lines: int = 15) -> str:
        try:
            text = self.log_file(service).read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(line[:500] for line in text.splitlines()[-lines:]) or "(the log is empty)"

    def _check_alive(self) -> None:
        for service, process in self.processes.items():
            if process.poll() is not None:
                raise ClusterError(
                    f"{_label(service)} exited with code {process.returncode}; "
                    f"its log ({self.log_file(service)}) ends with:\n{self.log_tail(service)}"
                )

    # -- readiness, namespace, search attributes --

    async def _client(self, namespace: str):
        from temporalio.client import Client
        from temporalio.service import TLSConfig

        return await Client.connect(
            self.address,
            namespace=namespace,
            tls=TLSConfig(
                server_root_ca_cert=self.certs.ca.read_bytes(),
                domain=TLS_SERVER_NAME,
                client_cert=self.certs.client_cert.read_bytes(),
                client_private_key=self.certs.client_key.read_bytes(),
            ),
        )

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the frontend answers over mTLS, the namespace is registered and usable and the
        search attributes exist."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        client = None
        while client is None:
            self._check_alive()
            try:
                connected = await asyncio.wait_for(self._client("temporal-system"), 5)
                from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

                await connected.workflow_service.get_system_info(GetSystemInfoRequest())
                client = connected
            except Exception as exc:  # noqa: BLE001 - not up yet
                client, last = None, exc
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the Temporal frontend at {self.address} did not answer in {timeout:.0f}s "
                        f"(last error: {_describe(exc)}); frontend log:\n{self.log_tail('frontend')}"
                    ) from exc
                await asyncio.sleep(0.5)
        await asyncio.to_thread(self.register_namespace, max(5.0, deadline - time.monotonic()))
        while True:
            self._check_alive()
            try:
                ns_client = await self._client(self.namespace)
                await ensure_search_attributes(ns_client, self.namespace)
                await ns_client.count_workflows("PaymentStatus = 'x'")
                return
            except Exception as exc:  # noqa: BLE001 - the namespace reaches every service in a few seconds
                last = exc
            if time.monotonic() > deadline:
                raise ClusterError(f"namespace {self.namespace} not usable after {timeout:.0f}s: {_describe(last)}")
            await asyncio.sleep(0.5)

    def cli_tls_args(self) -> list[str]:
        return [
            "--address",
            self.address,
            "--tls-ca-path",
            str(self.certs.ca),
            "--tls-cert-path",
            str(self.certs.client_cert),
            "--tls-key-path",
            str(self.certs.client_key),
            "--tls-server-name",
            TLS_SERVER_NAME,
        ]

    def register_namespace(self, timeout: float = 60.0) -> None:
        """``temporal operator namespace create`` (an existing namespace is fine)."""
        deadline = time.monotonic() + timeout
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
        while True:
            describe = subprocess.run(
                [str(self.cli), "operator", "namespace", "describe", "--namespace", self.namespace, *self.cli_tls_args()],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            if describe.returncode == 0:
                return
            create = subprocess.run(
                [
                    str(self.cli),
                    "operator",
                    "namespace",
                    "create",
                    "--namespace",
                    self.namespace,
                    "--retention",
                    "72h",
                    *self.cli_tls_args(),
                ],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            if create.returncode == 0 or "already" in (create.stderr + create.stdout).lower():
                self.log(f"Temporal cluster: namespace {self.namespace} registered")
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"`temporal operator namespace create` failed: {create.stderr.strip()}")
            time.sleep(1)

    # -- the whole thing --

    async def up(self, timeout: float = 180.0) -> None:
        await asyncio.to_thread(self.prepare)
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            self.stop()
            raise
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def down(self) -> None:
        self.stop()
        self.postgres.stop()
