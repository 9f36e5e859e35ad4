"""The cluster's ports (gRPC, membership, PostgreSQL, the Web UI) and the state ``cluster.json``
keeps between ``paysentinel cluster up`` and ``down``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paysentinel.devserver import free_port, port_in_use
from paysentinel.cluster.common import UI, ClusterError


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
