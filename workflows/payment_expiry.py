"""The end of a payment's time to live with no answer: close the trade at the provider
before declaring the payment unpaid. A close that reveals a payment means it was paid; a
provider that cannot say opens a status_unknown review, during which the provider is still
asked (an answer settles the review). A payment a person closed without the provider's
confirmation keeps closing the trade there (``_close_unconfirmed``, from the main line's
late-event window) until the provider confirms.

``Expiry`` is a part of ``Payment``, the 0.3.0 main line in workflows/payment_lifecycle.py
(start there): the main line calls ``_expire`` when the payment is still undecided at its
deadline.
"""

from __future__ import annotations

from typing import Optional

from temporalio import workflow

from workflows.payment_state import PaymentState

with workflow.unsafe.imports_passed_through():
    from paysentinel.models import PaymentStatus, ReviewAction, ReviewOutcome, ReviewReason, TradeStatus
    from paysentinel.rules import status_unknown_evidence


class Expiry(PaymentState):
    """Closing an unpaid payment at its deadline, and a review when the provider cannot say."""

    async def _expire(self) -> None:
        """Time to live is over: close at the provider before declaring the payment unpaid."""
        self._note("expired", "time to live ended; closing the trade at the provider")
        trade = await self._close_trade(attempts=self._input.timing.close_attempts)
        await self._process_inbox()
        if not self._book.undecided():
            return
        if trade is not None and not trade.exists:
            await self._transition(PaymentStatus.CLOSED, "closed", "the provider has no such trade; nothing was paid")
            return
        if trade is not None:
            await self._apply_trade(trade, "close")
            if not self._book.undecided():
                return
        evidence = status_unknown_evidence(trade)
        # While a person looks, keep asking the provider and applying callbacks: a payment
        # the provider confirms settles the review as paid (the payer paid in time).
        outcome = await self._review(ReviewReason.STATUS_UNKNOWN, evidence, watch=self._watch_status)
        if self._book.accepted is not None or not self._book.undecided():
            await self._settle("review settled", f"the provider answered while the review was open: {outcome.reason}")
            return
        if outcome.action is ReviewAction.MARK_PAID and self._book.trade_no:
            self._book.captured[self._book.trade_no] = self._request.amount_minor
            self._book.accept(self._book.trade_no, workflow.now())
            await self._settle("marked paid", f"by {outcome.operator}: {outcome.reason}")
        else:
            self._book.base = PaymentStatus.CLOSED
            self._book.unconfirmed = trade is None
            await self._settle("closed", f"by {outcome.operator}: {outcome.reason}")

    async def _watch_status(self, attempt: int) -> Optional[ReviewOutcome]:
        """One look at the provider while a status_unknown review is open; an outcome settles it."""
        await self._process_inbox()
        if self._book.undecided():
            trade = await self._query_trade(attempt + 1)
            if trade is not None:
                await self._apply_trade(trade, f"query during review #{attempt + 1}")
        if self._book.accepted is not None:
            return ReviewOutcome(
                review_id="",
                action=ReviewAction.MARK_PAID,
                operator="system",
                reason=f"the provider confirmed trade {self._book.accepted} paid",
            )
        if not self._book.undecided():
            return ReviewOutcome(
                review_id="",
                action=ReviewAction.REJECT,
                operator="system",
                reason="the provider confirmed the trade closed, nothing paid",
            )
        return None

    async def _close_unconfirmed(self, attempt: int) -> None:
        """A review closed the payment while the provider was unreachable: close the trade
        there too, and learn whether money was taken (a close that reveals a payment)."""
        trade = await self._close_trade(attempts=1)
        if trade is None:
            return
        if trade.exists and trade.status is not None and trade.status.is_paid:
            self._book.unconfirmed = False
            await self._apply_trade(trade, f"close after review #{attempt}")
        elif not trade.exists or trade.status is TradeStatus.TRADE_CLOSED:
            self._book.unconfirmed = False
            self._note(
                "provider confirmed",
                f"the provider reports {trade.status.value if trade.status else 'no trade'}; nothing was paid",
            )
