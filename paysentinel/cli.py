"""The ``paysentinel`` command: run the whole system or one part of it."""

from __future__ import annotations

import asyncio
import os
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from paysentinel.cluster_cli import cluster_app
from paysentinel.config import Settings, get_settings
from paysentinel.merchant_cli import key_app, merchant_app
from paysentinel.operator_cli import audit_app, operator_app, payment_app, reconcile_app, review_app
from paysentinel.runner import PARTS, run_parts, run_processes

app = typer.Typer(help="paysentinel: trustworthy payment results on Temporal.", no_args_is_help=True)
db_app = typer.Typer(help="Application database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(review_app, name="review")
app.add_typer(payment_app, name="payment")
app.add_typer(reconcile_app, name="reconcile")
app.add_typer(audit_app, name="audit")
app.add_typer(operator_app, name="operator")
app.add_typer(merchant_app, name="merchant")
app.add_typer(key_app, name="key")
console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 120  # piped or logged: wide enough for the tables


def _logging(verbose: bool) -> None:
    from paysentinel import logs

    logs.configure(get_settings().log_format, verbose)


def _migrate(settings: Settings) -> None:
    from paysentinel import db

    db.upgrade(settings.effective_database_url)


def _secured(settings: Settings, parts: list[str]) -> Settings:
    """The development profile's generated secrets, or a refusal without secrets of our own."""
    from rich.markup import escape

    from paysentinel.profile import SecretsRefused, secured

    try:
        return secured(settings, parts, PARTS)
    except SecretsRefused as err:
        console.print("[red]error:[/red]", escape(str(err)), soft_wrap=True)
        raise typer.Exit(1) from err


def _run(settings: Settings, parts: list[str], processes: bool = False, verbose: bool = False, workers: int = 1) -> None:
    settings = _secured(settings, parts)
    try:
        if processes and (len(parts) > 1 or workers > 1):
            asyncio.run(run_processes(settings, parts, verbose=verbose, workers=workers))
        else:
            asyncio.run(run_parts(settings, parts))
    except RuntimeError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err


@app.command()
def up(
    parts: str = typer.Option(",".join(PARTS), help="Comma-separated parts to run: " + ", ".join(PARTS)),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    processes: bool = typer.Option(
        False,
        "--processes/--one-process",
        help="Each part in a process of its own (the worker does not share an event loop with the HTTP "
        "servers; stopping stops them all, a part that exits stops the rest), or all in this one",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=32,
        help="With --processes: run the worker as this many processes on the task queue (a worker process uses "
        "one core at most); the k-th extra one serves its metrics on the metrics ports + 100·k",
    ),
) -> None:
    """Run the whole system locally: Temporal dev server (unless TEMPORAL_ADDRESS is set),
    the provider simulator, the worker, the checkout API, the webhook receiver and the operator API."""
    _logging(verbose)
    settings = get_settings()
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise typer.BadParameter(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if workers > 1 and not (processes and "worker" in chosen):
        raise typer.BadParameter("--workers needs --processes and the worker among the parts", param_hint="--workers")
    settings = _secured(settings, chosen)
    server = None
    from paysentinel.temporal import configured_address

    try:
        address = configured_address(settings)
    except RuntimeError as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from err
    if not address:
        from paysentinel.devserver import DevServer, DevServerError, TemporalCliUnavailable, ensure_temporal_cli

        try:
            cli = ensure_temporal_cli(settings.cache_dir, log=lambda line: console.print(f"[dim]{line}[/dim]"))
        except TemporalCliUnavailable as err:
            console.print(f"[red]cannot obtain the Temporal CLI:[/red]\n{err}")
            raise typer.Exit(1) from err
        server = DevServer(
            cli,
            log_file=settings.data_dir / "temporal.log",
            ip=settings.host,
            port=settings.temporal_port,
            ui_port=settings.temporal_ui_port,
            db_filename=settings.data_dir / "temporal.db",
            namespace=settings.temporal_namespace,
            ui_codec_endpoint=_codec_endpoint(settings),
        )
        try:
            server.start()
            asyncio.run(server.wait_ready(60))
        except DevServerError as err:
            server.stop()
            console.print(f"[red]Temporal dev server did not start:[/red] {err}")
            raise typer.Exit(1) from err
    _migrate(settings)
    merchant_key = _development_merchant_key(settings, chosen)
    _print_where(settings, chosen, server, merchant_key, processes, workers)
    try:
        _run(settings, chosen, processes, verbose, workers)
    finally:
        if server is not None:
            console.print("stopping the Temporal dev server")
            server.stop()


def _development_merchant_key(settings: Settings, parts: list[str]) -> str:
    """The development profile's merchant key (merchant demo, every scope); outside it, nothing."""
    from paysentinel.profile import development_merchant_key, not_development

    if not_development(settings, parts, PARTS):
        return ""
    return asyncio.run(development_merchant_key(settings))


def _codec_endpoint(settings: Settings) -> str:
    """The codec endpoint the dev server's Web UI decodes payloads with (starters/codec_api.py)."""
    from starters.codec_api import endpoint_url

    return endpoint_url(settings)


def _print_where(
    settings: Settings, parts: list[str], server, merchant_key: str = "", processes: bool = False, workers: int = 1
) -> None:
    table = Table(title="paysentinel is running (Ctrl-C stops everything)", show_header=True)
    table.add_column("part")
    table.add_column("where", overflow="fold")  # a long path or URL wraps; nothing is cut short
    if server is not None:
        table.add_row("Temporal dev server", f"{server.address}  (state: {server.db_filename})")
        table.add_row("Temporal Web UI", server.ui_url or "-")
    else:
        from paysentinel.temporal import connect_options

        options = connect_options(settings)
        tls = (
            "mTLS"
            if getattr(options.get("tls"), "client_cert", None)
            else ("API key" if options.get("api_key") else ("TLS" if options.get("tls") else "no TLS"))
        )
        table.add_row("Temporal", f"{options['target_host']}  (namespace {options['namespace']}, {tls})")
    where = {
        "simulator": f"{settings.effective_simulator_url}  (control API /control, payer pages /pay)",
        "worker": f"task queue {settings.task_queue}",
        "api": f"http://{settings.host}:{settings.api_port}  (POST /payments, docs at /docs)",
        "webhooks": f"{settings.effective_webhook_base_url}/webhooks/<provider>",
        "operator": f"http://{settings.host}:{settings.operator_port}/operator  (reviews, reconciliation, audit; "
        "keep it private)",
    }
    for part in parts:
        table.add_row(part, where[part])
    if "api" in parts:
        table.add_row("metrics", f"http://{settings.host}:{settings.api_port}/metrics  (Prometheus)")
    elif "operator" in parts:
        table.add_row("metrics", f"http://{settings.host}:{settings.operator_port}/metrics  (Prometheus)")
    if "worker" in parts and processes and (len(parts) > 1 or workers > 1):
        table.add_row(
            "processes", f"each part in its own; the worker's metrics on http://{settings.host}:{settings.metrics_port}/metrics"
        )
    if "worker" in parts and processes and workers > 1:
        table.add_row("worker processes", f"{workers} on task queue {settings.task_queue} (metrics ports + 100 for each more)")
    if "worker" in parts and settings.sdk_metrics_port:
        table.add_row("worker metrics", f"http://{settings.host}:{settings.sdk_metrics_port}/metrics  (Temporal SDK)")
    if "worker" in parts and settings.monitor_interval_seconds > 0:
        alerts_to = ", ".join(filter(None, [settings.alert_email, settings.alert_webhook_url])) or "the worker log"
        table.add_row("monitor", f"every {settings.monitor_interval_seconds:g}s, alerts to {alerts_to}")
    if "worker" in parts and settings.reconcile_enabled:
        table.add_row(
            "reconciliation",
            f"daily at {settings.reconcile_at} {settings.settlement_timezone} "
            f"(catches up {settings.reconcile_catchup_days} days)",
        )
    table.add_row("app database", settings.effective_database_url)
    if merchant_key:
        table.add_row("merchant key", "merchant demo, every scope: below (shown because this is the development profile)")
    console.print(table)
    if merchant_key:
        # Outside the table, unwrapped, so no terminal width breaks or cuts it.
        console.print(f"Merchant key: {merchant_key}", soft_wrap=True, highlight=False)
    console.print("Try it: [bold]paysentinel demo[/bold] in another terminal.")


@app.command()
def worker(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run only the worker (workflows and activities)."""
    _logging(verbose)
    _run(get_settings(), ["worker"])


@app.command()
def api(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run only the checkout API."""
    _logging(verbose)
    _run(get_settings(), ["api"])


@app.command()
def webhooks(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run only the webhook receiver."""
    _logging(verbose)
    _run(get_settings(), ["webhooks"])


@app.command("operator-api")
def operator_api(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run only the operator API (its own port: PAYSENTINEL_OPERATOR_PORT)."""
    _logging(verbose)
    _run(get_settings(), ["operator"])


@app.command()
def simulator(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run only the provider simulator."""
    _logging(verbose)
    _run(get_settings(), ["simulator"])


@app.command()
def demo(
    api_url: Optional[str] = typer.Option(None, help="Checkout API (default: from settings)"),
    operator_url: Optional[str] = typer.Option(None, help="Operator API (default: from settings)"),
    simulator_url: Optional[str] = typer.Option(None, help="Provider simulator (default: from settings)"),
    merchant: str = typer.Option(
        "demo", help="The merchant whose key is used (its order numbers at the provider are <merchant>-<order>)"
    ),
    provider: str = typer.Option(
        "simulator",
        help="simulator (the running system), alipay, wechatpay or stripe "
        "(its fake from tests/fakes and a system of its own; run from the "
        "repository root), or all (each in turn, the simulator too, "
        "each on a system of its own)",
    ),
    own_system: bool = typer.Option(
        False,
        "--own-system",
        help="With the simulator: start a system of its own (temporary data dir, free ports) instead of using the running one",
    ),
) -> None:
    """Drive one payment through each scenario against the running system and compare outcomes,
    then reconcile today's settlement bill, which holds one payment only the provider knows.
    With --provider alipay|wechatpay|stripe: start that provider's fake and a system configured
    for it, compare its ledger with our database for every order, and stop them again."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from paysentinel.demo import run_demo
    from paysentinel.demo_providers import PROVIDERS, run_providers
    from paysentinel.profile import merchant_key_for_demo

    chosen = list(PROVIDERS) if provider == "all" else [provider]
    if provider != "all" and provider not in PROVIDERS:
        raise typer.BadParameter(
            f"unknown provider {provider}; choose from {', '.join(PROVIDERS)} or all", param_hint="--provider"
        )
    if chosen != ["simulator"] or own_system:
        raise typer.Exit(0 if run_providers(chosen, console) else 1)
    settings = get_settings()
    merchant_key = merchant_key_for_demo(settings)
    if not merchant_key:
        console.print(
            "[red]no merchant API key:[/red] set PAYSENTINEL_MERCHANT_KEY (create one with "
            "`paysentinel key create --merchant M --scope payments --scope read`), or start "
            "`paysentinel up` on embedded defaults, which writes one to the data dir",
            soft_wrap=True,
        )
        raise typer.Exit(1)
    ok = asyncio.run(
        run_demo(
            api_url or f"http://{settings.host}:{settings.api_port}",
            simulator_url or settings.effective_simulator_url,
            operator_url=operator_url or settings.effective_operator_url,
            ui_url=f"http://{settings.host}:{settings.temporal_ui_port}" if not settings.temporal_address else None,
            console=console,
            operator_token=settings.effective_operator_token,
            settlement_day=datetime.now(ZoneInfo(settings.settlement_timezone)).date().isoformat(),
            merchant_key=merchant_key,
            merchant=merchant,
        )
    )
    raise typer.Exit(0 if ok else 1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to the configured database."""
    settings = get_settings()
    _migrate(settings)
    console.print(f"database at {settings.effective_database_url} is up to date")


@app.command("temporal-cli")
def temporal_cli() -> None:
    """Find or build the Temporal CLI (PATH, cache, SDK download, go install) and print its path."""
    from paysentinel.devserver import TemporalCliUnavailable, ensure_temporal_cli

    try:
        path = ensure_temporal_cli(get_settings().cache_dir, log=lambda line: console.print(f"[dim]{line}[/dim]"))
    except TemporalCliUnavailable as err:
        console.print(f"[red]cannot obtain the Temporal CLI:[/red]\n{err}")
        raise typer.Exit(1) from err
    print(path)


app.add_typer(cluster_app, name="cluster")

if __name__ == "__main__":
    app()
