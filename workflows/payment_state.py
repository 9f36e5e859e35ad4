"""What every part of a payment shares: its fields, the timeline, the status and the
provider calls the main line, the provider results and the children all use.

``PaymentState`` is the base of ``Payment``, the 0.3.0 main line in
workflows/payment_lifecycle.py (start there). A status change goes through
``_transition``: the book (paysentinel/rules.py) takes the new status, the timeline and
the search attributes show it, the customer and the merchant are told where the rules say
so, and the row is written (a local activity). A write that fails marks the book dirty;
``_converge`` writes it again before the run ends. The provider calls (query, close) are
local activities with bounded retries (workflows/common.py); a call that never succeeds
returns None and is noted, never raised.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.common import cause, db_local, provider_local

with workflow.unsafe.imports_passed_through():
    from activities.payment import PaymentActivities
    from paysentinel.ledger import snapshot_seq
    from paysentinel.models import (
        NotifyKind,
        PaymentInput,
        PaymentStatus,
        PaymentView,
        ProviderCallback,
        RefundView,
        ReviewOutcome,
        ReviewReason,
        TimelineEntry,
        Trade,
        TradeRef,
    )
    from paysentinel.projection import payment_record, payment_view, restored_book, status_attributes
    from paysentinel.rules import PaymentBook, money


class PaymentState:
    """A payment's fields, timeline, status changes and provider calls (see the module docstring)."""

    def __init__(self, input: PaymentInput) -> None:
        self._input = input
        self._request = input.request
        # What the payment knows (the money, the refunds, the timeline): see paysentinel/rules.py.
        self._book = PaymentBook() if input.resume is None else restored_book(input.resume)
        self._inbox: list[ProviderCallback] = []  # callbacks and bill findings not yet applied
        self._review_handles: dict[str, workflow.ChildWorkflowHandle] = {}
        self._busy = 0  # refunds, reviews and notifications still running

    if TYPE_CHECKING:
        # The parts Payment inherits call each other through these (declared once, here).
        # From ChildWorkflows (workflows/payment_children.py): reviews, refunds, work alongside.
        def _tell(self, kind: NotifyKind, key: str, detail: str, amount_minor: int) -> None: ...
        def _start_refund(self, trade_no: str, amount: int, key: str, reason: str, requested_by: str) -> RefundView: ...
        async def _review(
            self,
            reason: ReviewReason,
            evidence: str,
            deadline_seconds: Optional[float] = None,
            watch: Optional[Callable[[int], Awaitable[Optional[ReviewOutcome]]]] = None,
        ) -> ReviewOutcome: ...
        async def _settlement_review(self, trade_no: str, evidence: str) -> None: ...
        def _spawn(self, work: Awaitable[None], what: str) -> None: ...

        # From ProviderResults (workflows/payment_results.py): a provider's answers applied.
        async def _process_inbox(self) -> None: ...
        async def _apply_trade(self, trade: Trade, source: str) -> None: ...

    # --- Status -------------------------------------------------------------------------

    async def _settle(self, event: str, detail: str, review_reason: Optional[str] = None) -> None:
        await self._transition(self._book.money_status(), event, detail, review_reason)
        self._rebalance()

    def _rebalance(self) -> None:
        """Keep the invariant: money on a trade the order is not paid with goes back."""
        for trade_no, amount in self._book.excess().items():
            self._note(
                "books out of balance",
                f"trade {trade_no} holds {self._money(amount)} the order does not account for; returning it",
            )
            number = self._book.refunds_of(trade_no)
            self._start_refund(
                trade_no,
                amount,
                f"excess-{trade_no}-{number}",
                f"duplicate charge: money on trade {trade_no} the order is not paid with",
                "system",
            )

    async def _transition(self, status: PaymentStatus, event: str, detail: str, review_reason: Optional[str] = None) -> None:
        previous = self._book.apply_status(status, detail, review_reason)
        self._note(event, f"-> {status.value}: {detail}")
        workflow.upsert_search_attributes(status_attributes(status, review_reason))
        tell = self._book.to_tell(previous)
        if tell is not None:
            kind, words = tell
            self._book.told.add(kind)
            self._tell(kind, kind.value, words, self._request.amount_minor)
        await self._save(event)

    async def _save(self, event: str) -> bool:
        """Write the whole snapshot; ordered by the workflow's clock, so the newest always wins."""
        self._book.seq = snapshot_seq(self._book.seq, int(workflow.now().timestamp() * 1_000_000))
        try:
            record = payment_record(self._book, self._input.payment_id, event)
            await db_local(PaymentActivities.save_payment_state, record, f"save {self._book.status.value}")
            self._book.dirty = False
            return True
        except ActivityError as err:
            self._book.dirty = True
            self._note("database sync failed", f"{cause(err)}; the payment writes its state again until it succeeds")
            return False

    async def _converge(self) -> None:
        """Before the workflow ends, the row must show its final state."""
        attempt = 0
        while self._book.dirty:
            delay = self._backoff(attempt)
            await workflow.sleep(delay, summary=f"write the payment's state again in {delay:g}s")
            attempt += 1
            await self._save("sync")

    # --- The refund phase (continue-as-new) --------------------------------------------

    def _refund_window_end(self) -> datetime:
        assert self._book.final_at is not None
        return self._book.final_at + timedelta(seconds=self._input.timing.refund_window_seconds)

    def _refund_window_left(self) -> float:
        if self._book.accepted is None:
            return 0.0
        return (self._refund_window_end() - workflow.now()).total_seconds()

    # --- Provider calls --------------------------------------------------------------

    async def _query_trade(self, number: int, trade_no: Optional[str] = None) -> Optional[Trade]:
        label = f"query trade #{number}" if number else f"query trade {trade_no or ''}".strip()
        ref = self._ref("query").model_copy(update={"trade_no": trade_no})
        try:
            return await provider_local(PaymentActivities.query_trade, ref, self._input.timing, label)
        except ActivityError as err:
            self._note(f"query #{number} failed" if number else "query failed", cause(err))
            return None

    async def _close_trade(self, attempts: int) -> Optional[Trade]:
        """Close with bounded rounds of bounded retries. None when the provider never answered."""
        for number in range(1, attempts + 1):
            try:
                return await provider_local(
                    PaymentActivities.close_trade, self._ref("close"), self._input.timing, f"close trade #{number}"
                )
            except ActivityError as err:
                self._note(f"close #{number} failed", cause(err))
                if number < attempts:
                    delay = self._backoff(number - 1)
                    await self._wait_for_callback(delay, f"retry close in {delay:g}s")
                    await self._process_inbox()
                    if not self._book.undecided():
                        return None
        return None

    def _ref(self, purpose: str) -> TradeRef:
        return TradeRef(
            provider=self._request.provider,
            order_id=self._request.order_id,
            idempotency_key=f"{workflow.info().workflow_id}:{purpose}",
            created_trade_no=self._book.trade_no,
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
        assert self._book.expires_at is not None
        return max(0.0, (self._book.expires_at - workflow.now()).total_seconds())

    def _money(self, amount_minor: int, currency: Optional[str] = None) -> str:
        return money(amount_minor, currency or self._request.currency)

    def _note(self, event: str, detail: str = "") -> None:
        self._book.timeline.append(TimelineEntry(at=workflow.now(), event=event, detail=detail))
        workflow.logger.info("%s: %s %s", self._input.payment_id, event, detail)

    def _view(self) -> PaymentView:
        return payment_view(self._book, self._input.payment_id, self._request)
