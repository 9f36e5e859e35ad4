"""The worker process: hosts the payment workflow and its activities."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import httpx
from prometheus_client import start_http_server
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.monitor import MonitorActivities
from activities.notify import Channels, NotificationActivities
from activities.payment import PaymentActivities, RiskRules
from activities.reconcile import ReconciliationActivities
from paysentinel import db
from paysentinel.config import Settings
from paysentinel.devserver import ensure_search_attributes
from paysentinel.models import MonitorInput
from paysentinel.providers import SUPPORTED_PROVIDERS, build_providers
from paysentinel.temporal import configured_address, connect, remove_schedule
from workers.sandbox import ContextShortcutSandbox, share_workflow_code
from workflows.monitor import MONITOR_SCHEDULE_ID, MonitorWorkflow, ensure_monitor_schedule
from workflows.payment import PaymentWorkflow
from workflows.reconcile import (
    ReconciliationWorkflow,
    ensure_reconcile_schedule,
    reconcile_input,
    reconcile_schedule_id,
)
from workflows.refund import RefundWorkflow
from workflows.review import ManualReviewWorkflow

log = logging.getLogger("paysentinel.worker")

WORKFLOWS = [PaymentWorkflow, RefundWorkflow, ManualReviewWorkflow, MonitorWorkflow, ReconciliationWorkflow]

# Pure, deterministic modules the workflows use: the sandbox shares the worker's copy instead
# of importing them again for every payment it starts or replays. (The workflow modules
# themselves stay sandboxed, so the sandbox still catches non-deterministic calls in them.)
PASSTHROUGH_MODULES = (
    "paysentinel",
    "activities",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_extensions",
    "email_validator",
    "idna",
    "dns",
    "sqlalchemy",
    "httpx",
    "httpcore",
    "anyio",
    "sniffio",
    "certifi",
    "cryptography",
    "prometheus_client",
    "opentelemetry",
)


def workflow_runner(sandbox: str = "isolated") -> SandboxedWorkflowRunner:
    """The sandbox: ``isolated`` imports the workflow modules afresh for each workflow (and so
    checks their calls), ``shared`` passes them through as well (see Settings.worker_sandbox)."""
    modules = PASSTHROUGH_MODULES + (("workflows",) if sandbox == "shared" else ())
    share_workflow_code()  # each sandbox still runs the workflow modules afresh
    return ContextShortcutSandbox(restrictions=SandboxRestrictions.default.with_passthrough_modules(*modules))


def keep_bytecode(settings: Settings) -> Path | None:
    """Keep compiled bytecode under ``cache_dir/bytecode`` where PYTHONDONTWRITEBYTECODE is set.

    The sandbox imports the workflow modules afresh for each payment it starts or replays;
    without bytecode each import compiles them from source, four to ten times the cost of
    loading them compiled (benchmarks/sandbox_cost.py). Returns the directory, or None (left as it is)."""
    if not settings.worker_bytecode_cache or not sys.dont_write_bytecode or sys.pycache_prefix:
        return None
    directory = settings.cache_dir / "bytecode"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("compiling workflow modules from source each time: cannot create %s (%s)", directory, err)
        return None
    sys.pycache_prefix = str(directory)
    sys.dont_write_bytecode = False
    log.info("bytecode of the workflow modules kept in %s", directory)
    return directory


def activities_of(
    payment: PaymentActivities,
    notifications: NotificationActivities,
    monitor: MonitorActivities,
    reconcile: ReconciliationActivities,
) -> list:
    return [
        reconcile.days_to_reconcile,
        reconcile.start_run,
        reconcile.load_bill,
        reconcile.classify,
        reconcile.find_missing,
        reconcile.repair,
        reconcile.verify,
        reconcile.count_waiting,
        reconcile.finish,
        reconcile.fail_run,
        notifications.notify,
        notifications.send_alert,
        monitor.measure_window,
        monitor.measure_stuck,
        monitor.track_incident,
        payment.record_payment,  # payments started before 0.3.0
        payment.open_payment,
        payment.save_payment_state,
        payment.create_trade,
        payment.query_trade,
        payment.close_trade,
        payment.refund_trade,
        payment.query_refund,
        payment.save_refund,
        payment.open_review,
        payment.escalate_review,
        payment.close_review,
        payment.assess_risk,
    ]


def monitor_input(settings: Settings) -> MonitorInput:
    return MonitorInput(
        window_seconds=settings.monitor_window_seconds,
        failure_threshold=settings.monitor_failure_threshold,
        timeout_threshold=settings.monitor_timeout_threshold,
        min_payments=settings.monitor_min_payments,
    )


async def schedule_monitor(client: Client, settings: Settings) -> None:
    if settings.monitor_interval_seconds > 0:
        await ensure_monitor_schedule(client, monitor_input(settings), settings.monitor_interval_seconds, settings.task_queue)
        log.info("monitor scheduled every %gs (schedule %s)", settings.monitor_interval_seconds, MONITOR_SCHEDULE_ID)
    elif await remove_schedule(client, MONITOR_SCHEDULE_ID):
        log.info("monitor schedule removed (monitor_interval_seconds is 0)")


async def schedule_reconciliation(client: Client, settings: Settings) -> None:
    """One daily schedule per provider this deployment uses (reconcile_enabled false removes them)."""
    for provider in SUPPORTED_PROVIDERS:
        schedule_id = reconcile_schedule_id(provider)
        if settings.reconcile_enabled and provider in settings.providers:
            await ensure_reconcile_schedule(
                client,
                reconcile_input(settings, provider),
                settings.reconcile_at,
                settings.settlement_timezone,
                settings.task_queue,
            )
            log.info(
                "%s reconciliation scheduled daily at %s %s (schedule %s)",
                provider,
                settings.reconcile_at,
                settings.settlement_timezone,
                schedule_id,
            )
        elif await remove_schedule(client, schedule_id):
            log.info("reconciliation schedule %s removed", schedule_id)


def sdk_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime that serves the SDK's worker metrics for Prometheus (or None: off)."""
    if not settings.sdk_metrics_port:
        return None
    address = f"{settings.host}:{settings.sdk_metrics_port}"
    log.info("Temporal SDK worker metrics on http://%s/metrics", address)
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))


async def run_worker(settings: Settings, stop: asyncio.Event | None = None, *, serve_metrics: bool = False) -> None:
    """Poll the task queue until ``stop`` is set (or forever).

    ``serve_metrics``: serve this process's app metrics on metrics_port (a worker running
    without the API, which otherwise serves them on /metrics)."""
    keep_bytecode(settings)
    client = await connect(settings, sdk_runtime(settings))
    if configured_address(settings):  # a server we did not start: make sure operators can search
        await ensure_search_attributes(client)
    if serve_metrics:
        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("worker metrics on http://%s:%s/metrics", settings.host, settings.metrics_port)
    await schedule_monitor(client, settings)
    await schedule_reconciliation(client, settings)
    # Activities retry a write that met a dropped connection (the pool then reconnects), so
    # they skip the round trip that tests each pooled connection first.
    engine = db.make_engine(settings.effective_database_url, pre_ping=False)
    timeout = httpx.Timeout(settings.provider_timeout_seconds)
    async with httpx.AsyncClient(timeout=timeout) as http:
        risk = RiskRules(
            window_seconds=settings.risk_window_seconds,
            max_distinct_amounts=settings.risk_max_distinct_amounts,
            failure_window_seconds=settings.risk_failure_window_seconds,
            max_failures=settings.risk_max_failures,
        )
        sessions = db.make_sessionmaker(engine)
        providers = build_providers(settings, http)
        payment = PaymentActivities(providers, sessions, risk)
        channels = Channels(
            smtp_host=settings.smtp_host,
            smtp_port=settings.smtp_port,
            smtp_from=settings.smtp_from,
            # During a rotation merchant webhooks carry a signature with each secret.
            webhook_secret=(settings.merchant_webhook_secret, settings.merchant_webhook_secret_previous),
            allowed_hosts=tuple(settings.notify_allowed_hosts),
            alert_email=settings.alert_email,
            alert_webhook_url=settings.alert_webhook_url,
        )
        if not settings.smtp_host:
            log.info("customer e-mail is off (set PAYSENTINEL_SMTP_HOST to send it)")
        notifications = NotificationActivities(channels, http, sessions)
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=WORKFLOWS,
            activities=activities_of(
                payment,
                notifications,
                MonitorActivities(sessions, client, settings),
                ReconciliationActivities(sessions, providers, client, settings),
            ),
            workflow_runner=workflow_runner(settings.worker_sandbox),
            max_cached_workflows=settings.worker_max_cached_workflows,
            max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
            max_concurrent_activities=settings.worker_max_concurrent_activities,
        )
        log.info(
            "worker polling task queue %s on %s (namespace %s; %s sandbox, workflow cache %d, %d workflow tasks "
            "and %d activities at once)",
            settings.task_queue,
            client.service_client.config.target_host,
            client.namespace,
            settings.worker_sandbox,
            settings.worker_max_cached_workflows,
            settings.worker_max_concurrent_workflow_tasks,
            settings.worker_max_concurrent_activities,
        )
        try:
            async with worker:
                await (stop or asyncio.Event()).wait()
        finally:
            await engine.dispose()
