"""Reconciliation against the provider's settlement bills: a run's input and steps, the
findings sent to payments, and the run's report."""

from __future__ import annotations

from datetime import date, datetime
from typing import Optional

from pydantic import BaseModel, Field


class ReconcileInput(BaseModel):
    """One provider's settlement for one day (or, without ``day``, the scheduled run:
    yesterday plus every earlier day of the catch-up window without a finished run)."""

    provider: str = "simulator"
    day: Optional[date] = None
    catchup_days: int = Field(7, ge=0, le=366)
    batch_rows: int = Field(5000, ge=10, le=100_000)
    alert_threshold: int = Field(0, ge=0)
    # How long a run waits for its repairs to show in our books before it reports.
    verify_wait_seconds: float = Field(900.0, ge=0)
    # Where a continued-as-new run picks up.
    stage: str = "load"  # load, classify, missing, repair, finish
    cursor: int = 0

    @property
    def run_id(self) -> str:
        return f"{self.provider}:{self.day}"


class ReconcileStep(BaseModel):
    provider: str
    day: date
    after: int = 0  # the last row (or discrepancy) id handled
    limit: int = 5000


class RunFailure(BaseModel):
    provider: str
    day: date
    error: str


class StepResult(BaseModel):
    last: int  # the last id handled; the next step starts after it
    handled: int
    done: bool


class SettlementFinding(BaseModel):
    """A difference the reconciliation sends to a payment's workflow (the ``settlement`` signal)."""

    kind: str  # open_payment, paid_during_review, closed_order_paid, duplicate_charge, amount_differs,
    # missing_at_provider
    day: date
    order_id: str
    trade_no: str
    amount_minor: int
    currency: str
    paid_at: Optional[datetime] = None
    detail: str = ""


class ReconcileReport(BaseModel):
    run_id: str
    provider: str
    day: date
    status: str
    rows: int
    matched: int
    day_boundary: int
    classes: dict[str, dict[str, int]]  # kind -> {"count", "amount_minor", "unresolved"}
    unresolved: int
    passes: int
    started_at: datetime
    finished_at: Optional[datetime] = None
    error: Optional[str] = None  # why the run failed (status FAILED)
