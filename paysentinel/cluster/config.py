"""The cluster's addresses and configuration files: what clients connect with, the server's
``config/cluster.yaml`` and dynamic configuration, and the Web UI server's configuration."""

from __future__ import annotations

from pathlib import Path

import yaml

from paysentinel.cluster.common import CONFIG_ENV, DYNAMIC_CONFIG, SERVICES, TEMPORAL_DB_USER, TLS_SERVER_NAME, UI_CONFIG_DIR
from paysentinel.cluster.certificates import Certificates
from paysentinel.cluster.ports import ClusterPorts


class ClusterConfig:
    """Addresses and configuration files of a TemporalCluster (which sets these attributes)."""

    state_dir: Path
    ports: ClusterPorts
    namespace: str
    certs: Certificates
    num_history_shards: int
    ui_codec_endpoint: str | None

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
