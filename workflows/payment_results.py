"""What a provider's answer does to a payment: a callback, a bill finding, a query or a
close is read with the money rules (paysentinel/rules.py) and applied: the payment is
paid, closed or unchanged; a claimed amount is confirmed with the provider before it
counts; a wrong amount goes to a review; a second charge or a payment after close is
refunded.

``ProviderResults`` is a part of ``Payment``, the 0.3.0 main line in
workflows/payment_lifecycle.py (start there): Payment inherits it, and the main line calls
``_process_inbox`` (callbacks and bill findings waiting) and ``_apply_trade`` (a query's
or a close's answer). The reviews and refunds it calls for run as child workflows, in
workflows/payment_children.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from temporalio import workflow

from workflows.payment_children import AUTOMATIC_REFUND_ROUNDS, NO_DEADLINE_SECONDS
from workflows.payment_state import PaymentState

with workflow.unsafe.imports_passed_through():
    from paysentinel.models import (
        PaymentStatus,
        ReviewAction,
        ReviewReason,
        Trade,
    )
    from paysentinel.rules import (
        OPEN,
        Disposition,
        Meaning,
        confirms,
        mismatch_evidence,
        review_number,
        settlement_evidence,
    )

# How often the provider is asked to confirm a claimed amount before a person is asked.
CONFIRM_ROUNDS = 3


class ProviderResults(PaymentState):
    """Applies provider results (callbacks, bill findings, queries, closes) to a payment."""

    async def _process_inbox(self) -> None:
        while self._inbox:
            event = self._inbox.pop(0)
            self._note(
                event.source,
                f"{event.trade_status.value} for trade {event.trade_no}, "
                f"{self._money(event.amount_minor, event.currency)} (event {event.event_id})",
            )
            self._book.callback_at = event.received_at
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
            self._book.callback_at = None

    async def _apply_trade(self, trade: Trade, source: str) -> None:
        """Act on what a provider result means for this payment (paysentinel/rules.py); never move backwards."""
        request, trade_no = self._request, trade.trade_no or ""
        meaning = self._book.meaning(trade, source, request.amount_minor, request.currency)
        if meaning is Meaning.NO_TRADE:
            self._note(f"{source}: no trade", "the provider has no trade for this order yet")
        elif meaning is Meaning.CLOSED:
            await self._transition(PaymentStatus.CLOSED, "closed", f"closed at the provider ({source}); nothing was paid")
        elif meaning is Meaning.NO_CHANGE:
            assert trade.status is not None
            self._note(f"{source}: no change", f"provider reports {trade.status.value}; payment stays {self._book.status.value}")
        elif meaning is Meaning.SETTLEMENT_DIFFERS:
            evidence = settlement_evidence(trade, self._book.captured[trade_no], request.currency)
            self._spawn(self._settlement_review(trade_no, evidence), "settlement review")
        elif meaning is Meaning.ALREADY_PAID:
            self._note(f"{source}: no change", f"trade {trade_no} is already recorded as paid")
        elif meaning is Meaning.PAID:
            self._book.captured[trade_no] = trade.amount_minor or 0
            await self._accept_or_return(trade_no, trade.paid_at, source)
        else:
            evidence = mismatch_evidence(source, trade, request.amount_minor, request.currency)
            self._book.deciding.add(trade_no)
            if meaning is Meaning.AMOUNT_DIFFERS:
                self._book.captured[trade_no] = trade.amount_minor or 0
                self._spawn(self._decide_mismatch(trade_no, trade.paid_at, evidence), "amount mismatch review")
                return
            # A callback's amount is a claim: only the provider's own answer says what it took.
            found = await self._confirm(trade_no)
            if found is None:
                self._spawn(self._amount_unknown(trade, evidence), "amount check")
                return
            await self._confirmed(trade, found, evidence)

    async def _confirmed(self, claim: Trade, found: Trade, evidence: str) -> None:
        """The provider answered about a claimed trade: what it says is what was taken."""
        request, trade_no = self._request, claim.trade_no or ""
        if not confirms(found, trade_no):
            self._book.deciding.discard(trade_no)
            self._note(
                "claim not confirmed",
                f"{evidence}; the provider reports {found.status.value if found.status else 'no such trade'}: nothing captured",
            )
            return
        self._book.captured[trade_no] = found.amount_minor or 0
        if found.amount_minor == request.amount_minor and found.currency == request.currency:
            self._book.deciding.discard(trade_no)
            self._note(
                "amount confirmed", f"{evidence}; the provider took {self._money(found.amount_minor or 0)}, the order amount"
            )
            await self._accept_or_return(trade_no, found.paid_at or claim.paid_at, "query")
            return
        evidence += f"; the provider's query says {self._money(found.amount_minor or 0, found.currency)}"
        self._spawn(self._decide_mismatch(trade_no, found.paid_at or claim.paid_at, evidence), "amount mismatch review")

    async def _accept_or_return(self, trade_no: str, paid_at: Optional[datetime], source: str) -> None:
        """A confirmed capture of the right amount: the order's payment, or money to give back."""
        book = self._book
        disposition = book.disposition()
        if disposition is Disposition.ACCEPT:
            book.accept(trade_no, paid_at or workflow.now())
            await self._settle("paid", f"confirmed by {source}, trade {trade_no}")
        elif disposition is Disposition.DUPLICATE:
            self._note("duplicate charge", f"second paid trade {trade_no} for the order (paid with {book.accepted})")
            self._start_refund(
                trade_no,
                book.captured[trade_no],
                f"dup-{trade_no}",
                f"duplicate charge: the order is already paid with trade {book.accepted}",
                "system",
            )
        else:
            self._note("paid after close", f"{source} reports trade {trade_no} paid after the payment was {book.base.value}")
            self._start_refund(
                trade_no, book.captured[trade_no], f"late-{trade_no}", f"paid after the payment was {book.base.value}", "system"
            )

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
        self._book.deciding.discard(trade_no)
        captured = self._book.captured[trade_no]
        if outcome.action is ReviewAction.APPROVE and self._book.accepted is None:
            self._book.accept(trade_no, paid_at or workflow.now())
            await self._settle("accepted", f"{self._money(captured)} accepted by {outcome.operator}")
            return
        if outcome.action is ReviewAction.APPROVE:
            # The order is already paid with another trade: approving cannot keep a second charge.
            self._note(
                "approval cannot stand",
                f"the order is paid with trade {self._book.accepted}; trade {trade_no} "
                f"({self._money(captured)}) is a second charge and goes back",
            )
            reason = f"duplicate charge: the order is already paid with trade {self._book.accepted}"
        else:
            if self._book.accepted is None and self._book.base in OPEN:
                self._book.base = PaymentStatus.CLOSED
            reason = f"amount mismatch, {outcome.action.value} by {outcome.operator}: {outcome.reason}"
        self._start_refund(trade_no, captured, f"review-{review_number(outcome.review_id)}", reason, outcome.operator)
