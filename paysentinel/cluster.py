"""A Temporal cluster on this machine: the real server, one process per service, on PostgreSQL.

What it runs (all on loopback):

- Temporal's own PostgreSQL instance (``initdb`` into the cluster's state directory, its own
  port), with the databases ``temporal`` and ``temporal_visibility`` set up by Temporal's
  schema tool (``temporal-sql-tool``, plugin ``postgres12``);
- the Temporal server ``v1.29.1`` (``go install go.temporal.io/server/cmd/server``), as four
  processes: ``history``, ``matching``, ``frontend`` and ``worker``, each
  ``server --root <state> --config config --env cluster --allow-no-auth start --service <name>``;
- the frontend with mutual TLS: a certificate authority, a server certificate for
  127.0.0.1/localhost and a client certificate, made per cluster with ``cryptography``;
  clients (and Temporal's own system worker) present the client certificate;
- the Temporal Web UI server ``v2.42.1`` (``go install github.com/temporalio/ui-server/v2/cmd/server``,
  the version the Temporal CLI v1.5.1 embeds), one more process started after the services:
  ``server --root <state> --config ui-config --env cluster start``, serving the UI and its
  HTTP API on loopback and calling the frontend with the client certificate.

Then the namespace is registered with the Temporal CLI (``temporal operator namespace
create``) and paysentinel's search attributes through the operator service.

``paysentinel cluster up|down|status|build`` runs it in the background (pids in ``cluster.json``);
the tests use :class:`TemporalCluster` directly. Every wait is bounded; processes are stopped
by their pid.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from paysentinel.devserver import (
    GO_FALLBACK_DIRS,
    SEARCH_ATTRIBUTES,
    _describe,
    _go_install,
    ensure_search_attributes,
    free_port,
    port_in_use,
)

TEMPORAL_SERVER_VERSION = "v1.29.1"
TEMPORAL_SERVER_MODULE = "go.temporal.io/server"
SERVER_TARGETS = {"server": "cmd/server", "sql": "cmd/tools/sql"}  # binary name -> package in the module
SERVICES = ("history", "matching", "frontend", "worker")  # the order they start in
SCHEMA = "schema/postgresql/v12"  # in the server module: temporal/ and visibility/
TEMPORAL_DB_USER = "temporal"
DATABASES = {"temporal": "temporal", "temporal_visibility": "visibility"}  # database -> schema directory
TLS_SERVER_NAME = "localhost"
COMMAND_TIMEOUT_SECONDS = 120.0
UI_SERVER_VERSION = "v2.42.1"  # the Web UI server the Temporal CLI v1.5.1 embeds
UI_SERVER_MODULE = "github.com/temporalio/ui-server/v2"
UI = "ui"  # the Web UI server among the cluster's processes (its log, its pid in cluster.json)
PROCESSES = (*SERVICES, UI)  # the order they start in
CONFIG_ENV = "cluster"  # --env: the server reads config/cluster.yaml, the Web UI server ui-config/cluster.yaml
UI_CONFIG_DIR = "ui-config"

# What the server needs for paysentinel beyond its defaults (the dev server turns these on too).
DYNAMIC_CONFIG = {
    "frontend.enableUpdateWorkflowExecution": [{"value": True}],
    "frontend.enableUpdateWorkflowExecutionAsyncAccepted": [{"value": True}],
    "frontend.enableExecuteMultiOperation": [{"value": True}],
    "system.forceSearchAttributesCacheRefreshOnRead": [{"value": True}],
    "limit.maxIDLength": [{"value": 255}],
}


class ClusterError(RuntimeError):
    """The cluster could not be built, set up or started."""


# --- The server binaries --------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBinaries:
    server: Path
    sql_tool: Path
    schema_dir: Path  # .../schema/postgresql/v12
    ui_server: Path  # the Temporal Web UI server


def server_cache_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"temporal-server-{TEMPORAL_SERVER_VERSION}"


def ui_server_cache_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"temporal-ui-server-{UI_SERVER_VERSION}"


def ensure_server_binaries(cache_dir: Path, log: Callable[[str], None] = print) -> ServerBinaries:
    """The Temporal server, its SQL schema tool, the PostgreSQL schema files and the Web UI
    server, built with ``go install`` the first time and kept in
    ``cache_dir/temporal-server-<version>`` and ``cache_dir/temporal-ui-server-<version>``."""
    server, sql_tool, schema_dir = _ensure_temporal_server(cache_dir, log)
    return ServerBinaries(server, sql_tool, schema_dir, ensure_ui_server(cache_dir, log))


def _find_go(missing: str, otherwise: str) -> str:
    go = shutil.which("go") or shutil.which("go", path=os.pathsep.join(GO_FALLBACK_DIRS))
    if go is None:
        raise ClusterError(
            f"{missing} and `go` is not on PATH to build it; install Go (https://go.dev/dl/, 1.24 or newer), or {otherwise}"
        )
    return go


def ensure_ui_server(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The Temporal Web UI server (``go install github.com/temporalio/ui-server/v2/cmd/server``,
    the UI's assets embedded), built the first time into ``cache_dir/temporal-ui-server-<version>/server``."""
    home = ui_server_cache_dir(cache_dir)
    binary = home / "server"
    if os.access(binary, os.X_OK):
        log(f"Temporal Web UI server {UI_SERVER_VERSION}: using the cached binary in {home}")
        return binary
    go = _find_go(f"the Temporal Web UI server {UI_SERVER_VERSION} is not in {home}", f"place the binary `server` in {home}")
    target = f"{UI_SERVER_MODULE}/cmd/server@{UI_SERVER_VERSION}"
    log(f"Temporal Web UI server: building `go install {target}` (a minute or two the first time) ...")
    started = time.monotonic()
    build = home / "build"
    try:
        _go_install(go, target, build, log)
    except Exception as exc:  # noqa: BLE001 - said to the user with what to do
        raise ClusterError(f"go install {target} failed: {_describe(exc)}") from exc
    os.replace(build / "server", binary)  # its own directory: the Temporal server's binary is `server` too
    build.rmdir()
    log(f"Temporal Web UI server: built in {time.monotonic() - started:.0f}s")
    return binary


def _ensure_temporal_server(cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, Path, Path]:
    home = server_cache_dir(cache_dir)
    found = (home / "bin" / "server", home / "bin" / "temporal-sql-tool", home / SCHEMA)
    if _complete(*found):
        log(f"Temporal server {TEMPORAL_SERVER_VERSION}: using cached binaries in {home}")
        return found
    go = _find_go(
        f"the Temporal server {TEMPORAL_SERVER_VERSION} is not in {home}",
        f"place the binaries `server` and `temporal-sql-tool` in {home / 'bin'} and the module's {SCHEMA} in {home / SCHEMA}",
    )
    server, sql_tool, schema_dir = found
    build = home / "build"
    for name, package in SERVER_TARGETS.items():
        target = f"{TEMPORAL_SERVER_MODULE}/{package}@{TEMPORAL_SERVER_VERSION}"
        log(f"Temporal server: building `go install {target}` (several minutes the first time) ...")
        started = time.monotonic()
        try:
            _go_install(go, target, build, log)
        except Exception as exc:  # noqa: BLE001 - said to the user with what to do
            raise ClusterError(f"go install {target} failed: {_describe(exc)}") from exc
        log(f"Temporal server: {name} built in {time.monotonic() - started:.0f}s")
    modcache = subprocess.run(
        [go, "env", "GOMODCACHE"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    ).stdout.strip()
    source = Path(modcache) / f"{TEMPORAL_SERVER_MODULE}@{TEMPORAL_SERVER_VERSION}" / SCHEMA
    if not source.is_dir():
        raise ClusterError(f"the schema files are not in the Go module cache at {source}")
    if schema_dir.exists():
        shutil.rmtree(schema_dir)
    shutil.copytree(source, schema_dir)
    for path in [schema_dir, *schema_dir.rglob("*")]:  # the module cache is read-only; our copy need not be
        path.chmod(0o755 if path.is_dir() else 0o644)
    server.parent.mkdir(parents=True, exist_ok=True)
    os.replace(build / "server", server)
    os.replace(build / "sql", sql_tool)
    if not _complete(*found):
        raise ClusterError(f"after the build, {home} still lacks a binary or the schema")
    return found


def _complete(server: Path, sql_tool: Path, schema_dir: Path) -> bool:
    return (
        os.access(server, os.X_OK)
        and os.access(sql_tool, os.X_OK)
        and (schema_dir / "temporal" / "versioned").is_dir()
        and (schema_dir / "visibility" / "versioned").is_dir()
    )


# --- Certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path, *, common_name: str = "paysentinel") -> Certificates:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed
    by the CA (PEM files in ``directory``; keys mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key) -> None:
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(f"{common_name} CA"))
        .issuer_name(name(f"{common_name} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans: list | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        TLS_SERVER_NAME,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = leaf(f"{common_name}-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    certs = Certificates(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )
    pem = serialization.Encoding.PEM
    certs.ca.write_bytes(ca_cert.public_bytes(pem))
    certs.server_cert.write_bytes(server_cert.public_bytes(pem))
    certs.client_cert.write_bytes(client_cert.public_bytes(pem))
    write_key(certs.server_key, server_key)
    write_key(certs.client_key, client_key)
    return certs


# --- Temporal's own PostgreSQL ----------------------------------------------------------------


def _pg_bin() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not versions:
        raise ClusterError(
            "PostgreSQL's server programs (initdb, pg_ctl) are not installed; "
            "run `bash scripts/ensure-postgres.sh` (installs PostgreSQL)"
        )
    return versions[-1].parent


class LocalPostgres:
    """A PostgreSQL instance of its own (``initdb`` + ``pg_ctl``) on a loopback port, with one
    superuser (``user``, trusted on loopback): Temporal's own databases run on one.

    As root the server runs as the ``postgres`` user (PostgreSQL refuses root)."""

    def __init__(self, data_dir: Path, port: int, log: Callable[[str], None] = print, user: str = TEMPORAL_DB_USER) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.user = user
        self.log = log
        self.bin = _pg_bin()

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def _run(self, cmd: list[str], what: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> None:
        try:
            result = subprocess.run(
                self._as_owner(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/"
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{what} did not finish in {timeout:.0f}s") from exc
        if result.returncode != 0:
            raise ClusterError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # The postgres user must reach and own the directory.
            for parent in [self.data_dir, *self.data_dir.parents]:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise ClusterError(
                        f"{parent} is not searchable by the postgres user; put Temporal's PostgreSQL "
                        "directory somewhere it can reach (the cluster's --pg-dir)"
                    )
            shutil.chown(self.data_dir, "postgres", "postgres")
        self.data_dir.chmod(0o700)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\nlisten_addresses = '127.0.0.1'\nfsync = off\nmax_connections = 200\n")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and port_in_use("127.0.0.1", self.port)

    def start(self, timeout: float = 60.0) -> None:
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.data_dir / "server.log"),
                "-o",
                f"-p {self.port} -k {self.data_dir}",
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            f"starting PostgreSQL on port {self.port} ({self.data_dir})",
            timeout + 10,
        )

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(timeout)), "stop"],
            f"stopping PostgreSQL on port {self.port} ({self.data_dir})",
            timeout + 10,
        )

    def restart(self) -> None:
        self.stop()
        self.start()


# --- The cluster ------------------------------------------------------------------------------


@dataclass
class ClusterPorts:
    frontend: int = 7233
    frontend_http: int = 7243
    history: int = 7234
    matching: int = 7235
    worker: int = 7239
    frontend_membership: int = 6933
    history_membership: int = 6934
    matching_membership: int = 6935
    worker_membership: int = 6939
    postgres: int = 5433
    ui: int = 8080  # the Temporal Web UI server (HTTP)

    @classmethod
    def free(cls) -> ClusterPorts:
        """Ports free right now; membership ports below 32768 (Temporal's SQL membership table keeps
        them as a smallint)."""
        taken: set[int] = set()
        ports = {}
        for name in cls.__dataclass_fields__:
            ports[name] = _free_port_below(32768, taken) if name.endswith("_membership") else free_port()
            taken.add(ports[name])
        return cls(**ports)

    def grpc(self, service: str) -> int:
        return getattr(self, service)

    def membership(self, service: str) -> int:
        return getattr(self, f"{service}_membership")

    def listening(self, process: str) -> int:
        """The port that shows the process is up (the worker service serves no gRPC, only membership)."""
        if process == UI:
            return self.ui
        return self.membership(process) if process == "worker" else self.grpc(process)

    def bound(self, process: str) -> tuple[int, ...]:
        """Every port the process listens on."""
        return (self.ui,) if process == UI else (self.grpc(process), self.membership(process))


def _label(process: str) -> str:
    return "the Temporal Web UI server" if process == UI else f"Temporal's {process} service"


def _free_port_below(limit: int, taken: set[int], attempts: int = 200) -> int:
    import random

    for _ in range(attempts):
        port = random.randrange(20000, limit)
        if port not in taken and not port_in_use("127.0.0.1", port):
            return port
    raise ClusterError(f"no free port below {limit} after {attempts} tries")


@dataclass
class ClusterState:
    """What ``cluster.json`` keeps between ``paysentinel cluster up`` and ``down``."""

    ports: ClusterPorts
    namespace: str
    pg_dir: str
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        data = json.loads(path.read_text())
        return cls(
            ports=ClusterPorts(**data["ports"]),
            namespace=data["namespace"],
            pg_dir=data["pg_dir"],
            pids={k: int(v) for k, v in data.get("pids", {}).items()},
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


class TemporalCluster:
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

    # -- what clients need --

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.frontend}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.ui}"

    def client_env(self) -> dict[str, str]:
        """The TEMPORAL_* variables a paysentinel process (or the Temporal CLI) connects with."""
        return {
            "TEMPORAL_ADDRESS": self.address,
            "TEMPORAL_NAMESPACE": self.namespace,
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(self.certs.ca),
            "TEMPORAL_TLS_CLIENT_CERT_PATH": str(self.certs.client_cert),
            "TEMPORAL_TLS_CLIENT_KEY_PATH": str(self.certs.client_key),
            "TEMPORAL_TLS_SERVER_NAME": TLS_SERVER_NAME,
        }

    def log_file(self, process: str) -> Path:
        return self.state_dir / "logs" / f"{process}.log"

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

    def config(self) -> dict:
        def store(database: str, conns: int) -> dict:
            return {
                "sql": {
                    "pluginName": "postgres12",
                    "databaseName": database,
                    "connectAddr": f"127.0.0.1:{self.ports.postgres}",
                    "connectProtocol": "tcp",
                    "user": TEMPORAL_DB_USER,
                    "password": "temporal",
                    "maxConns": conns,
                    "maxIdleConns": conns,
                    "maxConnLifetime": "1h",
                }
            }

        def service(name: str) -> dict:
            rpc = {
                "grpcPort": self.ports.grpc(name),
                "membershipPort": getattr(self.ports, f"{name}_membership"),
                "bindOnIP": "127.0.0.1",
            }
            if name == "frontend":
                rpc["httpPort"] = self.ports.frontend_http
            return {"rpc": rpc}

        ca = str(self.certs.ca)
        return {
            "log": {"stdout": True, "level": "warn"},
            "persistence": {
                "defaultStore": "default",
                "visibilityStore": "visibility",
                "numHistoryShards": self.num_history_shards,
                "datastores": {"default": store("temporal", 20), "visibility": store("temporal_visibility", 10)},
            },
            "global": {
                "membership": {"maxJoinDuration": "30s", "broadcastAddress": "127.0.0.1"},
                "tls": {
                    "frontend": {
                        "server": {
                            "certFile": str(self.certs.server_cert),
                            "keyFile": str(self.certs.server_key),
                            "requireClientAuth": True,
                            "clientCaFiles": [ca],
                        },
                        "client": {"serverName": TLS_SERVER_NAME, "rootCaFiles": [ca]},
                    },
                    # Temporal's own clients of the frontend (system worker, history) present this.
                    "systemWorker": {
                        "certFile": str(self.certs.client_cert),
                        "keyFile": str(self.certs.client_key),
                        "client": {"serverName": TLS_SERVER_NAME, "rootCaFiles": [ca]},
                    },
                },
            },
            "services": {name: service(name) for name in SERVICES},
            "clusterMetadata": {
                "enableGlobalNamespace": False,
                "failoverVersionIncrement": 10,
                "masterClusterName": "active",
                "currentClusterName": "active",
                "clusterInformation": {
                    "active": {"enabled": True, "initialFailoverVersion": 1, "rpcName": "frontend", "rpcAddress": self.address}
                },
            },
            "dcRedirectionPolicy": {"policy": "noop"},
            "dynamicConfigClient": {"filepath": str(self.state_dir / "config" / "dynamicconfig.yaml"), "pollInterval": "10s"},
        }

    def ui_config(self) -> dict:
        """The Web UI server's configuration (ui-server's config/development.yaml has every key):
        on loopback, calling the frontend over mTLS with the cluster's client certificate."""
        config: dict = {
            "temporalGrpcAddress": self.address,
            "host": "127.0.0.1",
            "port": self.ports.ui,
            "publicPath": "",
            "enableUi": True,
            "defaultNamespace": self.namespace,
            "showTemporalSystemNamespace": False,
            "notifyOnNewVersion": False,
            "auth": {"enabled": False},
            "cors": {
                "allowOrigins": [self.ui_url, f"http://localhost:{self.ports.ui}"],
                "unsafeAllowAllOrigins": False,
                "cookieInsecure": True,  # plain HTTP on loopback: the CSRF cookie must reach the browser
            },
            "tls": {
                "caFile": str(self.certs.ca),
                "certFile": str(self.certs.client_cert),
                "keyFile": str(self.certs.client_key),
                "serverName": TLS_SERVER_NAME,
                "enableHostVerification": True,
            },
        }
        if self.ui_codec_endpoint:
            # Called from the browser; the operator API's codec sign-in is a cookie, hence the credentials.
            config["codec"] = {"endpoint": self.ui_codec_endpoint, "passAccessToken": False, "includeCredentials": True}
        return config

    def write_config(self) -> Path:
        directory = self.state_dir / "config"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "dynamicconfig.yaml").write_text(yaml.safe_dump(DYNAMIC_CONFIG))
        path = directory / "cluster.yaml"
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        ui_directory = self.state_dir / UI_CONFIG_DIR
        ui_directory.mkdir(parents=True, exist_ok=True)
        (ui_directory / f"{CONFIG_ENV}.yaml").write_text(yaml.safe_dump(self.ui_config(), sort_keys=False))
        return path

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


# --- `paysentinel cluster up|down|status` ---------------------------------------------------------


def state_file(state_dir: Path) -> Path:
    return Path(state_dir) / "cluster.json"


def default_pg_dir(state_dir: Path) -> Path:
    """Where Temporal's PostgreSQL keeps its data: in the state directory, unless that is not
    reachable by the ``postgres`` user the server runs as under root."""
    path = Path(state_dir) / "postgres"
    if os.geteuid() != 0:
        return path
    if all(p.stat().st_mode & 0o001 for p in Path(state_dir).parents if p.exists() and p != Path("/")):
        return path
    import hashlib

    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"paysentinel-temporal-pg-{digest}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process, SIGKILL it after ``timeout``."""
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def env_file_text(cluster: TemporalCluster) -> str:
    lines = ["# Source this file (set -a; . cluster.env) to point paysentinel at the cluster."]
    lines += [f"{key}={value}" for key, value in cluster.client_env().items()]
    return "\n".join(lines) + "\n"


def detached(cluster: TemporalCluster) -> dict[str, int]:
    """Leave the running services to themselves (``cluster up`` exits; ``cluster down`` stops them)."""
    pids = {name: process.pid for name, process in cluster.processes.items()}
    cluster.processes.clear()
    return pids


__all__ = [
    "TemporalCluster",
    "ClusterPorts",
    "ClusterState",
    "ClusterError",
    "ServerBinaries",
    "Certificates",
    "ensure_server_binaries",
    "make_certificates",
    "SEARCH_ATTRIBUTES",
    "TEMPORAL_SERVER_VERSION",
    "UI_SERVER_VERSION",
    "ensure_ui_server",
]
