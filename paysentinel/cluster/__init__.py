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

from paysentinel.devserver import SEARCH_ATTRIBUTES
from paysentinel.cluster.common import (
    TEMPORAL_SERVER_VERSION,
    TEMPORAL_SERVER_MODULE,
    SERVER_TARGETS,
    SERVICES,
    SCHEMA,
    TEMPORAL_DB_USER,
    DATABASES,
    TLS_SERVER_NAME,
    COMMAND_TIMEOUT_SECONDS,
    UI_SERVER_VERSION,
    UI_SERVER_MODULE,
    UI,
    PROCESSES,
    CONFIG_ENV,
    UI_CONFIG_DIR,
    DYNAMIC_CONFIG,
    ClusterError,
)
from paysentinel.cluster.binaries import (
    ServerBinaries,
    server_cache_dir,
    ui_server_cache_dir,
    ensure_server_binaries,
    ensure_ui_server,
)
from paysentinel.cluster.certificates import (
    Certificates,
    make_certificates,
)
from paysentinel.cluster.postgres import (
    LocalPostgres,
)
from paysentinel.cluster.ports import (
    ClusterPorts,
    ClusterState,
)
from paysentinel.cluster.config import (
    ClusterConfig,
)
from paysentinel.cluster.server import (
    TemporalCluster,
)
from paysentinel.cluster.commands import (
    state_file,
    default_pg_dir,
    pid_alive,
    stop_pid,
    env_file_text,
    detached,
)

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
    "TEMPORAL_SERVER_MODULE",
    "SERVER_TARGETS",
    "SERVICES",
    "SCHEMA",
    "TEMPORAL_DB_USER",
    "DATABASES",
    "TLS_SERVER_NAME",
    "COMMAND_TIMEOUT_SECONDS",
    "UI_SERVER_MODULE",
    "UI",
    "PROCESSES",
    "CONFIG_ENV",
    "UI_CONFIG_DIR",
    "DYNAMIC_CONFIG",
    "server_cache_dir",
    "ui_server_cache_dir",
    "LocalPostgres",
    "ClusterConfig",
    "state_file",
    "default_pg_dir",
    "pid_alive",
    "stop_pid",
    "env_file_text",
    "detached",
]
