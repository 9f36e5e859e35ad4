"""``paysentinel cluster``: a Temporal cluster on this machine (up, build, status, down)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from paysentinel.config import Settings, get_settings

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 120  # piped or logged: wide enough for the tables

cluster_app = typer.Typer(
    help="A Temporal cluster on this machine: the Temporal server as separate frontend, "
    "history, matching and worker processes on its own PostgreSQL, frontend with mTLS, and the Temporal Web UI.",
    no_args_is_help=True,
)


def _codec_endpoint(settings: Settings) -> str:
    """The codec endpoint the Web UI decodes payloads with (starters/codec_api.py)."""
    from starters.codec_api import endpoint_url

    return endpoint_url(settings)


def _cluster_dir(state_dir: Optional[str]) -> Path:
    return Path(state_dir) if state_dir else get_settings().data_dir / "cluster"


STATE_DIR_OPTION = typer.Option(
    None, "--state-dir", help="Certificates, configuration, logs and pids (default: <data dir>/cluster)"
)


@cluster_app.command("up")
def cluster_up(
    state_dir: Optional[str] = STATE_DIR_OPTION,
    namespace: str = typer.Option("default", help="The namespace to register"),
    frontend_port: int = typer.Option(7233, help="The frontend's gRPC port (clients connect here, mTLS)"),
    postgres_port: int = typer.Option(5433, help="The port of Temporal's own PostgreSQL"),
    ui_port: int = typer.Option(8080, help="The Temporal Web UI's port (HTTP, loopback)"),
    ui_codec_endpoint: Optional[str] = typer.Option(
        None,
        help="Where the Web UI decodes payloads (default: the operator API's /codec; '' for none)",
        show_default=False,
    ),
) -> None:
    """Build (first time) and start the cluster in the background; write cluster.env for clients."""
    from rich.markup import escape

    from paysentinel import cluster as tc
    from paysentinel.devserver import TemporalCliUnavailable, ensure_temporal_cli

    directory = _cluster_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = tc.state_file(directory)
    if state_path.exists() and any(tc.pid_alive(pid) for pid in tc.ClusterState.load(state_path).pids.values()):
        console.print(f"the cluster in {directory} is already running (`paysentinel cluster status`)")
        raise typer.Exit(0)
    settings = get_settings()
    say = lambda line: console.print(f"[dim]{line}[/dim]")  # noqa: E731
    try:
        binaries = tc.ensure_server_binaries(settings.cache_dir, log=say)
        cli = ensure_temporal_cli(settings.cache_dir, log=say)
    except (tc.ClusterError, TemporalCliUnavailable) as err:
        console.print("[red]cannot obtain the Temporal server:[/red]", escape(str(err)), soft_wrap=True)
        raise typer.Exit(1) from err
    ports = tc.ClusterPorts(frontend=frontend_port, frontend_http=frontend_port + 10, postgres=postgres_port, ui=ui_port)
    codec = _codec_endpoint(settings) if ui_codec_endpoint is None else ui_codec_endpoint
    cluster = tc.TemporalCluster(
        binaries,
        cli,
        directory,
        ports=ports,
        namespace=namespace,
        pg_dir=tc.default_pg_dir(directory),
        log=say,
        ui_codec_endpoint=codec or None,
    )
    try:
        asyncio.run(cluster.up())
    except tc.ClusterError as err:
        cluster.down()
        console.print("[red]the cluster did not start:[/red]", escape(str(err)), soft_wrap=True)
        raise typer.Exit(1) from err
    pids = tc.detached(cluster)
    tc.ClusterState(ports=ports, namespace=namespace, pg_dir=str(cluster.postgres.data_dir), pids=pids).save(state_path)
    env_file = directory / "cluster.env"
    env_file.write_text(tc.env_file_text(cluster))
    _cluster_table(directory)
    console.print(f"Temporal Web UI: [bold]{cluster.ui_url}[/bold]", soft_wrap=True)
    if codec and cluster.ui_url not in settings.effective_codec_cors_origins:
        console.print(
            f"[dim]For decoded payloads in it, start the operator API with "
            f"PAYSENTINEL_CODEC_CORS_ORIGINS={cluster.ui_url} (its codec endpoint: {codec}).[/dim]",
            soft_wrap=True,
        )
    console.print(
        f"Point paysentinel at it: [bold]set -a; . {env_file}; set +a[/bold], then "
        "`paysentinel up --parts worker,api,webhooks,operator,simulator` (as many of each as you like).",
        soft_wrap=True,
    )


def _cluster_table(directory) -> bool:
    from paysentinel import cluster as tc
    from paysentinel.devserver import port_in_use

    state = tc.ClusterState.load(tc.state_file(directory))
    table = Table(title=f"Temporal cluster ({directory})")
    for column in ("process", "pid", "listens on", "state"):
        table.add_column(column)
    healthy = True
    for service in tc.SERVICES:
        pid = state.pids.get(service, 0)
        alive = bool(pid) and tc.pid_alive(pid)
        healthy &= alive
        extra = {"frontend": " (gRPC, mTLS)", "worker": " (membership)"}.get(service, " (gRPC)")
        table.add_row(
            f"temporal {service}",
            str(pid),
            f"127.0.0.1:{state.ports.listening(service)}{extra}",
            "running" if alive else "[red]stopped[/red]",
        )
    pg_up = port_in_use("127.0.0.1", state.ports.postgres)
    healthy &= pg_up
    table.add_row(
        "temporal postgres",
        "-",
        f"127.0.0.1:{state.ports.postgres} (temporal, temporal_visibility; data {state.pg_dir})",
        "running" if pg_up else "[red]stopped[/red]",
    )
    ui_pid = state.pids.get(tc.UI, 0)
    ui_alive = bool(ui_pid) and tc.pid_alive(ui_pid)
    healthy &= ui_alive
    table.add_row(
        "temporal web ui",
        str(ui_pid),
        f"http://127.0.0.1:{state.ports.ui}",
        "running" if ui_alive else "[red]stopped[/red]",
    )
    console.print(table)
    return healthy


@cluster_app.command("build")
def cluster_build() -> None:
    """Build (first time) or find the cached Temporal server, schema tool and Web UI server; print where they are."""
    from rich.markup import escape

    from paysentinel import cluster as tc

    try:
        binaries = tc.ensure_server_binaries(
            get_settings().cache_dir, log=lambda line: console.print(f"[dim]{escape(line)}[/dim]")
        )
    except tc.ClusterError as err:
        console.print("[red]cannot obtain the Temporal server:[/red]", escape(str(err)), soft_wrap=True)
        raise typer.Exit(1) from err
    print(binaries.server.parent)
    print(binaries.ui_server.parent)


@cluster_app.command("status")
def cluster_status(state_dir: Optional[str] = STATE_DIR_OPTION) -> None:
    """Show the cluster's processes; exit 1 unless all run."""
    from paysentinel import cluster as tc

    directory = _cluster_dir(state_dir)
    if not tc.state_file(directory).exists():
        console.print(f"no cluster in {directory} (`paysentinel cluster up`)")
        raise typer.Exit(1)
    raise typer.Exit(0 if _cluster_table(directory) else 1)


@cluster_app.command("down")
def cluster_down(state_dir: Optional[str] = STATE_DIR_OPTION) -> None:
    """Stop the cluster's Web UI and services (by pid) and its PostgreSQL; the data stays for the next `up`."""
    from paysentinel import cluster as tc

    directory = _cluster_dir(state_dir)
    path = tc.state_file(directory)
    if not path.exists():
        console.print(f"no cluster in {directory}")
        return
    state = tc.ClusterState.load(path)
    for process in reversed(tc.PROCESSES):
        if process in state.pids:
            tc.stop_pid(state.pids[process])
    tc.LocalPostgres(Path(state.pg_dir), state.ports.postgres).stop()
    state.pids = {}
    state.save(path)
    console.print(f"the Temporal cluster in {directory} is stopped")
