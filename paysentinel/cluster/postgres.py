"""Temporal's own PostgreSQL: an instance of its own (``initdb`` + ``pg_ctl``) on a loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from paysentinel.devserver import port_in_use
from paysentinel.cluster.common import COMMAND_TIMEOUT_SECONDS, TEMPORAL_DB_USER, ClusterError


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
