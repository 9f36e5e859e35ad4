"""PaymentWorkflow's payment logic as released in 0.2.0, frozen.

Payments started by 0.2.0 carry the ``payment-0.2.0`` patch marker but not
``payment-0.3.0``; ``workflows.payment.PaymentWorkflow`` runs them on this code (the
first run, and the refund phase a paid one continued into under 0.2.0), so their
histories replay command for command, including this module's own
``workflow.patched`` checks. A run a 0.2.0 payment continues into after the 0.3.0
deploy starts on the current code, from the ``PaymentState`` it carries. Never change
this file: a change here breaks payments that are still running.

When it can be deleted: once no run that started under 0.2.0 is open. The longest such
run is a paid payment's refund phase: the refund window (PAYSENTINEL_REFUND_WINDOW_SECONDS,
90 days by default) counted from the end of its first run, which itself lasts at most
the time to live, the reviews it waits for (each up to the review deadline; a
refund_failed review after two rounds waits for a person) and the resend window
(PAYSENTINEL_RESEND_WINDOW_SECONDS). So: the refund window plus the resend window plus a
review deadline after the last 0.2.0 worker stopped, confirmed by the visibility query
``WorkflowType = "PaymentWorkflow" AND ExecutionStatus = "Running" AND StartTime <
"<0.3.0 deploy>"`` listing nothing (a run continued as new after the deploy starts
later). Then delete this file, its branch in the dispatcher and tests/histories/0.2.0
together.

The lifecycle as released (kept for readers of old histories):

risk rules (a flagged payment goes to review before any money moves) -> record the
payment -> create the trade at the provider -> wait for the callback (timeout) -> query
the provider with a bounded backoff -> at the end of the payment's time to live, close
the trade at the provider (a close that reveals a payment means it was paid) -> final
state -> keep listening for late callbacks for the provider's resend window -> a paid
payment continues as new into its refund phase until the refund window ends.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timedelta
from typing import Any, Awaitable, Callable, Optional

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

from workflows.common import alert_once, cause, db_call, provider_call, rejection_code
from workflows.refund import RefundWorkflow, refund_workflow_id
from workflows.review import ManualReviewWorkflow, review_workflow_id

with workflow.unsafe.imports_passed_through():
    import email_validator  # noqa: F401  (pydantic loads it lazily to validate EmailStr)
    import idna.uts46data  # noqa: F401

    from activities.notify import UNSAFE_TARGET, NotificationActivities
    from activities.payment import PaymentActivities
    from paysentinel.ledger import Ledger, snapshot_seq
    from paysentinel.models import (
        REVIEW_ACTIONS,
        CreateTradeInput,
        IncidentInput,
        NotificationInput,
        NotifyKind,
        PaymentInput,
        PaymentRecord,
        PaymentState,
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
        RiskCheckInput,
        SettlementFinding,
        TimelineEntry,
        Trade,
        TradeRef,
        TradeStatus,
        to_major,
    )

# The marker of this release: present in every history started by 0.2.0 or later.
RELEASE_0_2_0 = "payment-0.2.0"

PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
ORDER_ID = SearchAttributeKey.for_keyword("OrderId")
PROVIDER = SearchAttributeKey.for_keyword("Provider")
AMOUNT_MINOR = SearchAttributeKey.for_int("AmountMinor")
CURRENCY = SearchAttributeKey.for_keyword("Currency")
REVIEW_REASON = SearchAttributeKey.for_keyword("ReviewReason")

OPEN = (PaymentStatus.CREATED, PaymentStatus.PENDING)
CLAIMS = ("callback",)  # sources whose amount is the sender's claim, not the provider's answer
RISK_HOLD = "ACQ.RISK_HOLD"
# A failed refund is retried by a review's deadline default this many times; after that
# its review has no deadline: a person must decide.
AUTOMATIC_REFUND_ROUNDS = 2
NO_DEADLINE_SECONDS = 10 * 365 * 86400.0
# A child workflow that fails (terminated, timed out, id clash) is started again this
# many times in all; then a refund goes to a person, a review applies its safe default.
CHILD_ATTEMPTS = 3
# How often the provider is asked to confirm a claimed amount before a person is asked.
CONFIRM_ROUNDS = 3
# After a review closed a payment the provider could not confirm, ask it at most this often.
UNCONFIRMED_QUERY_MAX_SECONDS = 3600.0


# The customer hears about these outcomes once each (refunds and reviews: once per event).
TELL = {
    PaymentStatus.SUCCEEDED: (NotifyKind.PAID, "the payment provider confirmed your payment"),
    PaymentStatus.FAILED: (NotifyKind.FAILED, "the payment could not be made"),
    PaymentStatus.CLOSED: (NotifyKind.CLOSED, "the payment was not completed in time"),
}
OUTCOMES = (PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CLOSED)


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


MERCHANT_KEY = "merchant:"  # a merchant's Idempotency-Key lives in its own namespace


def merchant_refund_key(key: str) -> str:
    """A merchant's refund key, apart from the internal ones (review-N, dup-…, late-…, settle-…)."""
    return MERCHANT_KEY + key


def _child_suffix(key: str) -> str:
    return "m-" + key[len(MERCHANT_KEY):] if key.startswith(MERCHANT_KEY) else key


async def _result(handle: workflow.ChildWorkflowHandle) -> Any:
    return await handle


def _failure(err: BaseException) -> str:
    """What happened to a child workflow, in words."""
    if isinstance(err, WorkflowAlreadyStartedError):
        return "its workflow id is already in use"
    inner = err.cause if isinstance(err, ChildWorkflowError) and err.cause is not None else err
    return f"{type(inner).__name__}: {inner}"


class Payment:
    """The payment's lifecycle as of release 0.2.0 (what PaymentWorkflow runs for new payments)."""

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
        self._paid_at: Optional[datetime] = None
        self._expires_at: Optional[datetime] = None
        self._captured: dict[str, int] = {}  # trade_no -> amount the provider took
        self._refunded: dict[str, int] = {}  # trade_no -> amount refunded
        self._kept: dict[str, int] = {}  # trade_no -> amount an operator decided to leave with the merchant
        self._accepted: Optional[str] = None  # the trade this order is paid with
        self._deciding: set[str] = set()  # trades whose amount is being confirmed or decided by a person
        self._refunds: dict[str, RefundView] = {}  # refund key -> refund
        self._open_reviews: dict[str, str] = {}  # review id -> reason
        self._review_handles: dict[str, workflow.ChildWorkflowHandle] = {}
        self._reviews = 0
        self._busy = 0  # refunds, reviews and notifications still running
        self._told: set[NotifyKind] = set()
        self._final_at: Optional[datetime] = None
        self._unconfirmed = False  # closed by a review while the provider could not say whether it was paid
        self._dirty = False  # the last database write gave up; the row must catch up
        self._alerted = False  # an operator was alerted about a failed child workflow
        if input.resume is not None:
            self._restore(input.resume)

    # --- Messages -------------------------------------------------------------------

    def callback(self, event: ProviderCallback) -> None:
        if event.event_id in self._seen_events:
            self._note("callback duplicate", f"event {event.event_id} already received; ignored")
            return
        self._seen_events.add(event.event_id)
        self._inbox.append(event)

    def settlement(self, finding: SettlementFinding) -> None:
        key = f"settlement:{finding.kind}:{finding.trade_no}:{finding.amount_minor}"
        if key in self._seen_events:
            self._note("settlement duplicate", f"{finding.kind} for trade {finding.trade_no} already received; ignored")
            return
        self._seen_events.add(key)
        if finding.kind == "missing_at_provider":
            self._note("settlement: missing at the provider", finding.detail)
            self._spawn(self._settlement_review(finding.trade_no, finding.detail), "settlement review")
            return
        self._inbox.append(ProviderCallback(
            event_id=key, provider=self._request.provider, order_id=finding.order_id, trade_no=finding.trade_no,
            trade_status=TradeStatus.TRADE_SUCCESS, amount_minor=finding.amount_minor, currency=finding.currency,
            paid_at=finding.paid_at, received_at=workflow.now(), source="settlement",
        ))

    async def checkout(self) -> PaymentView:
        await workflow.wait_condition(lambda: self._pay_url is not None or self._status not in OPEN)
        return self._view()

    async def refund(self, command: RefundCommand) -> RefundView:
        key = merchant_refund_key(command.key)
        if key in self._refunds:
            return self._refunds[key]
        assert self._accepted is not None
        return self._start_refund(self._accepted, command.amount_minor, key, command.reason, command.requested_by)

    def _check_refund(self, command: RefundCommand) -> None:
        existing = self._refunds.get(merchant_refund_key(command.key))
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
        ledger = self._ledger()
        refundable = ledger.refundable()
        if command.amount_minor > refundable:
            trade = self._accepted
            raise ValueError(
                f"a refund of {self._money(command.amount_minor)} exceeds what is refundable: "
                f"{self._money(refundable)} (captured {self._money(self._captured[trade])}, "
                f"refunded or refunding {self._money(self._refunding_or_refunded(trade))})"
            )

    # --- Main line ------------------------------------------------------------------

    async def run(self, input: PaymentInput) -> PaymentView:
        if input.resume is not None:
            return await self._refund_phase()
        request = input.request
        self._set_expiry()
        self._note(
            "created",
            f"order {request.order_id}, {self._money(request.amount_minor)} via {request.provider}, "
            f"expires {self._expires_at.isoformat() if self._expires_at else '?'}",
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
        await self._serve_late_events(workflow.now() + timedelta(seconds=input.timing.resend_window_seconds))
        if self._refund_window_left() > 0:
            await workflow.wait_condition(workflow.all_handlers_finished)
            self._note("refund phase", "the resend window is over; refunds stay possible until "
                       f"{self._refund_window_end().isoformat()} on the current release")
            workflow.continue_as_new(input.model_copy(update={"resume": self._state()}))
        return await self._complete()

    async def _refund_phase(self) -> PaymentView:
        """A paid payment after its resend window: refunds (and late events) until the refund window ends."""
        workflow.upsert_search_attributes([PAYMENT_STATUS.value_set(self._status.value)])
        await self._serve_late_events(self._refund_window_end())
        return await self._complete()

    async def _complete(self) -> PaymentView:
        await self._converge()
        if self._alerted:
            await self._alert_child(breach=False, detail="all child workflows of the payment have finished")
        self._note("completed", f"final status {self._status.value}")
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
                        self._set_expiry()  # the payer gets a full time to live from the approval on
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
        return self._base in OPEN and not self._captured and not self._deciding

    async def _await_outcome(self) -> None:
        timing = self._input.timing
        await self._wait_for_callback(min(timing.callback_timeout_seconds, self._seconds_left()), "callback timeout")
        await self._process_inbox()
        attempt = 0
        while True:
            if self._deciding and not self._captured:
                # A claimed payment is being confirmed with the provider: wait for its answer.
                await workflow.wait_condition(lambda: not self._deciding or bool(self._captured))
                await self._process_inbox()
                continue
            if not self._undecided() or self._seconds_left() <= 0:
                break
            trade = await self._query_trade(attempt + 1)
            if trade is not None:
                await self._apply_trade(trade, f"query #{attempt + 1}")
            if not self._undecided():
                break
            delay = self._backoff(attempt)
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
        # While a person looks, keep asking the provider and applying callbacks: a payment
        # the provider confirms settles the review as paid (the payer paid in time).
        outcome = await self._review(ReviewReason.STATUS_UNKNOWN, evidence, watch=self._watch_status)
        if self._accepted is not None or not self._undecided():
            await self._settle("review settled", f"the provider answered while the review was open: {outcome.reason}")
            return
        if outcome.action is ReviewAction.MARK_PAID and self._trade_no:
            self._captured[self._trade_no] = self._request.amount_minor
            self._accepted, self._base, self._paid_at = self._trade_no, PaymentStatus.SUCCEEDED, workflow.now()
            await self._settle("marked paid", f"by {outcome.operator}: {outcome.reason}")
        else:
            self._base = PaymentStatus.CLOSED
            self._unconfirmed = trade is None
            await self._settle("closed", f"by {outcome.operator}: {outcome.reason}")

    async def _watch_status(self, attempt: int) -> Optional[ReviewOutcome]:
        """One look at the provider while a status_unknown review is open; an outcome settles it."""
        await self._process_inbox()
        if self._undecided():
            trade = await self._query_trade(attempt + 1)
            if trade is not None:
                await self._apply_trade(trade, f"query during review #{attempt + 1}")
        if self._accepted is not None:
            return ReviewOutcome(review_id="", action=ReviewAction.MARK_PAID, operator="system",
                                 reason=f"the provider confirmed trade {self._accepted} paid")
        if not self._undecided():
            return ReviewOutcome(review_id="", action=ReviewAction.REJECT, operator="system",
                                 reason="the provider confirmed the trade closed, nothing paid")
        return None

    async def _serve_late_events(self, listen_end: datetime) -> None:
        """Providers resend callbacks for hours; until ``listen_end`` late events are applied.
        A payment closed without the provider's confirmation keeps asking it on the backoff."""
        self._note("listening", f"for late callbacks until {listen_end.isoformat()}")
        attempt = 0
        while True:
            left = (listen_end - workflow.now()).total_seconds()
            if left <= 0 and self._busy == 0 and not self._inbox:
                break
            if left > 0 and self._unconfirmed:
                delay = min(self._backoff(attempt), UNCONFIRMED_QUERY_MAX_SECONDS)
                if not await self._wait_for_callback(min(left, delay), f"close at the provider again in {delay:g}s"):
                    attempt += 1
                    await self._close_unconfirmed(attempt)
            elif left > 0:
                await self._wait_for_callback(left, "late-callback window")
            else:  # the window is over; let running refunds and reviews finish
                await workflow.wait_condition(lambda: bool(self._inbox) or self._busy == 0)
            await self._process_inbox()

    async def _close_unconfirmed(self, attempt: int) -> None:
        """A review closed the payment while the provider was unreachable: close the trade
        there too, and learn whether money was taken (a close that reveals a payment)."""
        trade = await self._close_trade(attempts=1)
        if trade is None:
            return
        if trade.exists and trade.status is not None and trade.status.is_paid:
            self._unconfirmed = False
            await self._apply_trade(trade, f"close after review #{attempt}")
        elif not trade.exists or trade.status is TradeStatus.TRADE_CLOSED:
            self._unconfirmed = False
            self._note("provider confirmed", f"the provider reports {trade.status.value if trade.status else 'no trade'}"
                       "; nothing was paid")

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
        if trade_no in self._captured or trade_no in self._deciding:
            captured = self._captured.get(trade_no)
            if source == "settlement" and captured is not None and (
                    trade.amount_minor != captured or trade.currency != request.currency):
                self._spawn(self._settlement_review(
                    trade_no, f"the settlement bill reports {self._money(trade.amount_minor or 0, trade.currency)} "
                              f"for trade {trade_no}; we captured {self._money(captured)}"), "settlement review")
                return
            self._note(f"{source}: no change", f"trade {trade_no} is already recorded as paid")
            return
        if trade.amount_minor == request.amount_minor and trade.currency == request.currency:
            self._captured[trade_no] = trade.amount_minor or 0
            await self._accept_or_return(trade_no, trade.paid_at, source)
            return
        evidence = (f"{source} reports {self._money(trade.amount_minor or 0, trade.currency)} for trade {trade_no}, "
                    f"order is {self._money(request.amount_minor)}")
        self._deciding.add(trade_no)
        if source in CLAIMS:
            # A callback's amount is a claim: only the provider's own answer says what it took.
            found = await self._confirm(trade_no)
            if found is None:
                self._spawn(self._amount_unknown(trade, evidence), "amount check")
                return
            await self._confirmed(trade, found, evidence)
            return
        self._captured[trade_no] = trade.amount_minor or 0
        self._spawn(self._decide_mismatch(trade_no, trade.paid_at, evidence), "amount mismatch review")

    async def _confirmed(self, claim: Trade, found: Trade, evidence: str) -> None:
        """The provider answered about a claimed trade: what it says is what was taken."""
        request, trade_no = self._request, claim.trade_no or ""
        if found.trade_no != trade_no or found.status is None or not found.status.is_paid:
            self._deciding.discard(trade_no)
            self._note("claim not confirmed", f"{evidence}; the provider reports "
                       f"{found.status.value if found.status else 'no such trade'}: nothing captured")
            return
        self._captured[trade_no] = found.amount_minor or 0
        if found.amount_minor == request.amount_minor and found.currency == request.currency:
            self._deciding.discard(trade_no)
            self._note("amount confirmed", f"{evidence}; the provider took {self._money(found.amount_minor or 0)}, "
                       "the order amount")
            await self._accept_or_return(trade_no, found.paid_at or claim.paid_at, "query")
            return
        evidence += f"; the provider's query says {self._money(found.amount_minor or 0, found.currency)}"
        self._spawn(self._decide_mismatch(trade_no, found.paid_at or claim.paid_at, evidence),
                    "amount mismatch review")

    async def _accept_or_return(self, trade_no: str, paid_at: Optional[datetime], source: str) -> None:
        """A confirmed capture of the right amount: the order's payment, or money to give back."""
        if self._base in OPEN and self._accepted is None:
            self._trade_no, self._accepted, self._paid_at = trade_no, trade_no, paid_at or workflow.now()
            self._base = PaymentStatus.SUCCEEDED
            await self._settle("paid", f"confirmed by {source}, trade {trade_no}")
        elif self._accepted is not None:
            self._note("duplicate charge", f"second paid trade {trade_no} for the order (paid with {self._accepted})")
            self._start_refund(trade_no, self._captured[trade_no], f"dup-{trade_no}",
                               f"duplicate charge: the order is already paid with trade {self._accepted}", "system")
        else:
            self._note("paid after close", f"{source} reports trade {trade_no} paid after the payment was "
                                           f"{self._base.value}")
            self._start_refund(trade_no, self._captured[trade_no], f"late-{trade_no}",
                               f"paid after the payment was {self._base.value}", "system")

    async def _confirm(self, trade_no: str) -> Optional[Trade]:
        """The provider's own record of the trade, asked on the backoff; None while it cannot say."""
        for attempt in range(CONFIRM_ROUNDS):
            found = await self._query_trade(0, trade_no)
            if found is not None:
                return found
            if attempt + 1 < CONFIRM_ROUNDS:
                await workflow.sleep(self._backoff(attempt), summary=f"confirm trade {trade_no} again")
        return None

    async def _amount_unknown(self, trade: Trade, evidence: str) -> None:
        """The provider cannot say what it took: nothing is accepted or refunded on the claim.
        A person is told; every decision asks the provider again."""
        trade_no, rounds = trade.trade_no or "", 0
        while True:
            rounds += 1
            outcome = await self._review(
                ReviewReason.AMOUNT_MISMATCH,
                f"{evidence}; the provider could not be asked what it took, so nothing is refunded or accepted "
                "until it answers (any decision asks it again)",
                deadline_seconds=None if rounds <= AUTOMATIC_REFUND_ROUNDS else NO_DEADLINE_SECONDS,
            )
            self._note("amount still unknown", f"{outcome.action.value} by {outcome.operator}; asking the provider")
            found = await self._confirm(trade_no)
            if found is not None:
                await self._confirmed(trade, found, evidence)
                return

    async def _decide_mismatch(self, trade_no: str, paid_at: Optional[datetime], evidence: str) -> None:
        outcome = await self._review(ReviewReason.AMOUNT_MISMATCH, evidence)
        self._deciding.discard(trade_no)
        captured = self._captured[trade_no]
        if outcome.action is ReviewAction.APPROVE and self._accepted is None:
            self._trade_no, self._accepted, self._base = trade_no, trade_no, PaymentStatus.SUCCEEDED
            self._paid_at = paid_at or workflow.now()
            await self._settle("accepted", f"{self._money(captured)} accepted by {outcome.operator}")
            return
        if outcome.action is ReviewAction.APPROVE:
            # The order is already paid with another trade: approving cannot keep a second charge.
            self._note("approval cannot stand", f"the order is paid with trade {self._accepted}; trade {trade_no} "
                       f"({self._money(captured)}) is a second charge and goes back")
            reason = f"duplicate charge: the order is already paid with trade {self._accepted}"
        else:
            if self._accepted is None and self._base in OPEN:
                self._base = PaymentStatus.CLOSED
            reason = f"amount mismatch, {outcome.action.value} by {outcome.operator}: {outcome.reason}"
        self._start_refund(trade_no, captured, f"review-{outcome.review_id.rsplit('-', 1)[1]}", reason,
                           outcome.operator)

    async def _settlement_review(self, trade_no: str, evidence: str) -> None:
        outcome = await self._review(ReviewReason.SETTLEMENT_MISMATCH, evidence)
        if outcome.action is ReviewAction.REFUND and self._captured.get(trade_no, 0) > self._refunded.get(trade_no, 0):
            amount = self._captured[trade_no] - self._refunding_or_refunded(trade_no)
            if amount > 0:
                self._start_refund(trade_no, amount, f"review-{outcome.review_id.rsplit('-', 1)[1]}",
                                   f"settlement mismatch, refund by {outcome.operator}: {outcome.reason}",
                                   outcome.operator)
                return
        await self._settle("settlement checked", f"{outcome.action.value} by {outcome.operator}: {outcome.reason}")

    # --- Refunds and reviews (child workflows) -----------------------------------------

    def _start_refund(self, trade_no: str, amount: int, key: str, reason: str, requested_by: str) -> RefundView:
        view = RefundView(
            refund_id=refund_id_for(self._request.order_id, key), trade_no=trade_no, amount_minor=amount,
            status=RefundStatus.PROCESSING, reason=reason, requested_by=requested_by,
        )
        self._refunds[key] = view
        self._spawn(self._run_refund(key, view, round=0), f"refund {view.refund_id}")
        return view

    async def _run_refund(self, key: str, view: RefundView, round: int) -> None:
        request, timing = self._request, self._input.timing
        await self._settle("refund started", f"{self._money(view.amount_minor)} of trade {view.trade_no}: {view.reason}")
        self._tell(NotifyKind.REFUND_STARTED, f"refund-{key}-{round}", customer_reason(view), view.amount_minor)
        result: Optional[RefundView] = None
        for attempt in range(CHILD_ATTEMPTS):
            suffix = _child_suffix(key) + (f"-again{round}" if round else "") + (f"-retry{attempt}" if attempt else "")
            child_id = refund_workflow_id(self._input.payment_id, suffix)
            try:
                result = await workflow.execute_child_workflow(
                    RefundWorkflow.run,
                    RefundInput(
                        payment_id=self._input.payment_id, provider=request.provider, order_id=request.order_id,
                        trade_no=view.trade_no, refund_id=view.refund_id, amount_minor=view.amount_minor,
                        currency=request.currency, reason=view.reason, requested_by=view.requested_by, timing=timing,
                    ),
                    id=child_id,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    static_summary=f"Refund {self._money(view.amount_minor)} of order {request.order_id}",
                )
                break
            except (ChildWorkflowError, WorkflowAlreadyStartedError) as err:
                await self._child_failed(f"refund workflow {child_id}", err)
                if attempt + 1 < CHILD_ATTEMPTS:
                    self._note("refund again", f"a new refund workflow with the same provider refund id {view.refund_id}")
        if result is None:
            result = view.model_copy(update={
                "status": RefundStatus.FAILED,
                "detail": f"its refund workflow failed {CHILD_ATTEMPTS} times; the provider may have refunded it "
                          f"(refund id {view.refund_id}): a person must check",
            })
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
            # A person decided the money stays: recorded, so the books balance on purpose.
            self._kept[view.trade_no] = self._kept.get(view.trade_no, 0) + view.amount_minor
            await self._settle("refund abandoned", f"by {outcome.operator}: {outcome.reason}; "
                               f"{self._money(view.amount_minor)} of trade {view.trade_no} stays with the merchant")

    def _refunding_or_refunded(self, trade_no: str) -> int:
        return sum(r.amount_minor for r in self._refunds.values()
                   if r.trade_no == trade_no and r.status is not RefundStatus.FAILED)

    async def _review(
        self, reason: ReviewReason, evidence: str, deadline_seconds: Optional[float] = None,
        watch: Optional[Callable[[int], Awaitable[Optional[ReviewOutcome]]]] = None,
    ) -> ReviewOutcome:
        """Open a manual review (a child workflow) and wait for its decision. A review
        workflow that fails is opened again; after CHILD_ATTEMPTS the safe default applies.
        With ``watch``, the provider is looked at on the backoff meanwhile; an outcome it
        returns settles the review."""
        timing = self._input.timing
        for attempt in range(CHILD_ATTEMPTS):
            self._reviews += 1
            review_id = review_workflow_id(self._input.payment_id, self._reviews)
            self._open_reviews[review_id] = reason.value
            self._review_reason = reason.value
            await self._settle("review opened", f"{reason.value}: {evidence}", review_reason=reason.value)
            self._tell(NotifyKind.IN_REVIEW, f"review-{self._reviews}", "the payment needs a check before we can "
                       "confirm it", sum(self._captured.values()) or self._request.amount_minor)
            try:
                handle = await workflow.start_child_workflow(
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
                self._review_handles[review_id] = handle
                decided = asyncio.create_task(_result(handle))
                if watch is not None:
                    await self._watch_review(handle, decided, watch)
                outcome: ReviewOutcome = await decided
            except (ChildWorkflowError, WorkflowAlreadyStartedError) as err:
                del self._open_reviews[review_id]
                await self._child_failed(f"review workflow {review_id}", err)
                evidence = f"{evidence} (review {review_id} failed: {_failure(err)}; opened again)"
                continue
            finally:
                self._review_handles.pop(review_id, None)
            del self._open_reviews[review_id]
            self._note("review decided", f"{outcome.action.value} by {outcome.operator}: {outcome.reason}")
            return outcome
        default = REVIEW_ACTIONS[reason][1]
        self._note("review default", f"{CHILD_ATTEMPTS} review workflows failed; the safe default "
                   f"'{default.value}' applies")
        return ReviewOutcome(review_id=review_workflow_id(self._input.payment_id, self._reviews), action=default,
                             operator="system", reason=f"{CHILD_ATTEMPTS} review workflows failed: safe default applied",
                             by_deadline=True)

    async def _watch_review(self, handle: workflow.ChildWorkflowHandle, decided: asyncio.Task,
                            watch: Callable[[int], Awaitable[Optional[ReviewOutcome]]]) -> None:
        attempt = 0
        while not decided.done():
            delay = self._backoff(attempt)
            try:
                await workflow.wait_condition(lambda: decided.done() or bool(self._inbox), timeout=delay,
                                              timeout_summary=f"look at the provider again in {delay:g}s")
            except asyncio.TimeoutError:
                attempt += 1
            if decided.done():
                return
            outcome = await watch(attempt)
            if outcome is not None and not decided.done():
                await handle.signal(ManualReviewWorkflow.settle, outcome.model_copy(update={"review_id": handle.id}))
                return

    async def _child_failed(self, what: str, err: BaseException) -> None:
        """A child workflow failed: on the timeline, and operators are alerted once per payment."""
        detail = f"{what} {_failure(err)}"
        self._note("child workflow failed", detail)
        self._alerted = True
        await self._alert_child(breach=True, detail=f"payment {self._input.payment_id} (order "
                                f"{self._request.order_id}): {detail}")

    async def _alert_child(self, breach: bool, detail: str) -> None:
        digest = hashlib.sha256(self._input.payment_id.encode()).hexdigest()[:20]
        await alert_once(IncidentInput(monitor=f"payment:{digest}", kind="child_failed", breach=breach, rate=1,
                                       threshold=0, payments=1, detail=detail),
                         "alert: a child workflow failed" if breach else "all-clear: children finished")

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
        self._spawn(self._send(notification), f"notify {kind.value}")

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

    def _spawn(self, work: Awaitable[None], what: str) -> None:
        """Run a refund, review or notification alongside the main line; the workflow
        waits for it before ending. Whatever it raises is recorded and alerted."""
        self._busy += 1

        async def run() -> None:
            try:
                await work
            except (ActivityError, ChildWorkflowError) as err:
                self._note(f"{what} failed", _failure(err))
                self._alerted = True
                await self._alert_child(breach=True, detail=f"payment {self._input.payment_id}: {what} failed: "
                                        f"{_failure(err)}")
            finally:
                self._busy -= 1

        asyncio.create_task(run())

    # --- Status -------------------------------------------------------------------------

    def _ledger(self) -> Ledger:
        refunding: dict[str, int] = {}
        for refund in self._refunds.values():
            if refund.status is RefundStatus.PROCESSING:
                refunding[refund.trade_no] = refunding.get(refund.trade_no, 0) + refund.amount_minor
        return Ledger(captured=dict(self._captured), refunded=dict(self._refunded), refunding=refunding,
                      kept=dict(self._kept), accepted=self._accepted)

    def _money_status(self) -> PaymentStatus:
        return self._ledger().status(self._base, reviews_open=bool(self._open_reviews))

    async def _settle(self, event: str, detail: str, review_reason: Optional[str] = None) -> None:
        await self._transition(self._money_status(), event, detail, review_reason)
        self._rebalance()

    def _rebalance(self) -> None:
        """Keep the invariant: money on a trade the order is not paid with goes back."""
        ledger = self._ledger()
        if ledger.balanced(reviews_open=bool(self._open_reviews)):
            return
        for trade_no, amount in ledger.excess().items():
            if trade_no in self._deciding:
                continue
            self._note("books out of balance", f"trade {trade_no} holds {self._money(amount)} the order does not "
                       "account for; returning it")
            number = sum(1 for r in self._refunds.values() if r.trade_no == trade_no)
            self._start_refund(trade_no, amount, f"excess-{trade_no}-{number}",
                               f"duplicate charge: money on trade {trade_no} the order is not paid with", "system")

    async def _transition(
        self, status: PaymentStatus, event: str, detail: str, review_reason: Optional[str] = None
    ) -> None:
        if status in (PaymentStatus.CREATED, PaymentStatus.PENDING, PaymentStatus.SUCCEEDED,
                      PaymentStatus.FAILED, PaymentStatus.CLOSED):
            self._base = status
        previous, self._status = self._status, status
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
        await self._save(event)

    async def _save(self, event: str) -> bool:
        """Write the whole snapshot; ordered by the workflow's clock, so the newest always wins."""
        self._seq = snapshot_seq(self._seq, int(workflow.now().timestamp() * 1_000_000))
        try:
            await db_call(PaymentActivities.save_payment_state, self._record(event), f"save {self._status.value}")
            self._dirty = False
            return True
        except ActivityError as err:
            self._dirty = True
            self._note("database sync failed", f"{cause(err)}; the payment writes its state again until it succeeds")
            return False

    async def _converge(self) -> None:
        """Before the workflow ends, the row must show its final state."""
        attempt = 0
        while self._dirty:
            delay = self._backoff(attempt)
            await workflow.sleep(delay, summary=f"write the payment's state again in {delay:g}s")
            attempt += 1
            await self._save("sync")

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

    # --- The refund phase (continue-as-new) --------------------------------------------

    def _refund_window_end(self) -> datetime:
        assert self._final_at is not None
        return self._final_at + timedelta(seconds=self._input.timing.refund_window_seconds)

    def _refund_window_left(self) -> float:
        if self._accepted is None:
            return 0.0
        return (self._refund_window_end() - workflow.now()).total_seconds()

    def _state(self) -> PaymentState:
        assert self._final_at is not None
        return PaymentState(
            status=self._status, base=self._base, seq=self._seq, trade_no=self._trade_no, pay_url=self._pay_url,
            reason=self._reason, review_reason=self._review_reason, paid_at=self._paid_at,
            expires_at=self._expires_at, final_at=self._final_at, captured=self._captured, refunded=self._refunded,
            kept=self._kept, accepted=self._accepted, refunds=self._refunds, reviews=self._reviews,
            told=[kind.value for kind in self._told], seen_events=sorted(self._seen_events),
            timeline=self._timeline, alerted=self._alerted,
        )

    def _restore(self, state: PaymentState) -> None:
        self._status, self._base, self._seq = state.status, state.base, state.seq
        self._trade_no, self._pay_url, self._reason = state.trade_no, state.pay_url, state.reason
        self._review_reason, self._paid_at, self._expires_at = state.review_reason, state.paid_at, state.expires_at
        self._final_at, self._captured, self._refunded = state.final_at, dict(state.captured), dict(state.refunded)
        self._kept, self._accepted, self._refunds = dict(state.kept), state.accepted, dict(state.refunds)
        self._reviews, self._told = state.reviews, {NotifyKind(kind) for kind in state.told}
        self._seen_events, self._timeline, self._alerted = set(state.seen_events), list(state.timeline), state.alerted

    # --- Provider calls --------------------------------------------------------------

    async def _query_trade(self, number: int, trade_no: Optional[str] = None) -> Optional[Trade]:
        label = f"query trade #{number}" if number else f"query trade {trade_no or ''}".strip()
        ref = self._ref("query").model_copy(update={"trade_no": trade_no})
        try:
            return await provider_call(PaymentActivities.query_trade, ref, self._input.timing, label)
        except ActivityError as err:
            self._note(f"query #{number} failed" if number else "query failed", cause(err))
            return None

    async def _close_trade(self, attempts: int) -> Optional[Trade]:
        """Close with bounded rounds of bounded retries. None when the provider never answered."""
        for number in range(1, attempts + 1):
            try:
                return await provider_call(
                    PaymentActivities.close_trade, self._ref("close"), self._input.timing, f"close trade #{number}"
                )
            except ActivityError as err:
                self._note(f"close #{number} failed", cause(err))
                if number < attempts:
                    delay = self._backoff(number - 1)
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
            created_trade_no=self._trade_no,
        )

    # --- Helpers --------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        backoff = self._input.timing.query_backoff_seconds
        return backoff[min(attempt, len(backoff) - 1)]

    async def _wait_for_callback(self, seconds: float, summary: str) -> bool:
        """True when a callback is waiting, False when ``seconds`` passed first."""
        if self._inbox or seconds <= 0:
            return bool(self._inbox)
        try:
            await workflow.wait_condition(lambda: bool(self._inbox), timeout=seconds, timeout_summary=summary)
            return True
        except asyncio.TimeoutError:
            return False

    def _seconds_left(self) -> float:
        assert self._expires_at is not None
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
