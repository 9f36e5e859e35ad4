"""MonitorWorkflow: alerting without Prometheus, run by a Temporal Schedule.

Each run reads the failure rate (FAILED / finished) and the timeout rate (CLOSED unpaid /
finished) of the payments that finished in the last window, opens an incident when a
rate is above its threshold, and tells operators once per incident: one alert when it
opens, one all-clear when the rate is back under the line. Stuck money is one more
incident: payments past their time to live, REFUNDING or IN_REVIEW without a running
refund or review workflow, refunds PROCESSING longer than the provider's limit.
Incidents live in the database, so a run that is retried or repeated never alerts twice.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)

with workflow.unsafe.imports_passed_through():
    from paysentinel.temporal import ensure_schedule
    from activities.monitor import MonitorActivities
    from paysentinel.models import IncidentInput, MonitorInput, StuckMoney, WindowFigures
    from workflows.common import alert_once, db_call

MONITOR_SCHEDULE_ID = "paysentinel-monitor"
STUCK_MONEY_PATCH = "monitor-stuck-money"
STUCK_KIND = "stuck_payments"  # the incident kind of stuck money


@workflow.defn
class MonitorWorkflow:
    @workflow.run
    async def run(self, monitor: MonitorInput) -> list[str]:
        figures: WindowFigures = await db_call(
            MonitorActivities.measure_window, monitor, f"measure the last {monitor.window_seconds:g}s"
        )
        enough = figures.finished >= monitor.min_payments
        news = []
        for kind, rate, threshold, count in (
            ("failure_rate", figures.failure_rate, monitor.failure_threshold, figures.failed),
            ("timeout_rate", figures.timeout_rate, monitor.timeout_threshold, figures.closed),
        ):
            check = IncidentInput(
                monitor=monitor.name,
                kind=kind,
                breach=enough and rate > threshold,
                rate=rate,
                threshold=threshold,
                payments=figures.finished,
                detail=f"{count} of {figures.finished} payments finished in the last {monitor.window_seconds:g}s "
                f"({rate:.1%}; threshold {threshold:.1%}, at least {monitor.min_payments} payments)",
            )
            incident = await alert_once(check, f"{kind} {rate:.1%} vs {threshold:.1%}")
            if incident is not None and incident.to_send:
                news.append(f"{kind}: incident {incident.id} {'opened' if incident.status == 'OPEN' else 'resolved'}")
        if workflow.patched(STUCK_MONEY_PATCH):  # runs recorded before stuck money was measured replay without it
            stuck: StuckMoney = await db_call(MonitorActivities.measure_stuck, monitor, "measure stuck money")
            check = IncidentInput(
                monitor=monitor.name,
                kind=STUCK_KIND,
                breach=stuck.total > 0,
                rate=float(stuck.total),
                threshold=0.0,
                payments=stuck.total,
                detail=stuck.describe(),
            )
            incident = await alert_once(check, f"stuck money: {stuck.total}")
            if incident is not None and incident.to_send:
                news.append(f"{STUCK_KIND}: incident {incident.id} {'opened' if incident.status == 'OPEN' else 'resolved'}")
        return news


def monitor_schedule(monitor: MonitorInput, interval_seconds: float, task_queue: str) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            MonitorWorkflow.run,
            monitor,
            id=f"monitor-{monitor.name}",
            task_queue=task_queue,
            execution_timeout=timedelta(seconds=max(60.0, interval_seconds * 5)),
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=interval_seconds))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_monitor_schedule(client: Client, monitor: MonitorInput, interval_seconds: float, task_queue: str) -> None:
    """Create the monitor's schedule, or bring an existing one to the current settings."""
    schedule = monitor_schedule(monitor, interval_seconds, task_queue)
    await ensure_schedule(client, MONITOR_SCHEDULE_ID, schedule)
