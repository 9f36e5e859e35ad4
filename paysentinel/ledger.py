"""A payment's money, per provider trade: pure rules the payment workflow keeps.

For every trade of an order the provider captured money on:

    captured − refunded − refunding − kept  =  the accepted amount (the trade the order
                                               is paid with), or 0 (any other trade)

``kept`` is money an operator explicitly decided to leave with the merchant (a failed
refund given up on). While a review is open a person is deciding, so the books may be
out of balance; otherwise every difference is money to return (``excess``). These rules
have no Temporal in them: the workflow asks them, and unit tests pin them down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

from paysentinel.models import PaymentStatus


@dataclass
class Ledger:
    captured: dict[str, int] = field(default_factory=dict)  # trade -> what the provider took
    refunded: dict[str, int] = field(default_factory=dict)  # trade -> refunds that succeeded
    refunding: dict[str, int] = field(default_factory=dict)  # trade -> refunds still processing
    kept: dict[str, int] = field(default_factory=dict)  # trade -> left with the merchant by a person
    accepted: Optional[str] = None  # the trade the order is paid with

    def outstanding(self, trade: str) -> int:
        """What this trade still holds that nobody is returning or decided to keep."""
        return self.captured.get(trade, 0) - self.refunded.get(trade, 0) - self.refunding.get(trade, 0) - self.kept.get(trade, 0)

    def excess(self) -> dict[str, int]:
        """Money captured on trades the order is not paid with and not yet being returned."""
        return {trade: left for trade in self.captured if trade != self.accepted and (left := self.outstanding(trade)) > 0}

    def refundable(self) -> int:
        """What a merchant may still refund of the accepted trade."""
        if self.accepted is None:
            return 0
        return max(0, self.outstanding(self.accepted))

    def balanced(self, reviews_open: bool) -> bool:
        """The invariant: no money is held that the order does not account for."""
        return reviews_open or not self.excess()

    def status(self, base: PaymentStatus, reviews_open: bool) -> PaymentStatus:
        """The status the money says: reviews first, then refunds, then the accepted charge."""
        if reviews_open:
            return PaymentStatus.IN_REVIEW
        if any(self.refunding.values()):
            return PaymentStatus.REFUNDING
        if self.accepted is not None:
            refunded = self.refunded.get(self.accepted, 0)
            if refunded == 0:
                return PaymentStatus.SUCCEEDED
            return PaymentStatus.REFUNDED if refunded >= self.captured[self.accepted] else PaymentStatus.PARTIALLY_REFUNDED
        if self.captured and all(self.refunded.get(t, 0) >= a for t, a in self.captured.items()):
            return PaymentStatus.REFUNDED
        return base


def snapshot_seq(previous: int, now_microseconds: int) -> int:
    """The order of a payment's database snapshots: the workflow's clock, then a counter.

    It grows within a run, across continue-as-new (the previous value is carried) and
    across a workflow reset (the new run's clock is later than any write before it).
    """
    return max(previous + 1, now_microseconds * 1000)


def retry_budget(initial: timedelta, coefficient: float, maximum: timedelta, attempts: int) -> timedelta:
    """How long a retry policy keeps trying before it gives up (attempts=0: forever)."""
    if attempts == 0:
        return timedelta.max
    total, interval = timedelta(), initial
    for _ in range(attempts - 1):
        total += interval
        interval = min(maximum, interval * coefficient)
    return total
