"""PaymentWorkflow: one durable workflow per payment, from checkout to a final state.

record the payment -> create the trade at the provider -> wait for the callback
(timeout) -> query the provider with a bounded backoff -> at the end of the payment's
time to live, close the trade at the provider (a close that reveals a payment means it
was paid) -> final state -> keep listening for late callbacks for the provider's resend
window.

Deterministic orchestration only: every side effect is an activity.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Optional

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    import email_validator  # noqa: F401  (pydantic loads it lazily to validate EmailStr)
    import idna.uts46data  # noqa: F401

    from activities.payment import ORDER_CONFLICT, PROVIDER_REJECTED, PaymentActivities
    from paysentinel.models import (
        CreateTradeInput,
        PaymentInput,
        PaymentRecord,
        PaymentStatus,
        PaymentView,
        ProviderCallback,
        RecordPaymentInput,
        TimelineEntry,
        Trade,
        TradeRef,
        TradeStatus,
        to_major,
    )

PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
ORDER_ID = SearchAttributeKey.for_keyword("OrderId")
PROVIDER = SearchAttributeKey.for_keyword("Provider")
AMOUNT_MINOR = SearchAttributeKey.for_int("AmountMinor")
CURRENCY = SearchAttributeKey.for_keyword("Currency")
REVIEW_REASON = SearchAttributeKey.for_keyword("ReviewReason")

OPEN = (PaymentStatus.CREATED, PaymentStatus.PENDING)


def payment_workflow_id(order_id: str) -> str:
    """The business key: one payment workflow per merchant order."""
    return f"payment-{order_id}"


DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30), maximum_attempts=10
)


@workflow.defn
class PaymentWorkflow:
    @workflow.init
    def __init__(self, input: PaymentInput) -> None:
        self._input = input
        self._request = input.request
        self._status = PaymentStatus.CREATED
        self._seq = 0
        self._timeline: list[TimelineEntry] = []
        self._inbox: list[ProviderCallback] = []
        self._seen_events: set[str] = set()
        self._trade_no: Optional[str] = None
        self._pay_url: Optional[str] = None
        self._reason: Optional[str] = None
        self._review_reason: Optional[str] = None
        self._paid_amount_minor: Optional[int] = None
        self._paid_at = None
        self._expires_at = None

    # --- Messages -------------------------------------------------------------------

    @workflow.signal
    def callback(self, event: ProviderCallback) -> None:
        """A verified provider callback, delivered by the webhook receiver."""
        if event.event_id in self._seen_events:
            self._note("callback duplicate", f"event {event.event_id} already received; ignored")
            return
        self._seen_events.add(event.event_id)
        self._inbox.append(event)

    @workflow.update
    async def checkout(self) -> PaymentView:
        """Returns once the payer can pay (pay URL known) or the payment is final."""
        await workflow.wait_condition(lambda: self._pay_url is not None or self._status not in OPEN)
        return self._view()

    @workflow.query
    def view(self) -> PaymentView:
        return self._view()

    # --- Main line ------------------------------------------------------------------

    @workflow.run
    async def run(self, input: PaymentInput) -> PaymentView:
        request, timing = input.request, input.timing
        ttl = request.expires_in_seconds or timing.payment_ttl_seconds
        self._expires_at = workflow.now() + timedelta(seconds=ttl)
        self._note(
            "created",
            f"order {request.order_id}, {to_major(request.amount_minor, request.currency)} {request.currency} "
            f"via {request.provider}, expires {self._expires_at.isoformat()}",
        )
        await self._db(
            PaymentActivities.record_payment,
            RecordPaymentInput(payment_id=input.payment_id, request=request, expires_at=self._expires_at),
            "record payment",
        )

        trade = await self._create_trade()
        if trade is not None:
            self._trade_no, self._pay_url = trade.trade_no, trade.pay_url
            await self._transition(PaymentStatus.PENDING, "trade created", f"trade {trade.trade_no}; waiting for the payer")
            await self._await_outcome()

        await self._listen_for_late_callbacks()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._view()

    async def _create_trade(self) -> Optional[Trade]:
        request = self._request
        try:
            return await self._provider_call(
                PaymentActivities.create_trade,
                CreateTradeInput(
                    provider=request.provider,
                    order_id=request.order_id,
                    amount_minor=request.amount_minor,
                    currency=request.currency,
                    subject=request.subject,
                    notify_url=self._input.notify_url,
                    expires_at=self._expires_at,
                    idempotency_key=f"{workflow.info().workflow_id}:create",
                ),
                "create trade",
            )
        except ActivityError as err:
            if _is_rejection(err):
                await self._transition(PaymentStatus.FAILED, "create rejected", f"provider rejected the trade: {_cause(err)}")
                return None
        # Retries exhausted: the provider may still have created the trade. Close it so
        # nobody can pay it; only then is "failed, no money moved" true.
        self._note("create failed", "provider unavailable after bounded retries; closing the order at the provider")
        closed = await self._close_trade(attempts=1)
        if closed is not None:
            await self._apply_trade(closed, "close after failed create")
        if self._status in OPEN:
            await self._transition(
                PaymentStatus.FAILED, "create failed", "the provider did not answer within the retry limit; no money moved"
            )
        return None

    async def _await_outcome(self) -> None:
        timing = self._input.timing
        await self._wait_for_callback(min(timing.callback_timeout_seconds, self._seconds_left()), "callback timeout")
        await self._process_inbox()
        attempt = 0
        while self._status in OPEN and self._seconds_left() > 0:
            trade = await self._query_trade(attempt + 1)
            if trade is not None:
                await self._apply_trade(trade, f"query #{attempt + 1}")
            if self._status not in OPEN:
                break
            delay = timing.query_backoff_seconds[min(attempt, len(timing.query_backoff_seconds) - 1)]
            attempt += 1
            await self._wait_for_callback(min(delay, self._seconds_left()), f"next query in {delay:g}s")
            await self._process_inbox()
        if self._status in OPEN:
            await self._expire()

    async def _expire(self) -> None:
        """Time to live is over: close at the provider before declaring the payment unpaid."""
        self._note("expired", "time to live ended; closing the trade at the provider")
        trade = await self._close_trade(attempts=self._input.timing.close_attempts)
        await self._process_inbox()
        if self._status not in OPEN:
            return
        if trade is None:
            await self._transition(
                PaymentStatus.IN_REVIEW, "status unknown",
                "the provider could not be reached to close the trade; a person must check it",
                review_reason="status_unknown",
            )
        elif not trade.exists:
            await self._transition(PaymentStatus.CLOSED, "closed", "the provider has no such trade; nothing was paid")
        else:
            await self._apply_trade(trade, "close")
            if self._status in OPEN:
                await self._transition(
                    PaymentStatus.IN_REVIEW, "status unknown",
                    f"provider still reports {trade.status} after close", review_reason="status_unknown",
                )

    async def _listen_for_late_callbacks(self) -> None:
        """Providers resend callbacks for hours; late and contradicting ones are handled here."""
        window = self._input.timing.resend_window_seconds
        end = workflow.now() + timedelta(seconds=window)
        self._note("listening", f"for late callbacks until {end.isoformat()}")
        while (left := (end - workflow.now()).total_seconds()) > 0:
            await self._wait_for_callback(left, "late-callback window")
            await self._process_inbox()
        self._note("completed", f"final status {self._status.value}")

    # --- Results from the provider -----------------------------------------------------

    async def _process_inbox(self) -> None:
        while self._inbox:
            event = self._inbox.pop(0)
            self._note(
                "callback",
                f"{event.trade_status.value} for trade {event.trade_no}, "
                f"{to_major(event.amount_minor, event.currency)} {event.currency} (event {event.event_id})",
            )
            await self._apply_trade(
                Trade(
                    order_id=event.order_id,
                    trade_no=event.trade_no,
                    status=event.trade_status,
                    amount_minor=event.amount_minor,
                    currency=event.currency,
                    paid_at=event.paid_at,
                ),
                "callback",
            )

    async def _apply_trade(self, trade: Trade, source: str) -> None:
        change = self._apply_trade_result(trade, source)
        if change is not None:
            await self._transition(*change[0:3], review_reason=change[3])

    def _apply_trade_result(self, trade: Trade, source: str):
        """Decide what a provider result means for this payment; never move backwards.

        Returns (status, event, detail, review_reason) for a transition, or None after
        recording a no-op in the timeline."""
        request = self._request
        status = trade.status
        if not trade.exists or status is None:
            self._note(f"{source}: no trade", "the provider has no trade for this order yet")
            return None
        if status.is_paid:
            if trade.amount_minor != request.amount_minor or trade.currency != request.currency:
                return (
                    PaymentStatus.IN_REVIEW, "amount mismatch",
                    f"{source} reports {trade.amount_minor} {trade.currency}, order is "
                    f"{request.amount_minor} {request.currency}", "amount_mismatch",
                )
            if self._status in OPEN:
                self._trade_no = trade.trade_no
                self._paid_amount_minor, self._paid_at = trade.amount_minor, trade.paid_at
                return (PaymentStatus.SUCCEEDED, "paid", f"confirmed by {source}, trade {trade.trade_no}", None)
            if self._status is PaymentStatus.SUCCEEDED and trade.trade_no == self._trade_no:
                self._note(f"{source}: no change", "already succeeded; duplicate confirmation")
                return None
            if self._status is PaymentStatus.SUCCEEDED:
                return (
                    PaymentStatus.IN_REVIEW, "duplicate charge",
                    f"second paid trade {trade.trade_no} for the order (first {self._trade_no}); needs a refund",
                    "duplicate_charge",
                )
            if self._status in (PaymentStatus.CLOSED, PaymentStatus.FAILED):
                return (
                    PaymentStatus.IN_REVIEW, "paid after close",
                    f"{source} reports trade {trade.trade_no} paid after the payment was "
                    f"{self._status.value}; the money must be refunded", "paid_after_close",
                )
            self._note(f"{source}: recorded", f"paid trade {trade.trade_no} while {self._status.value}")
            return None
        if status is TradeStatus.TRADE_CLOSED and self._status in OPEN:
            return (PaymentStatus.CLOSED, "closed", f"closed at the provider ({source}); nothing was paid", None)
        self._note(f"{source}: no change", f"provider reports {status.value}; payment stays {self._status.value}")
        return None

    # --- Helpers --------------------------------------------------------------------

    async def _transition(
        self, status: PaymentStatus, event: str, detail: str, review_reason: Optional[str] = None
    ) -> None:
        self._status = status
        self._seq += 1
        if status in (PaymentStatus.FAILED, PaymentStatus.CLOSED, PaymentStatus.IN_REVIEW):
            self._reason = detail
        if review_reason:
            self._review_reason = review_reason
        self._note(event, f"-> {status.value}: {detail}")
        updates = [PAYMENT_STATUS.value_set(status.value)]
        if review_reason:
            updates.append(REVIEW_REASON.value_set(review_reason))
        workflow.upsert_search_attributes(updates)
        try:
            await self._db(PaymentActivities.save_payment_state, self._record(event), f"save {status.value}")
        except ActivityError as err:
            # The next transition writes the full snapshot again; the history keeps the truth.
            self._note("database sync failed", f"{_cause(err)}; the next transition writes the full state")

    def _record(self, event: str) -> PaymentRecord:
        return PaymentRecord(
            payment_id=self._input.payment_id,
            seq=self._seq,
            status=self._status,
            trade_no=self._trade_no,
            pay_url=self._pay_url,
            reason=self._reason,
            review_reason=self._review_reason,
            paid_amount_minor=self._paid_amount_minor,
            paid_at=self._paid_at,
            expires_at=self._expires_at,
            event=event,
        )

    async def _query_trade(self, number: int) -> Optional[Trade]:
        try:
            return await self._provider_call(PaymentActivities.query_trade, self._ref("query"), f"query trade #{number}")
        except ActivityError as err:
            self._note(f"query #{number} failed", _cause(err))
            return None

    async def _close_trade(self, attempts: int) -> Optional[Trade]:
        """Close with bounded rounds of bounded retries. None when the provider never answered."""
        backoff = self._input.timing.query_backoff_seconds
        for number in range(1, attempts + 1):
            try:
                return await self._provider_call(PaymentActivities.close_trade, self._ref("close"), f"close trade #{number}")
            except ActivityError as err:
                self._note(f"close #{number} failed", _cause(err))
                if number < attempts:
                    delay = backoff[min(number - 1, len(backoff) - 1)]
                    await self._wait_for_callback(delay, f"retry close in {delay:g}s")
                    await self._process_inbox()
                    if self._status not in OPEN:
                        return None
        return None

    def _ref(self, purpose: str) -> TradeRef:
        return TradeRef(
            provider=self._request.provider,
            order_id=self._request.order_id,
            idempotency_key=f"{workflow.info().workflow_id}:{purpose}",
        )

    async def _provider_call(self, activity, arg, summary: str):
        timing = self._input.timing
        initial = timing.provider_retry_initial_seconds
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=initial),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=initial * 8),
                maximum_attempts=timing.provider_max_attempts,
                non_retryable_error_types=[PROVIDER_REJECTED],
            ),
            summary=summary,
        )

    async def _db(self, activity, arg, summary: str):
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=RetryPolicy(
                initial_interval=DB_RETRY.initial_interval,
                maximum_interval=DB_RETRY.maximum_interval,
                maximum_attempts=DB_RETRY.maximum_attempts,
                non_retryable_error_types=[ORDER_CONFLICT],
            ),
            summary=summary,
        )

    async def _wait_for_callback(self, seconds: float, summary: str) -> None:
        if self._inbox or seconds <= 0:
            return
        try:
            await workflow.wait_condition(lambda: bool(self._inbox), timeout=seconds, timeout_summary=summary)
        except asyncio.TimeoutError:
            pass

    def _seconds_left(self) -> float:
        return max(0.0, (self._expires_at - workflow.now()).total_seconds())

    def _note(self, event: str, detail: str = "") -> None:
        self._timeline.append(TimelineEntry(at=workflow.now(), event=event, detail=detail))
        workflow.logger.info("%s: %s %s", self._input.payment_id, event, detail)

    def _view(self) -> PaymentView:
        request = self._request
        return PaymentView(
            payment_id=self._input.payment_id,
            order_id=request.order_id,
            status=self._status,
            amount_minor=request.amount_minor,
            currency=request.currency,
            provider=request.provider,
            pay_url=self._pay_url,
            trade_no=self._trade_no,
            reason=self._reason,
            review_reason=self._review_reason,
            expires_at=self._expires_at,
            timeline=list(self._timeline),
        )


def _cause(err: ActivityError) -> str:
    cause = err.cause
    return str(cause) if cause is not None else str(err)


def _is_rejection(err: ActivityError) -> bool:
    return isinstance(err.cause, ApplicationError) and err.cause.type == PROVIDER_REJECTED
