"""The worker process: hosts the payment workflow and its activities."""

from __future__ import annotations

import asyncio
import logging

import httpx
from temporalio.worker import Worker

from activities.notify import Channels, NotificationActivities
from activities.payment import PaymentActivities, RiskRules
from paysentinel import db
from paysentinel.config import Settings
from paysentinel.devserver import ensure_search_attributes
from paysentinel.providers import build_providers
from paysentinel.temporal import connect
from workflows.payment import PaymentWorkflow
from workflows.refund import RefundWorkflow
from workflows.review import ManualReviewWorkflow

log = logging.getLogger("paysentinel.worker")

WORKFLOWS = [PaymentWorkflow, RefundWorkflow, ManualReviewWorkflow]


def activities_of(payment: PaymentActivities, notifications: NotificationActivities) -> list:
    return [
        notifications.notify,
        payment.record_payment,
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


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Poll the task queue until ``stop`` is set (or forever)."""
    client = await connect(settings)
    if settings.temporal_address:  # a server we did not start: make sure operators can search
        await ensure_search_attributes(client)
    engine = db.make_engine(settings.effective_database_url)
    timeout = httpx.Timeout(settings.provider_timeout_seconds)
    async with httpx.AsyncClient(timeout=timeout) as http:
        risk = RiskRules(
            window_seconds=settings.risk_window_seconds,
            max_distinct_amounts=settings.risk_max_distinct_amounts,
            failure_window_seconds=settings.risk_failure_window_seconds,
            max_failures=settings.risk_max_failures,
        )
        sessions = db.make_sessionmaker(engine)
        payment = PaymentActivities(build_providers(settings, http), sessions, risk)
        channels = Channels(
            smtp_host=settings.smtp_host, smtp_port=settings.smtp_port, smtp_from=settings.smtp_from,
            webhook_secret=settings.merchant_webhook_secret, allowed_hosts=tuple(settings.notify_allowed_hosts),
        )
        if not settings.smtp_host:
            log.info("customer e-mail is off (set PAYSENTINEL_SMTP_HOST to send it)")
        notifications = NotificationActivities(channels, http, sessions)
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=WORKFLOWS,
            activities=activities_of(payment, notifications),
        )
        log.info("worker polling task queue %s on %s", settings.task_queue, settings.effective_temporal_address)
        try:
            async with worker:
                await (stop or asyncio.Event()).wait()
        finally:
            await engine.dispose()
