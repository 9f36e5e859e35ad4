"""``Payment``: a payment's lifecycle as of release 0.3.0, read top to bottom (what
``PaymentWorkflow`` in workflows/payment.py runs for new payments; start there).

Its messages (a callback, a bill finding, checkout, a refund), then ``run``: record the
payment and check the risk rules -> create the trade at the provider -> await the outcome
(callback, queries on the backoff) -> at the deadline, ``_expire`` -> listen for late
events for the resend window -> a paid payment continues as new into its refund phase.
The parts it inherits are listed in workflows/payment.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Optional

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.common import before_run_ends, cause, db_local, provider_local, rejection_code
from workflows.payment_children import ChildWorkflows
from workflows.payment_expiry import Expiry
from workflows.payment_results import ProviderResults

with workflow.unsafe.imports_passed_through():
    from activities.payment import PaymentActivities
    from paysentinel.models import (
        CreateTradeInput,
        PaymentInput,
        PaymentStatus,
        PaymentView,
        ProviderCallback,
        RecordPaymentInput,
        RefundCommand,
        RefundView,
        ReviewAction,
        ReviewReason,
        RiskVerdict,
        SettlementFinding,
        Trade,
        TradeStatus,
    )
    from paysentinel.projection import PAYMENT_STATUS, carried_state
    from paysentinel.rules import OPEN, RISK_HOLD, merchant_refund_key

# A refund or callback that arrives while a run is ending is finished in that run (before,
# the run could continue as new or complete with the refund it had just started left behind).
FINISH_LATE_ARRIVALS = "payment-finish-late-arrivals"

# After a review closed a payment the provider could not confirm, ask it at most this often.
UNCONFIRMED_QUERY_MAX_SECONDS = 3600.0


class Payment(Expiry, ProviderResults, ChildWorkflows):
    """The payment's lifecycle as of release 0.3.0 (what PaymentWorkflow runs for new payments).

    Its fields, status changes and provider calls are PaymentState's
    (workflows/payment_state.py); the deadline is Expiry's (workflows/payment_expiry.py);
    provider results are applied by ProviderResults (workflows/payment_results.py), refunds
    and reviews run by ChildWorkflows (workflows/payment_children.py)."""

    # --- Messages -------------------------------------------------------------------

    def callback(self, event: ProviderCallback) -> None:
        if event.event_id in self._book.seen_events:
            self._note("callback duplicate", f"event {event.event_id} already received; ignored")
            return
        self._book.seen_events.add(event.event_id)
        self._inbox.append(event)

    def settlement(self, finding: SettlementFinding) -> None:
        key = f"settlement:{finding.kind}:{finding.trade_no}:{finding.amount_minor}"
        if key in self._book.seen_events:
            self._note("settlement duplicate", f"{finding.kind} for trade {finding.trade_no} already received; ignored")
            return
        self._book.seen_events.add(key)
        if finding.kind == "missing_at_provider":
            self._note("settlement: missing at the provider", finding.detail)
            self._spawn(self._settlement_review(finding.trade_no, finding.detail), "settlement review")
            return
        self._inbox.append(
            ProviderCallback(
                event_id=key,
                provider=self._request.provider,
                order_id=finding.order_id,
                trade_no=finding.trade_no,
                trade_status=TradeStatus.TRADE_SUCCESS,
                amount_minor=finding.amount_minor,
                currency=finding.currency,
                paid_at=finding.paid_at,
                received_at=workflow.now(),
                source="settlement",
            )
        )

    async def checkout(self) -> PaymentView:
        await workflow.wait_condition(lambda: self._book.pay_url is not None or self._book.status not in OPEN)
        return self._view()

    async def refund(self, command: RefundCommand) -> RefundView:
        key = merchant_refund_key(command.key)
        if key in self._book.refunds:
            return self._book.refunds[key]
        assert self._book.accepted is not None
        return self._start_refund(self._book.accepted, command.amount_minor, key, command.reason, command.requested_by)

    def _check_refund(self, command: RefundCommand) -> None:
        refusal = self._book.refund_refusal(command, self._request.currency)
        if refusal is not None:
            raise ValueError(refusal)

    # --- Main line ------------------------------------------------------------------

    async def run(self, input: PaymentInput) -> PaymentView:
        if input.resume is not None:
            return await self._refund_phase()
        request = input.request
        self._set_expiry()
        self._note(
            "created",
            f"order {request.order_id}, {self._money(request.amount_minor)} via {request.provider}, "
            f"expires {self._book.expires_at.isoformat() if self._book.expires_at else '?'}",
        )
        verdict = await db_local(
            PaymentActivities.open_payment,
            RecordPaymentInput(payment_id=input.payment_id, request=request, expires_at=self._book.expires_at),
            "record payment, risk rules",
        )
        if await self._passes_risk_rules(verdict):
            trade = await self._create_trade()
            if trade is not None:
                self._book.trade_no, self._book.pay_url = trade.trade_no, trade.pay_url
                await self._transition(PaymentStatus.PENDING, "trade created", f"trade {trade.trade_no}; waiting for the payer")
                await self._await_outcome()
        self._book.final_at = workflow.now()
        await self._serve_late_events(workflow.now() + timedelta(seconds=input.timing.resend_window_seconds))
        if self._refund_window_left() > 0:
            self._note(
                "refund phase",
                "the resend window is over; refunds stay possible until "
                f"{self._refund_window_end().isoformat()} on the current release",
            )
            await self._end_run()
            workflow.continue_as_new(input.model_copy(update={"resume": carried_state(self._book)}))
        return await self._complete()

    async def _refund_phase(self) -> PaymentView:
        """A paid payment after its resend window: refunds (and late events) until the refund window ends."""
        workflow.upsert_search_attributes([PAYMENT_STATUS.value_set(self._book.status.value)])
        await self._serve_late_events(self._refund_window_end())
        return await self._complete()

    async def _complete(self) -> PaymentView:
        await self._converge()
        if self._book.alerted:
            await self._alert_child(breach=False, detail="all child workflows of the payment have finished")
        self._note("completed", f"final status {self._book.status.value}")
        await self._end_run()
        return self._view()

    def _quiet(self) -> bool:
        return workflow.all_handlers_finished() and self._busy == 0 and not self._inbox

    async def _end_run(self) -> None:
        """Right before the run completes or continues as new. A refund or a callback can
        arrive while it ends (``before_run_ends`` may wait on a timer): it is finished in this
        run, never left behind in it."""
        await workflow.wait_condition(workflow.all_handlers_finished)
        await before_run_ends()
        while not self._quiet() and workflow.patched(FINISH_LATE_ARRIVALS):
            await workflow.wait_condition(lambda: bool(self._inbox) or self._quiet())
            await self._process_inbox()
            await before_run_ends()

    def _set_expiry(self) -> None:
        ttl = self._request.expires_in_seconds or self._input.timing.payment_ttl_seconds
        self._book.expires_at = workflow.now() + timedelta(seconds=ttl)

    async def _passes_risk_rules(self, verdict: RiskVerdict) -> bool:
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
                return await provider_local(
                    PaymentActivities.create_trade,
                    CreateTradeInput(
                        provider=request.provider,
                        order_id=request.order_id,
                        amount_minor=request.amount_minor,
                        currency=request.currency,
                        subject=request.subject,
                        notify_url=self._input.notify_url,
                        expires_at=self._book.expires_at,
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
                    await self._transition(PaymentStatus.FAILED, "create rejected", f"provider rejected the trade: {cause(err)}")
                    return None
                break
        # Retries exhausted: the provider may still have created the trade. Close it so
        # nobody can pay it; only then is "failed, no money moved" true.
        self._note("create failed", "provider unavailable after bounded retries; closing the order at the provider")
        closed = await self._close_trade(attempts=1)
        if closed is not None:
            await self._apply_trade(closed, "close after failed create")
        if self._book.status in OPEN and not self._book.captured:
            await self._transition(
                PaymentStatus.FAILED, "create failed", "the provider did not answer within the retry limit; no money moved"
            )
        return None

    async def _await_outcome(self) -> None:
        timing = self._input.timing
        await self._wait_for_callback(min(timing.callback_timeout_seconds, self._seconds_left()), "callback timeout")
        await self._process_inbox()
        attempt = 0
        while True:
            if self._book.deciding and not self._book.captured:
                # A claimed payment is being confirmed with the provider: wait for its answer.
                await workflow.wait_condition(lambda: not self._book.deciding or bool(self._book.captured))
                await self._process_inbox()
                continue
            if not self._book.undecided() or self._seconds_left() <= 0:
                break
            trade = await self._query_trade(attempt + 1)
            if trade is not None:
                await self._apply_trade(trade, f"query #{attempt + 1}")
            if not self._book.undecided():
                break
            delay = self._backoff(attempt)
            attempt += 1
            await self._wait_for_callback(min(delay, self._seconds_left()), f"next query in {delay:g}s")
            await self._process_inbox()
        if self._book.undecided():
            await self._expire()

    async def _serve_late_events(self, listen_end: datetime) -> None:
        """Providers resend callbacks for hours; until ``listen_end`` late events are applied.
        A payment closed without the provider's confirmation keeps asking it on the backoff."""
        self._note("listening", f"for late callbacks until {listen_end.isoformat()}")
        attempt = 0
        while True:
            left = (listen_end - workflow.now()).total_seconds()
            if left <= 0 and self._busy == 0 and not self._inbox:
                break
            if left > 0 and self._book.unconfirmed:
                delay = min(self._backoff(attempt), UNCONFIRMED_QUERY_MAX_SECONDS)
                if not await self._wait_for_callback(min(left, delay), f"close at the provider again in {delay:g}s"):
                    attempt += 1
                    await self._close_unconfirmed(attempt)
            elif left > 0:
                await self._wait_for_callback(left, "late-callback window")
            else:  # the window is over; let running refunds and reviews finish
                await workflow.wait_condition(lambda: bool(self._inbox) or self._busy == 0)
            await self._process_inbox()
