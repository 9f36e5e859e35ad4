"""What ``paysentinel cluster up|down|status`` uses beyond TemporalCluster: the state file,
where Temporal's PostgreSQL keeps its data, the background processes' pids, and ``cluster.env``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from paysentinel.cluster.server import TemporalCluster


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
