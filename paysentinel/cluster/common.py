"""What the cluster's modules share: the server and Web UI versions, the services and their
order, Temporal's databases, the dynamic configuration paysentinel needs, and ClusterError."""

from __future__ import annotations

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
