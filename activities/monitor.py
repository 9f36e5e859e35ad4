"""The monitor's activities: window figures from the database, stuck money (the database
and Temporal's visibility), incidents opened once."""

from __future__ import annotations

import re
from datetime import timedelta, timezone
from typing import Optional

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.client import Client

from paysentinel import db, metrics
from paysentinel.config import Settings
from paysentinel.models import Incident, IncidentInput, MonitorInput, StuckMoney, WindowFigures

CHILD_TYPES = ("RefundWorkflow", "ManualReviewWorkflow")
# A child's id is "<payment id>-refund-<key>" or "<payment id>-review-<n>" (refund_workflow_id,
# review_workflow_id). Reconciliation refunds ("reconcile-refund-<provider>-<trade>") name no
# payment in their id and never count as a payment's child.
CHILD_ID_MARK = re.compile(r"-(?:refund|review)-")


class MonitorActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], client: Client, settings: Settings):
        self._sessions = sessions
        self._client = client
        self._settings = settings

    @activity.defn
    async def measure_window(self, monitor: MonitorInput) -> WindowFigures:
        """Outcomes of the payments that finished in the window, and what is still open."""
        outcomes = await db.outcomes_since(self._sessions, db.utcnow() - timedelta(seconds=monitor.window_seconds))
        state = await db.open_figures(self._sessions, grace_seconds=self._settings.stuck_grace_seconds)
        figures = WindowFigures(
            finished=sum(outcomes.values()),
            succeeded=outcomes.get("SUCCEEDED", 0),
            failed=outcomes.get("FAILED", 0),
            closed=outcomes.get("CLOSED", 0),
            pending=int(state["pending"]),
            stuck=int(state["stuck"]),
            open_reviews=int(state["open_reviews"]),
        )
        metrics.window_failure_rate.set(figures.failure_rate)
        metrics.window_timeout_rate.set(figures.timeout_rate)
        activity.logger.info(
            "monitor %s: %d finished in %gs (failed %d, closed %d), failure %.1f%%, timeout %.1f%%",
            monitor.name,
            figures.finished,
            monitor.window_seconds,
            figures.failed,
            figures.closed,
            figures.failure_rate * 100,
            figures.timeout_rate * 100,
        )
        return figures

    @activity.defn
    async def measure_stuck(self, monitor: MonitorInput) -> StuckMoney:
        """Payments whose money should be moving and is not (see ``measure_stuck``)."""
        stuck = await measure_stuck(self._sessions, self._client, self._settings)
        metrics.publish_stuck(stuck.counts)
        if stuck.total:
            activity.logger.warning("monitor %s: %s", monitor.name, stuck.describe())
        return stuck

    @activity.defn
    async def track_incident(self, check: IncidentInput) -> Optional[Incident]:
        """Open, keep or resolve the incident for this monitor and kind (idempotent)."""
        row = await db.track_incident(
            self._sessions,
            check.monitor,
            check.kind,
            breach=check.breach,
            rate=check.rate,
            threshold=check.threshold,
            payments=check.payments,
            detail=check.detail,
        )
        if row is None:
            return None
        incident = Incident.model_validate(row, from_attributes=True)
        incident.to_send = not await db.notification_sent(self._sessions, incident.key)
        return incident


async def payments_with_children(client: Client, grace_seconds: float) -> set[str]:
    """Payment ids with a RefundWorkflow or ManualReviewWorkflow running now, or closed
    less than ``grace_seconds`` ago (its parent may not have written the next status yet)."""
    since = (db.utcnow() - timedelta(seconds=grace_seconds)).astimezone(timezone.utc)
    types = ", ".join(f'"{name}"' for name in CHILD_TYPES)
    query = (
        f'WorkflowType IN ({types}) AND (ExecutionStatus = "Running" OR CloseTime > "{since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}")'
    )
    payments: set[str] = set()
    async for execution in client.list_workflows(query):
        # Every prefix before a "-refund-" / "-review-" mark: order ids may contain the marks too.
        payments.update(execution.id[: mark.start()] for mark in CHILD_ID_MARK.finditer(execution.id))
        if execution.parent_id:
            payments.add(execution.parent_id)
    return payments


async def measure_stuck(
    sessions: async_sessionmaker[AsyncSession], client: Client, settings: Settings, *, most: int = 10
) -> StuckMoney:
    """Stuck money, by kind:

    - ``open_past_ttl``: CREATED or PENDING longer than the time to live plus the grace;
    - ``refunding_without_child`` / ``review_without_child``: the row has said REFUNDING /
      IN_REVIEW for longer than the grace and no refund or review workflow of the payment
      runs in Temporal;
    - ``refund_processing_too_long``: refunds PROCESSING longer than the provider's limit.
    """
    rows = await db.stuck_rows(
        sessions,
        grace_seconds=settings.stuck_grace_seconds,
        refund_processing_limit_seconds=settings.refund_processing_limit_seconds,
    )
    handled = await payments_with_children(client, settings.stuck_grace_seconds) if rows.refunding or rows.in_review else set()
    found = {
        "open_past_ttl": rows.open_past_ttl,
        "refunding_without_child": [p for p in rows.refunding if p not in handled],
        "review_without_child": [p for p in rows.in_review if p not in handled],
        "refund_processing_too_long": [p for _, p in rows.refunds_too_long],
    }
    return StuckMoney(
        counts={kind: len(ids) for kind, ids in found.items()},
        payments={kind: ids[:most] for kind, ids in found.items()},
        refunds=[f"{refund} ({payment})" for refund, payment in rows.refunds_too_long[:most]],
    )
