"""Side effects of a payment: the provider's HTTP API and the application database.

Each activity is small and idempotent, so Temporal may retry it safely:
- provider calls carry an idempotency key derived from the workflow id and purpose;
- database writes are upserts or "newer snapshot wins" updates.
Provider rejections become non-retryable ``ApplicationError``s; transient failures
are raised as-is and retried with the bounded policy the workflow sets.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from paysentinel import db, metrics, tracing
from paysentinel.models import (
    REVIEW_ACTIONS,
    CreateTradeInput,
    PaymentRecord,
    PaymentStatus,
    ProviderRefund,
    RecordPaymentInput,
    RefundInput,
    RefundRecord,
    RefundStatus,
    ReviewInput,
    ReviewOutcome,
    RiskCheckInput,
    RiskVerdict,
    Trade,
    TradeRef,
)
from paysentinel.providers import Provider, ProviderRejected

PROVIDER_REJECTED = "ProviderRejected"
ORDER_CONFLICT = "OrderConflict"
UNPAID = {PaymentStatus.FAILED.value, PaymentStatus.CLOSED.value}


@dataclass(frozen=True)
class RiskRules:
    """Thresholds of the pre-charge risk rules (from settings)."""

    window_seconds: float = 600
    max_distinct_amounts: int = 3  # same IP or device trying this many different amounts
    failure_window_seconds: float = 3600
    max_failures: int = 3  # same device or customer with this many unpaid payments


class PaymentActivities:
    def __init__(self, providers: dict[str, Provider], sessions: async_sessionmaker[AsyncSession], risk: RiskRules = RiskRules()):
        self._providers = providers
        self._sessions = sessions
        self._risk = risk

    def _provider(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise ApplicationError(f"unknown provider {name!r}", type=PROVIDER_REJECTED, non_retryable=True) from None

    @asynccontextmanager
    async def _calling(self, order_id: str, provider: str):
        """Around every provider call: count retries on the payment, classify rejections."""
        info = activity.info()
        if info.attempt > 1:
            await db.count_retry(self._sessions, f"payment-{order_id}")
            metrics.provider_retries.labels(provider, info.activity_type).inc()
        span = tracing.tracer.start_as_current_span(
            f"provider {info.activity_type}",
            attributes={"paysentinel.order_id": order_id, "paysentinel.provider": provider, "temporal.attempt": info.attempt},
        )
        try:
            with span:
                yield
        except ProviderRejected as err:
            raise ApplicationError(str(err), err.code, type=PROVIDER_REJECTED, non_retryable=True) from err

    @activity.defn
    async def record_payment(self, payload: RecordPaymentInput) -> None:
        """Make sure the payment row exists (the checkout API usually wrote it first)."""
        try:
            await db.claim_order(self._sessions, payload.payment_id, payload.request, payload.expires_at)
        except db.OrderConflict as err:
            raise ApplicationError(str(err), type=ORDER_CONFLICT, non_retryable=True) from err

    @activity.defn
    async def open_payment(self, payload: RecordPaymentInput) -> RiskVerdict:
        """Make sure the payment row exists, then check our risk rules (one call since 0.3.0)."""
        await self.record_payment(payload)
        return await self.assess_risk(RiskCheckInput(payment_id=payload.payment_id, request=payload.request))

    @activity.defn
    async def save_payment_state(self, record: PaymentRecord) -> bool:
        """Write the workflow's newest snapshot; an older snapshot never overwrites a newer one."""
        result = await db.apply_record(self._sessions, record)
        activity.logger.info(
            "payment %s -> %s (seq %s, %s)",
            record.payment_id,
            record.status.value,
            record.seq,
            "applied" if result.applied else "already newer",
        )
        if result.applied:
            metrics.count_transition(record, result.provider, result.created_at, finished=result.finished)
        return result.applied

    @activity.defn
    async def create_trade(self, payload: CreateTradeInput) -> Trade:
        async with self._calling(payload.order_id, payload.provider):
            return await self._provider(payload.provider).create_trade(payload)

    @activity.defn
    async def query_trade(self, ref: TradeRef) -> Trade:
        async with self._calling(ref.order_id, ref.provider):
            return await self._provider(ref.provider).query_trade(
                ref.order_id, ref.trade_no, created_trade_no=ref.created_trade_no
            )

    @activity.defn
    async def close_trade(self, ref: TradeRef) -> Trade:
        async with self._calling(ref.order_id, ref.provider):
            return await self._provider(ref.provider).close_trade(
                ref.order_id, ref.idempotency_key, created_trade_no=ref.created_trade_no
            )

    @activity.defn
    async def refund_trade(self, request: RefundInput) -> ProviderRefund:
        """Submit the refund; the refund id (out_request_no) makes a retry the same refund."""
        async with self._calling(request.order_id, request.provider):
            return await self._provider(request.provider).refund(request, f"refund:{request.refund_id}")

    @activity.defn
    async def query_refund(self, request: RefundInput) -> Optional[ProviderRefund]:
        async with self._calling(request.order_id, request.provider):
            return await self._provider(request.provider).query_refund(request.order_id, request.refund_id, request.trade_no)

    @activity.defn
    async def save_refund(self, record: RefundRecord) -> None:
        await db.save_refund(self._sessions, record)
        if record.status is not RefundStatus.PROCESSING and record.submissions > 0:
            metrics.refunds.labels(record.status.value).inc()
            if record.status is RefundStatus.SUCCEEDED:
                metrics.refunded_minor.labels(record.currency).inc(record.amount_minor)
        activity.logger.info("refund %s of %s -> %s", record.refund_id, record.payment_id, record.status.value)

    @activity.defn
    async def open_review(self, review: ReviewInput) -> None:
        """Store the review with its reason and evidence (idempotent by review id)."""
        now = db.utcnow()
        await db.save_review(
            self._sessions,
            review.review_id,
            payment_id=review.payment_id,
            order_id=review.order_id,
            reason=review.reason.value,
            evidence=review.evidence,
            status="OPEN",
            default_action=REVIEW_ACTIONS[review.reason][1].value,
            deadline_at=now + timedelta(seconds=review.deadline_seconds),
            created_at=now,
        )

    @activity.defn
    async def escalate_review(self, review: ReviewInput) -> None:
        """The review waited too long: mark it escalated and raise the alarm in the logs."""
        await db.save_review(self._sessions, review.review_id, status="ESCALATED", escalated_at=db.utcnow())
        activity.logger.warning(
            "ESCALATION: review %s (%s, order %s) undecided after %gs; at the deadline the default applies: %s",
            review.review_id,
            review.reason.value,
            review.order_id,
            review.escalate_after_seconds,
            REVIEW_ACTIONS[review.reason][1].value,
        )

    @activity.defn
    async def close_review(self, outcome: ReviewOutcome) -> None:
        await db.save_review(
            self._sessions,
            outcome.review_id,
            status="DECIDED",
            action=outcome.action.value,
            decided_by=outcome.operator,
            decision_reason=outcome.reason,
            decided_at=db.utcnow(),
        )

    @activity.defn
    async def assess_risk(self, check: RiskCheckInput) -> RiskVerdict:
        """Our own rules, before any money moves, from recent attempts in the database."""
        request, rules = check.request, self._risk
        now = db.utcnow()
        hits: list[str] = []
        recent = await db.recent_attempts(
            self._sessions,
            now - timedelta(seconds=max(rules.window_seconds, rules.failure_window_seconds)),
            exclude=check.payment_id,
            client_ip=request.client_ip,
            device_id=request.device_id,
            customer_email=request.customer.email,
        )
        window_start = now - timedelta(seconds=rules.window_seconds)
        for key, value in (("client_ip", request.client_ip), ("device_id", request.device_id)):
            if not value:
                continue
            amounts = {p.amount_minor for p in recent if getattr(p, key) == value and p.created_at >= window_start}
            amounts.add(request.amount_minor)
            if len(amounts) >= rules.max_distinct_amounts:
                hits.append(f"{key} {value} tried {len(amounts)} different amounts within {rules.window_seconds:g}s")
        for key, value in (("device_id", request.device_id), ("customer_email", request.customer.email)):
            if not value:
                continue
            failures = sum(1 for p in recent if getattr(p, key) == value and p.status in UNPAID)
            if failures >= rules.max_failures:
                hits.append(f"{key} {value} has {failures} unpaid payments within {rules.failure_window_seconds:g}s")
        return RiskVerdict(flagged=bool(hits), hits=hits)
