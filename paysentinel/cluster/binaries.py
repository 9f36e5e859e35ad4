"""The server binaries: the Temporal server, its SQL schema tool, the PostgreSQL schema files
and the Web UI server, built with ``go install`` once and kept in the cache directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paysentinel.temporal_cli import GO_FALLBACK_DIRS, _describe, _go_install
from paysentinel.cluster.common import (
    SCHEMA,
    SERVER_TARGETS,
    TEMPORAL_SERVER_MODULE,
    TEMPORAL_SERVER_VERSION,
    UI_SERVER_MODULE,
    UI_SERVER_VERSION,
    ClusterError,
)


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
