"""The monitor's activities: window figures from the database, incidents opened once."""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from paysentinel import db, metrics
from paysentinel.models import Incident, IncidentInput, MonitorInput, WindowFigures


class MonitorActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]):
        self._sessions = sessions

    @activity.defn
    async def measure_window(self, monitor: MonitorInput) -> WindowFigures:
        """Outcomes of the payments that finished in the window, and what is still open."""
        outcomes = await db.outcomes_since(self._sessions, db.utcnow() - timedelta(seconds=monitor.window_seconds))
        state = await db.open_figures(self._sessions)
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
            monitor.name, figures.finished, monitor.window_seconds, figures.failed, figures.closed,
            figures.failure_rate * 100, figures.timeout_rate * 100,
        )
        return figures

    @activity.defn
    async def track_incident(self, check: IncidentInput) -> Optional[Incident]:
        """Open, keep or resolve the incident for this monitor and kind (idempotent)."""
        row = await db.track_incident(
            self._sessions, check.monitor, check.kind, breach=check.breach, rate=check.rate,
            threshold=check.threshold, payments=check.payments, detail=check.detail,
        )
        if row is None:
            return None
        incident = Incident.model_validate(row, from_attributes=True)
        incident.to_send = not await db.notification_sent(self._sessions, incident.key)
        return incident
