"""PaymentWorkflow as released in 0.1.0, frozen.

Payments started by 0.1.0 have no ``payment-0.2.0`` patch marker in their histories;
``workflows.payment.PaymentWorkflow`` runs them on this code until they complete, so
their histories replay command for command. Never change this file: a change here
breaks payments that are still running. (Its handlers are plain methods; the
dispatcher in workflows/payment.py registers them.)

When it can be deleted: 0.1.0 had no refund phase, so its longest payment is the time
to live, the reviews it waits for (each up to the review deadline) and the resend window.
Once ``WorkflowType = "PaymentWorkflow" AND ExecutionStatus = "Running" AND StartTime <
"<0.2.0 deploy>"`` lists nothing, delete this file, its branch in the dispatcher and
tests/histories/0.1.0 together.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timedelta
from typing import Optional

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError
from temporalio.workflow import ParentClosePolicy

from workflows.common import cause, db_call, provider_call, rejection_code
from workflows.refund import RefundWorkflow, refund_workflow_id
from workflows.review import ManualReviewWorkflow, review_workflow_id

with workflow.unsafe.imports_passed_through():
    import email_validator  # noqa: F401  (pydantic loads it lazily to validate EmailStr)
    import idna.uts46data  # noqa: F401

    from activities.notify import UNSAFE_TARGET, NotificationActivities
    from activities.payment import PaymentActivities
    from paysentinel.models import (
        CreateTradeInput,
        NotificationInput,
        NotifyKind,
        PaymentInput,
        PaymentRecord,
        PaymentStatus,
        PaymentView,
        ProviderCallback,
        RecordPaymentInput,
        RefundCommand,
        RefundInput,
        RefundStatus,
        RefundView,
        ReviewAction,
        ReviewInput,
        ReviewOutcome,
        ReviewReason,
        SettlementFinding,
        RiskCheckInput,
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
RISK_HOLD = "ACQ.RISK_HOLD"
# A failed refund is retried by a review's deadline default this many times; after that
# its review has no deadline: a person must decide.
AUTOMATIC_REFUND_ROUNDS = 2
NO_DEADLINE_SECONDS = 10 * 365 * 86400.0


# The customer hears about these outcomes once each (refunds and reviews: once per event).
TELL = {
    PaymentStatus.SUCCEEDED: (NotifyKind.PAID, "the payment provider confirmed your payment"),
    PaymentStatus.FAILED: (NotifyKind.FAILED, "the payment could not be made"),
    PaymentStatus.CLOSED: (NotifyKind.CLOSED, "the payment was not completed in time"),
}


def payment_workflow_id(order_id: str) -> str:
    """The business key: one payment workflow per merchant order."""
    return f"payment-{order_id}"


def customer_reason(refund: RefundView) -> str:
    """Why the money goes back, in the customer's words."""
    if refund.reason.startswith("duplicate charge"):
        return "you were charged twice for this order; the extra payment is being returned"
    if refund.reason.startswith("paid after"):
        return "your payment arrived after the order had been closed, so it is being returned"
    if refund.requested_by == "merchant":
        return f"the shop refunds you: {refund.reason}"
    return "after checking the payment, the money is being returned"


def refund_id_for(order_id: str, key: str) -> str:
    """The provider's out_request_no: derived from the order and the request, nothing else goes into it."""
    return "rf" + hashlib.sha256(f"{order_id}:{key}".encode()).hexdigest()[:30]


OUTCOMES = (PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CLOSED)


class PaymentWorkflow_0_1_0:
    def __init__(self, input: PaymentInput) -> None:
        self._input = input
        self._request = input.request
        self._status = PaymentStatus.CREATED
        self._base = PaymentStatus.CREATED  # the lifecycle's own outcome, before refunds and reviews
        self._seq = 0
        self._timeline: list[TimelineEntry] = []
        self._inbox: list[ProviderCallback] = []
        self._seen_events: set[str] = set()
        self._callback_at: Optional[datetime] = None  # set while a callback is being applied
        self._trade_no: Optional[str] = None
        self._pay_url: Optional[str] = None
        self._reason: Optional[str] = None
        self._review_reason: Optional[str] = None
        self._paid_at = None
        self._expires_at = None
        self._captured: dict[str, int] = {}  # trade_no -> amount the provider took
        self._refunded: dict[str, int] = {}  # trade_no -> amount refunded
        self._accepted: Optional[str] = None  # the trade this order is paid with
        self._refunds: dict[str, RefundView] = {}  # refund key -> refund
        self._open_reviews: dict[str, str] = {}  # review id -> reason
        self._reviews = 0
        self._busy = 0  # refunds, reviews and notifications still running
        self._told: set[NotifyKind] = set()
        self._final_at = None

    # --- Messages -------------------------------------------------------------------

    def callback(self, event: ProviderCallback) -> None:
        """A verified provider callback, delivered by the webhook receiver."""
        if event.event_id in self._seen_events:
            self._note("callback duplicate", f"event {event.event_id} already received; ignored")
            return
        self._seen_events.add(event.event_id)
        self._inbox.append(event)

    def settlement(self, finding: SettlementFinding) -> None:
        """A difference the daily reconciliation found between the provider's bill and us."""
        key = f"settlement:{finding.kind}:{finding.trade_no}:{finding.amount_minor}"
        if key in self._seen_events:
            self._note("settlement duplicate", f"{finding.kind} for trade {finding.trade_no} already received; ignored")
            return
        self._seen_events.add(key)
        if finding.kind == "missing_at_provider":
            self._note("settlement: missing at the provider", finding.detail)
            self._spawn(self._settlement_review(finding.trade_no, finding.detail))
            return
        self._inbox.append(ProviderCallback(
            event_id=key, provider=self._request.provider, order_id=finding.order_id, trade_no=finding.trade_no,
            trade_status=TradeStatus.TRADE_SUCCESS, amount_minor=finding.amount_minor, currency=finding.currency,
            paid_at=finding.paid_at, received_at=workflow.now(), source="settlement",
        ))

    async def checkout(self) -> PaymentView:
        """Returns once the payer can pay (pay URL known) or the payment is final."""
        await workflow.wait_condition(lambda: self._pay_url is not None or self._status not in OPEN)
        return self._view()

    async def refund(self, command: RefundCommand) -> RefundView:
        """A merchant's refund of the paid amount; the same key again is the same refund."""
        if command.key in self._refunds:
            return self._refunds[command.key]
        assert self._accepted is not None
        return self._start_refund(self._accepted, command.amount_minor, command.key, command.reason,
                                  command.requested_by)

    def _check_refund(self, command: RefundCommand) -> None:
        existing = self._refunds.get(command.key)
        if existing is not None:
            if existing.amount_minor != command.amount_minor:
                raise ValueError(
                    f"refund key {command.key!r} was already used for {self._money(existing.amount_minor)}"
                )
            return
        if self._open_reviews:
            raise ValueError("the payment is under review; the review decides what happens to the money first")
        if self._accepted is None:
            raise ValueError(f"the payment is {self._status.value}; only a paid payment can be refunded")
        trade = self._accepted
        taken = self._refunding_or_refunded(trade)
        refundable = self._captured[trade] - taken
        if command.amount_minor > refundable:
            raise ValueError(
                f"a refund of {self._money(command.amount_minor)} exceeds what is refundable: "
                f"{self._money(refundable)} (captured {self._money(self._captured[trade])}, "
                f"refunded or refunding {self._money(taken)})"
            )

    def view(self) -> PaymentView:
        return self._view()

    # --- Main line ------------------------------------------------------------------

    async def run(self, input: PaymentInput) -> PaymentView:
        request = input.request
        self._set_expiry()
        self._note(
            "created",
            f"order {request.order_id}, {self._money(request.amount_minor)} via {request.provider}, "
            f"expires {self._expires_at.isoformat()}",
        )
        await db_call(
            PaymentActivities.record_payment,
            RecordPaymentInput(payment_id=input.payment_id, request=request, expires_at=self._expires_at),
            "record payment",
        )
        if await self._passes_risk_rules():
            trade = await self._create_trade()
            if trade is not None:
                self._trade_no, self._pay_url = trade.trade_no, trade.pay_url
                await self._transition(PaymentStatus.PENDING, "trade created",
                                       f"trade {trade.trade_no}; waiting for the payer")
                await self._await_outcome()
        self._final_at = workflow.now()
        await self._serve_late_events()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._view()

    def _set_expiry(self) -> None:
        ttl = self._request.expires_in_seconds or self._input.timing.payment_ttl_seconds
        self._expires_at = workflow.now() + timedelta(seconds=ttl)

    async def _passes_risk_rules(self) -> bool:
        verdict = await db_call(
            PaymentActivities.assess_risk,
            RiskCheckInput(payment_id=self._input.payment_id, request=self._request),
            "risk rules",
        )
        if not verdict.flagged:
            return True
        outcome = await self._review(ReviewReason.RISK_RULE, "; ".join(verdict.hits))
        if outcome.action is ReviewAction.APPROVE:
            self._set_expiry()  # the payer's time starts now that the payment may go on
            return True
        await self._transition(PaymentStatus.FAILED, "rejected", f"risk review: {outcome.reason}; no money moved")
        return False

    async def _create_trade(self) -> Optional[Trade]:
        request = self._request
        for attempt in (1, 2):
            try:
                return await provider_call(
                    PaymentActivities.create_trade,
                    CreateTradeInput(
                        provider=request.provider,
                        order_id=request.order_id,
                        amount_minor=request.amount_minor,
                        currency=request.currency,
                        subject=request.subject,
                        notify_url=self._input.notify_url,
                        expires_at=self._expires_at,
                        idempotency_key=f"{workflow.info().workflow_id}:create" + ("" if attempt == 1 else ":after-review"),
                    ),
                    self._input.timing,
                    "create trade",
                )
            except ActivityError as err:
                code = rejection_code(err)
                if code == RISK_HOLD and attempt == 1:
                    outcome = await self._review(ReviewReason.PROVIDER_RISK, f"provider held the payment: {cause(err)}")
                    if outcome.action is ReviewAction.APPROVE:
                        self._note("create again", "the operator approved; asking the provider again")
                        continue
                    await self._transition(PaymentStatus.FAILED, "rejected", f"provider risk hold: {outcome.reason}")
                    return None
                if code is not None:
                    await self._transition(PaymentStatus.FAILED, "create rejected",
                                           f"provider rejected the trade: {cause(err)}")
                    return None
                break
        # Retries exhausted: the provider may still have created the trade. Close it so
        # nobody can pay it; only then is "failed, no money moved" true.
        self._note("create failed", "provider unavailable after bounded retries; closing the order at the provider")
        closed = await self._close_trade(attempts=1)
        if closed is not None:
            await self._apply_trade(closed, "close after failed create")
        if self._status in OPEN and not self._captured:
            await self._transition(
                PaymentStatus.FAILED, "create failed", "the provider did not answer within the retry limit; no money moved"
            )
        return None

    def _undecided(self) -> bool:
        return self._status in OPEN and not self._captured

    async def _await_outcome(self) -> None:
        timing = self._input.timing
        await self._wait_for_callback(min(timing.callback_timeout_seconds, self._seconds_left()), "callback timeout")
        await self._process_inbox()
        attempt = 0
        while self._undecided() and self._seconds_left() > 0:
            trade = await self._query_trade(attempt + 1)
            if trade is not None:
                await self._apply_trade(trade, f"query #{attempt + 1}")
            if not self._undecided():
                break
            delay = timing.query_backoff_seconds[min(attempt, len(timing.query_backoff_seconds) - 1)]
            attempt += 1
            await self._wait_for_callback(min(delay, self._seconds_left()), f"next query in {delay:g}s")
            await self._process_inbox()
        if self._undecided():
            await self._expire()

    async def _expire(self) -> None:
        """Time to live is over: close at the provider before declaring the payment unpaid."""
        self._note("expired", "time to live ended; closing the trade at the provider")
        trade = await self._close_trade(attempts=self._input.timing.close_attempts)
        await self._process_inbox()
        if not self._undecided():
            return
        if trade is not None and not trade.exists:
            await self._transition(PaymentStatus.CLOSED, "closed", "the provider has no such trade; nothing was paid")
            return
        if trade is not None:
            await self._apply_trade(trade, "close")
            if not self._undecided():
                return
        evidence = (
            "the provider could not be reached to close the trade" if trade is None
            else f"the provider still reports {trade.status} after close"
        )
        outcome = await self._review(ReviewReason.STATUS_UNKNOWN, evidence)
        if outcome.action is ReviewAction.MARK_PAID and self._trade_no:
            self._captured[self._trade_no] = self._request.amount_minor
            self._accepted, self._base = self._trade_no, PaymentStatus.SUCCEEDED
            await self._settle("marked paid", f"by {outcome.operator}: {outcome.reason}")
        else:
            self._base = PaymentStatus.CLOSED
            await self._settle("closed", f"by {outcome.operator}: {outcome.reason}")

    async def _serve_late_events(self) -> None:
        """Providers resend callbacks for hours, and paid money may be refunded for longer."""
        timing = self._input.timing
        listen_end = workflow.now() + timedelta(seconds=timing.resend_window_seconds)
        self._note("listening", f"for late callbacks until {listen_end.isoformat()}")
        while True:
            end = listen_end
            if self._accepted is not None:
                end = max(end, self._final_at + timedelta(seconds=timing.refund_window_seconds))
            left = (end - workflow.now()).total_seconds()
            if left <= 0 and self._busy == 0 and not self._inbox:
                break
            if left > 0:
                await self._wait_for_callback(left, "late-callback and refund window")
            else:  # the window is over; let running refunds and reviews finish
                await workflow.wait_condition(lambda: bool(self._inbox) or self._busy == 0)
            await self._process_inbox()
        self._note("completed", f"final status {self._status.value}")

    # --- Results from the provider -----------------------------------------------------

    async def _process_inbox(self) -> None:
        while self._inbox:
            event = self._inbox.pop(0)
            self._note(
                event.source,
                f"{event.trade_status.value} for trade {event.trade_no}, "
                f"{self._money(event.amount_minor, event.currency)} (event {event.event_id})",
            )
            self._callback_at = event.received_at
            await self._apply_trade(
                Trade(
                    order_id=event.order_id,
                    trade_no=event.trade_no,
                    status=event.trade_status,
                    amount_minor=event.amount_minor,
                    currency=event.currency,
                    paid_at=event.paid_at,
                ),
                event.source,
            )
            self._callback_at = None

    async def _apply_trade(self, trade: Trade, source: str) -> None:
        """Decide what a provider result means for this payment; never move backwards."""
        request = self._request
        status = trade.status
        if not trade.exists or status is None:
            self._note(f"{source}: no trade", "the provider has no trade for this order yet")
            return
        if not status.is_paid:
            if status is TradeStatus.TRADE_CLOSED and self._undecided():
                await self._transition(PaymentStatus.CLOSED, "closed", f"closed at the provider ({source}); nothing was paid")
            else:
                self._note(f"{source}: no change", f"provider reports {status.value}; payment stays {self._status.value}")
            return
        trade_no = trade.trade_no or ""
        if trade_no in self._captured:
            captured = self._captured[trade_no]
            if source == "settlement" and (trade.amount_minor != captured or trade.currency != request.currency):
                self._spawn(self._settlement_review(
                    trade_no, f"the settlement bill reports {self._money(trade.amount_minor or 0, trade.currency)} "
                              f"for trade {trade_no}; we captured {self._money(captured)}"))
                return
            self._note(f"{source}: no change", f"trade {trade_no} is already recorded as paid")
            return
        self._captured[trade_no] = trade.amount_minor or 0
        if trade.amount_minor != request.amount_minor or trade.currency != request.currency:
            self._spawn(self._amount_mismatch(trade, source))
        elif self._status in OPEN:
            self._trade_no, self._accepted, self._paid_at = trade_no, trade_no, trade.paid_at
            await self._transition(PaymentStatus.SUCCEEDED, "paid", f"confirmed by {source}, trade {trade_no}")
        elif self._accepted is not None:
            self._note("duplicate charge", f"second paid trade {trade_no} for the order (paid with {self._accepted})")
            self._start_refund(trade_no, self._captured[trade_no], f"dup-{trade_no}",
                               f"duplicate charge: the order is already paid with trade {self._accepted}", "system")
        else:
            self._note("paid after close", f"{source} reports trade {trade_no} paid after the payment was "
                                           f"{self._status.value}")
            self._start_refund(trade_no, self._captured[trade_no], f"late-{trade_no}",
                               f"paid after the payment was {self._base.value}", "system")

    async def _amount_mismatch(self, trade: Trade, source: str) -> None:
        request, trade_no = self._request, trade.trade_no or ""
        claimed = self._money(trade.amount_minor or 0, trade.currency)
        evidence = f"{source} reports {claimed} for trade {trade_no}, order is {self._money(request.amount_minor)}"
        found = await self._query_trade(0)
        if found is not None and found.trade_no == trade_no and found.status is not None and found.status.is_paid:
            self._captured[trade_no] = found.amount_minor or 0  # refunds use what the provider really took
            evidence += f"; the provider's query says {self._money(found.amount_minor or 0, found.currency)}"
        outcome = await self._review(ReviewReason.AMOUNT_MISMATCH, evidence)
        if outcome.action is ReviewAction.APPROVE:
            self._trade_no, self._accepted, self._base = trade_no, trade_no, PaymentStatus.SUCCEEDED
            await self._settle("accepted", f"{self._money(self._captured[trade_no])} accepted by {outcome.operator}")
        else:
            self._base = PaymentStatus.CLOSED
            self._start_refund(trade_no, self._captured[trade_no], f"review-{outcome.review_id.rsplit('-', 1)[1]}",
                               f"amount mismatch, {outcome.action.value} by {outcome.operator}: {outcome.reason}",
                               outcome.operator)

    async def _settlement_review(self, trade_no: str, evidence: str) -> None:
        outcome = await self._review(ReviewReason.SETTLEMENT_MISMATCH, evidence)
        if outcome.action is ReviewAction.REFUND and self._captured.get(trade_no, 0) > self._refunded.get(trade_no, 0):
            amount = self._captured[trade_no] - self._refunded.get(trade_no, 0)
            self._start_refund(trade_no, amount, f"review-{outcome.review_id.rsplit('-', 1)[1]}",
                               f"settlement mismatch, refund by {outcome.operator}: {outcome.reason}", outcome.operator)
        else:
            await self._settle("settlement checked", f"{outcome.action.value} by {outcome.operator}: {outcome.reason}")

    # --- Refunds and reviews (child workflows) -----------------------------------------

    def _start_refund(self, trade_no: str, amount: int, key: str, reason: str, requested_by: str) -> RefundView:
        view = RefundView(
            refund_id=refund_id_for(self._request.order_id, key), trade_no=trade_no, amount_minor=amount,
            status=RefundStatus.PROCESSING, reason=reason, requested_by=requested_by,
        )
        self._refunds[key] = view
        self._spawn(self._run_refund(key, view, round=0))
        return view

    async def _run_refund(self, key: str, view: RefundView, round: int) -> None:
        request, timing = self._request, self._input.timing
        await self._settle("refund started", f"{self._money(view.amount_minor)} of trade {view.trade_no}: {view.reason}")
        self._tell(NotifyKind.REFUND_STARTED, f"refund-{key}-{round}", customer_reason(view), view.amount_minor)
        result = await workflow.execute_child_workflow(
            RefundWorkflow.run,
            RefundInput(
                payment_id=self._input.payment_id, provider=request.provider, order_id=request.order_id,
                trade_no=view.trade_no, refund_id=view.refund_id, amount_minor=view.amount_minor,
                currency=request.currency, reason=view.reason, requested_by=view.requested_by, timing=timing,
            ),
            id=refund_workflow_id(self._input.payment_id, key if round == 0 else f"{key}-again{round}"),
            parent_close_policy=ParentClosePolicy.ABANDON,
            static_summary=f"Refund {self._money(view.amount_minor)} of order {request.order_id}",
        )
        self._refunds[key] = result
        if result.status is RefundStatus.SUCCEEDED:
            self._refunded[view.trade_no] = self._refunded.get(view.trade_no, 0) + view.amount_minor
            await self._settle("refunded", f"{self._money(view.amount_minor)} of trade {view.trade_no}")
            self._tell(NotifyKind.REFUNDED, f"refund-{key}-done", f"the refund of {self._money(view.amount_minor)} "
                       "was completed", view.amount_minor)
            return
        self._note("refund failed", result.detail or "")
        outcome = await self._review(
            ReviewReason.REFUND_FAILED,
            f"refund {view.refund_id} of {self._money(view.amount_minor)} (round {round + 1}): {result.detail}",
            deadline_seconds=None if round < AUTOMATIC_REFUND_ROUNDS else NO_DEADLINE_SECONDS,
        )
        if outcome.action is ReviewAction.REFUND:
            retry = view.model_copy(update={"status": RefundStatus.PROCESSING, "detail": None})
            self._refunds[key] = retry
            await self._run_refund(key, retry, round + 1)
        else:
            await self._settle("refund abandoned", f"by {outcome.operator}: {outcome.reason}")

    def _refunding_or_refunded(self, trade_no: str) -> int:
        return sum(r.amount_minor for r in self._refunds.values()
                   if r.trade_no == trade_no and r.status is not RefundStatus.FAILED)

    async def _review(
        self, reason: ReviewReason, evidence: str, deadline_seconds: Optional[float] = None
    ) -> ReviewOutcome:
        """Open a manual review (a child workflow) and wait for its decision."""
        self._reviews += 1
        review_id = review_workflow_id(self._input.payment_id, self._reviews)
        self._open_reviews[review_id] = reason.value
        self._review_reason = reason.value
        timing = self._input.timing
        await self._settle("review opened", f"{reason.value}: {evidence}", review_reason=reason.value)
        self._tell(NotifyKind.IN_REVIEW, f"review-{self._reviews}", "the payment needs a check before we can "
                   "confirm it", sum(self._captured.values()) or self._request.amount_minor)
        outcome = await workflow.execute_child_workflow(
            ManualReviewWorkflow.run,
            ReviewInput(
                review_id=review_id, payment_id=self._input.payment_id, order_id=self._request.order_id,
                reason=reason, evidence=evidence, amount_minor=self._request.amount_minor,
                currency=self._request.currency, captured_minor=sum(self._captured.values()),
                escalate_after_seconds=timing.review_escalate_seconds,
                deadline_seconds=deadline_seconds or timing.review_deadline_seconds,
            ),
            id=review_id,
            parent_close_policy=ParentClosePolicy.ABANDON,
            static_summary=f"Review of order {self._request.order_id}: {reason.value}",
        )
        del self._open_reviews[review_id]
        self._note("review decided", f"{outcome.action.value} by {outcome.operator}: {outcome.reason}")
        return outcome

    def _tell(self, kind: NotifyKind, key: str, detail: str, amount_minor: int) -> None:
        """Tell the customer and the merchant, alongside the main line; once per ``key``."""
        request = self._request
        if not request.customer.email and not request.notify_url:
            return
        notification = NotificationInput(
            key=f"{self._input.payment_id}:{key}", payment_id=self._input.payment_id, order_id=request.order_id,
            kind=kind, amount_minor=amount_minor, currency=request.currency, detail=detail,
            email=request.customer.email, webhook_url=request.notify_url,
        )
        self._spawn(self._send(notification))

    async def _send(self, notification: NotificationInput) -> None:
        timing = self._input.timing
        initial = timing.notify_retry_initial_seconds
        try:
            await workflow.execute_activity_method(
                NotificationActivities.notify,
                notification,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=initial),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=initial * 64),
                    maximum_attempts=timing.notify_max_attempts,
                    non_retryable_error_types=[UNSAFE_TARGET],
                ),
                summary=f"notify customer: {notification.kind.value}",
            )
            self._note("notified", f"{notification.kind.value}: {notification.detail}")
        except ActivityError as err:
            self._note("notification failed", f"{notification.kind.value}: {cause(err)}")

    def _spawn(self, work) -> None:
        """Run a refund or review alongside the main line; the workflow waits for it before ending."""
        self._busy += 1

        async def run() -> None:
            try:
                await work
            finally:
                self._busy -= 1

        asyncio.create_task(run())

    # --- Status -------------------------------------------------------------------------

    def _money_status(self) -> PaymentStatus:
        """The status the money says: reviews first, then refunds, then the accepted charge."""
        if self._open_reviews:
            return PaymentStatus.IN_REVIEW
        if any(r.status is RefundStatus.PROCESSING for r in self._refunds.values()):
            return PaymentStatus.REFUNDING
        if self._accepted is not None:
            refunded = self._refunded.get(self._accepted, 0)
            if refunded == 0:
                return PaymentStatus.SUCCEEDED
            return PaymentStatus.REFUNDED if refunded >= self._captured[self._accepted] else PaymentStatus.PARTIALLY_REFUNDED
        if self._captured and all(self._refunded.get(t, 0) >= a for t, a in self._captured.items()):
            return PaymentStatus.REFUNDED
        return self._base

    async def _settle(self, event: str, detail: str, review_reason: Optional[str] = None) -> None:
        await self._transition(self._money_status(), event, detail, review_reason)

    async def _transition(
        self, status: PaymentStatus, event: str, detail: str, review_reason: Optional[str] = None
    ) -> None:
        if status in (PaymentStatus.CREATED, PaymentStatus.PENDING, PaymentStatus.SUCCEEDED,
                      PaymentStatus.FAILED, PaymentStatus.CLOSED):
            self._base = status
        previous, self._status = self._status, status
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
        if status in TELL and status is not previous and TELL[status][0] not in self._told:
            self._told.add(TELL[status][0])
            self._tell(TELL[status][0], TELL[status][0].value, TELL[status][1], self._request.amount_minor)
        try:
            await db_call(PaymentActivities.save_payment_state, self._record(event), f"save {status.value}")
        except ActivityError as err:
            # The next transition writes the full snapshot again; the history keeps the truth.
            self._note("database sync failed", f"{cause(err)}; the next transition writes the full state")

    def _record(self, event: str) -> PaymentRecord:
        return PaymentRecord(
            payment_id=self._input.payment_id,
            seq=self._seq,
            status=self._status,
            trade_no=self._trade_no,
            pay_url=self._pay_url,
            reason=self._reason,
            review_reason=self._review_reason,
            paid_amount_minor=sum(self._captured.values()) if self._captured else None,
            refunded_minor=sum(self._refunded.values()),
            paid_at=self._paid_at,
            expires_at=self._expires_at,
            event=event,
            outcome=self._base if self._base in OUTCOMES else None,
            callback_received_at=self._callback_at,
        )

    # --- Provider calls --------------------------------------------------------------

    async def _query_trade(self, number: int) -> Optional[Trade]:
        label = f"query trade #{number}" if number else "query trade"
        try:
            return await provider_call(PaymentActivities.query_trade, self._ref("query"), self._input.timing, label)
        except ActivityError as err:
            self._note(f"query #{number} failed" if number else "query failed", cause(err))
            return None

    async def _close_trade(self, attempts: int) -> Optional[Trade]:
        """Close with bounded rounds of bounded retries. None when the provider never answered."""
        backoff = self._input.timing.query_backoff_seconds
        for number in range(1, attempts + 1):
            try:
                return await provider_call(
                    PaymentActivities.close_trade, self._ref("close"), self._input.timing, f"close trade #{number}"
                )
            except ActivityError as err:
                self._note(f"close #{number} failed", cause(err))
                if number < attempts:
                    delay = backoff[min(number - 1, len(backoff) - 1)]
                    await self._wait_for_callback(delay, f"retry close in {delay:g}s")
                    await self._process_inbox()
                    if not self._undecided():
                        return None
        return None

    def _ref(self, purpose: str) -> TradeRef:
        return TradeRef(
            provider=self._request.provider,
            order_id=self._request.order_id,
            idempotency_key=f"{workflow.info().workflow_id}:{purpose}",
        )

    # --- Helpers --------------------------------------------------------------------

    async def _wait_for_callback(self, seconds: float, summary: str) -> None:
        if self._inbox or seconds <= 0:
            return
        try:
            await workflow.wait_condition(lambda: bool(self._inbox), timeout=seconds, timeout_summary=summary)
        except asyncio.TimeoutError:
            pass

    def _seconds_left(self) -> float:
        return max(0.0, (self._expires_at - workflow.now()).total_seconds())

    def _money(self, amount_minor: int, currency: Optional[str] = None) -> str:
        currency = currency or self._request.currency
        return f"{to_major(amount_minor, currency)} {currency}"

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
            review_id=next(reversed(self._open_reviews), None) if self._open_reviews else None,
            captured_minor=sum(self._captured.values()),
            refunded_minor=sum(self._refunded.values()),
            expires_at=self._expires_at,
            refunds=list(self._refunds.values()),
            timeline=list(self._timeline),
        )
