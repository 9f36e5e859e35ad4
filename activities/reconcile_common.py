"""What the reconciliation activities share: the classes of difference and what each gets, the
run's id and report, and the state every step works with (sessions, providers, the Temporal
client, the settlement time zone)."""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from paysentinel import db
from paysentinel.config import Settings
from paysentinel.models import ReconcileReport, ReconcileStep
from paysentinel.providers import Provider

BAD_BILL = "BadBill"
OPEN = ("CREATED", "PENDING")
UNPAID_OUTCOMES = ("CLOSED", "FAILED")
PAID = ("SUCCEEDED", "REFUNDING", "PARTIALLY_REFUNDED", "REFUNDED", "IN_REVIEW")
# What each class of difference gets: the payment's workflow, a refund of its own, or a person.
TO_WORKFLOW = {
    "open_payment",
    "paid_during_review",
    "closed_order_paid",
    "duplicate_charge",
    "amount_differs",
    "missing_at_provider",
}
REFUND_IF_FINISHED = {"closed_order_paid", "duplicate_charge"}
INFORMATIONAL = {"day_boundary"}
# A repair is resolved only once our database shows the money agreeing with the bill.
WAITING = "waiting for the money to agree"
REFUND_STARTED = "refund started"
# Which differences the money can settle, and how (see ReconciliationActivities._agrees).
REFUNDED_WHEN_AGREED = {"closed_order_paid", "duplicate_charge", "unknown_order"}
RECORDED_WHEN_AGREED = {"open_payment", "paid_during_review", "amount_differs"}


def run_id(provider: str, day: date) -> str:
    return f"{provider}:{day.isoformat()}"


class ReconcileBase:
    """The reconciliation activities' state and the helpers every step uses."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], providers: dict[str, Provider], client: Client, settings: Settings
    ):
        self._sessions = sessions
        self._providers = providers
        self._client = client
        self._settings = settings
        self._tz = ZoneInfo(settings.settlement_timezone)

    def _day_bounds(self, day: date) -> tuple[datetime, datetime]:
        start = datetime.combine(day, time(), self._tz).astimezone(timezone.utc)
        return start, start + timedelta(days=1)

    def _local_day(self, moment: datetime) -> date:
        return moment.astimezone(self._tz).date()

    async def _pass(self, session: AsyncSession, step: ReconcileStep) -> int:
        """The run's current pass (how many times the day was started)."""
        return (
            await session.scalar(
                select(db.ReconciliationRun.passes).where(db.ReconciliationRun.run_id == run_id(step.provider, step.day))
            )
            or 0
        )

    def _finding(self, step: ReconcileStep, kind: str, row, ours: int | None, detail: str, **extra) -> dict:
        return {
            "run_id": run_id(step.provider, step.day),
            "kind": kind,
            "order_id": row.order_id,
            "trade_no": row.trade_no,
            "refund_no": row.refund_no,
            "provider_amount_minor": row.amount_minor,
            "our_amount_minor": ours,
            "currency": row.currency,
            "detail": detail,
            "resolution": None,
            "resolved": False,
            "created_at": db.utcnow(),
            "resolved_at": None,
            **extra,
        }


def report_of(run: db.ReconciliationRun) -> ReconcileReport:
    return ReconcileReport(
        run_id=run.run_id,
        provider=run.provider,
        day=date.fromisoformat(run.bill_date),
        status=run.status,
        rows=run.rows,
        matched=run.matched,
        day_boundary=run.day_boundary,
        classes=json.loads(run.classes or "{}"),
        unresolved=run.unresolved,
        passes=run.passes,
        started_at=run.started_at,
        finished_at=run.finished_at,
        error=run.error,
    )
