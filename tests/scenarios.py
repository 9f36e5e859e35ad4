"""One payment through each branch of PaymentWorkflow, on the running system.

Each branch scripts the simulator, starts a payment through the checkout API, makes the
decisions a person would make through the operator API (or lets a review's deadline pass),
and says what the payment must end as: its status, how many refunds succeeded, how many
reviews were decided, and which child workflows it started. ``settled`` tells when a
branch is over, so its history covers everything the branch does.

Used by tests/test_replay.py to record a release's histories and replay them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import httpx
from temporalio.client import Client, WorkflowHistory

from paysentinel.models import PaymentView, RefundStatus, SettlementFinding
from tests.conftest import new_order
from tests.helpers import provider_order, script, sim_trade, start_payment, wait_for, wait_status

AMOUNT = 9990  # start_payment's default amount, minor units
FINAL = ("SUCCEEDED", "FAILED", "CLOSED", "REFUNDED", "PARTIALLY_REFUNDED")
CHILD_KINDS = {"RefundWorkflow": "refund", "ManualReviewWorkflow": "review"}


@dataclass
class Parts:
    """What a branch drives: the checkout API, the simulator, the operator API, Temporal."""

    api: httpx.AsyncClient
    sim: httpx.AsyncClient
    operator: httpx.AsyncClient  # with an operator's bearer token
    client: Client
    started: dict[str, str] = field(default_factory=dict)  # branch -> payment id, once started


@dataclass
class Branch:
    name: str
    drive: Callable[[Parts], Awaitable[str]]  # returns the payment id once its part is done
    status: str  # the payment's status when the branch is over
    refunds: int = 0  # refunds that succeeded
    reviews: int = 0  # reviews decided
    children: dict[str, int] = field(default_factory=dict)  # "refund"/"review" -> child workflows started
    also: Optional[Callable[[PaymentView], bool]] = None  # anything else the branch must show
    timeout: float = 60

    def over(self, view: PaymentView) -> bool:
        events = [e.event for e in view.timeline]
        return (
            view.status.value == self.status
            and "listening" in events  # the main line is done; it listens for late callbacks
            and view.review_id is None  # no review open
            and all(r.status is not RefundStatus.PROCESSING for r in view.refunds)
            and sum(r.status is RefundStatus.SUCCEEDED for r in view.refunds) == self.refunds
            and events.count("review decided") == self.reviews
            and (self.also is None or self.also(view))
        )


async def payment_view(client: Client, payment_id: str) -> PaymentView:
    return await client.get_workflow_handle(payment_id).query("view", result_type=PaymentView)


def describe(view: Optional[PaymentView]) -> str:
    if view is None:
        return "no view"
    return (
        f"status {view.status.value}, review {view.review_id}, refunds "
        f"{[(r.amount_minor, r.status.value) for r in view.refunds]}, timeline "
        f"{[(e.event, e.detail[:100]) for e in view.timeline]}"
    )


async def settled(client: Client, branch: Branch, payment_id: str) -> PaymentView:
    """Wait until the branch is over; on timeout say what the payment shows instead."""
    deadline = time.monotonic() + branch.timeout
    view: Optional[PaymentView] = None
    while time.monotonic() < deadline:
        view = await payment_view(client, payment_id)
        if branch.over(view):
            # Let the late-callback window pass, so what the payment does after it is recorded too.
            if (end := _listening_until(view)) is not None:
                await asyncio.sleep(max(0.0, (end - datetime.now(timezone.utc)).total_seconds()) + 1.5)
            return view
        await asyncio.sleep(0.25)
    raise AssertionError(
        f"not over in {branch.timeout:g}s: expected {branch.status} with {branch.refunds} "
        f"refund(s) and {branch.reviews} review(s); {describe(view)}"
    )


async def runs(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """The histories of every run of the workflow, first to latest (a run may continue as new)."""
    latest = await client.get_workflow_handle(workflow_id).fetch_history()
    run_id = latest.events[0].workflow_execution_started_event_attributes.first_execution_run_id or latest.run_id
    chain: list[WorkflowHistory] = []
    while run_id:
        history = (
            latest if run_id == latest.run_id else (await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history())
        )
        chain.append(history)
        last = history.events[-1]
        run_id = (
            last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
            if last.HasField("workflow_execution_continued_as_new_event_attributes")
            else ""
        )
    return chain


async def children(client: Client, payment_id: str) -> list[tuple[str, str, str]]:
    """(kind, workflow id, run id) of the child workflows the payment started, in order, over all its runs."""
    found = []
    for history in await runs(client, payment_id):
        for event in history.events:
            if event.HasField("child_workflow_execution_started_event_attributes"):
                started = event.child_workflow_execution_started_event_attributes
                kind = CHILD_KINDS.get(started.workflow_type.name, started.workflow_type.name)
                found.append((kind, started.workflow_execution.workflow_id, started.workflow_execution.run_id))
    return found


def run_file_names(branch: str, count: int) -> list[str]:
    """``<branch>.json`` for the first run, ``<branch>.continued.json`` (``.continued.2.json``, ...)
    for the runs it continued as new into."""
    return [f"{branch}.json"] + [
        f"{branch}.continued.json" if n == 1 else f"{branch}.continued.{n}.json" for n in range(1, count)
    ]


def child_file_names(branch: str, kinds: list[str]) -> list[str]:
    """``<branch>.refund.json``, ``<branch>.refund.2.json``, ... in the order they started."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"{branch}.{kind}.json" if seen[kind] == 1 else f"{branch}.{kind}.{seen[kind]}.json")
    return names


def workflow_type(history: WorkflowHistory) -> str:
    return history.events[0].workflow_execution_started_event_attributes.workflow_type.name


# --- Steps -------------------------------------------------------------------------------


async def _start(parts: Parts, name: str, expires_in_seconds: Optional[float] = None, **behaviour) -> tuple[str, str]:
    order = new_order(f"rec-{name.replace('_', '-')}")
    await script(parts.sim, order, **behaviour)
    extra = {"expires_in_seconds": expires_in_seconds} if expires_in_seconds else {}
    response = await start_payment(parts.api, order, **extra)
    assert response.status_code in (200, 201), response.text
    parts.started[name] = response.json()["payment_id"]
    return order, parts.started[name]


async def _open_review(parts: Parts, order: str) -> dict:
    async def found():
        # Operators know the internal order number: <merchant>-<order>.
        reviews = (await parts.operator.get("/operator/reviews", params={"order_id": provider_order(order)})).json()
        return reviews[0] if reviews else None

    return await wait_for(found, timeout=30, what=f"an open review for {order}")


async def _decide(parts: Parts, order: str, action: str, reason: str, reason_is: Optional[str] = None) -> None:
    review = await _open_review(parts, order)
    if reason_is is not None:
        assert review["reason"] == reason_is, review
    decided = await parts.operator.post(
        f"/operator/reviews/{review['review_id']}/decision", json={"action": action, "reason": reason}
    )
    assert decided.status_code == 200, decided.text


async def _refund(parts: Parts, payment_id: str, key: str, amount: int) -> None:
    response = await parts.api.post(
        f"/payments/{payment_id}/refunds",
        headers={"Idempotency-Key": key},
        json={"amount_minor": amount, "reason": "customer returned the goods"},
    )
    assert response.status_code == 202, response.text


def _events(view: PaymentView, name: str) -> list[str]:
    return [e.detail for e in view.timeline if e.event == name]


def _listening_until(view: PaymentView) -> Optional[datetime]:
    """When the first late-callback window ends ("listening | for late callbacks until <time>")."""
    for detail in _events(view, "listening"):
        if detail.startswith("for late callbacks until "):
            try:
                return datetime.fromisoformat(detail.removeprefix("for late callbacks until ").strip())
            except ValueError:
                return None
    return None


# --- The branches ---------------------------------------------------------------------------


async def paid(parts: Parts) -> str:
    return (await _start(parts, "paid", pay="immediately"))[1]


async def lost(parts: Parts) -> str:
    return (await _start(parts, "lost", pay="immediately", callback="drop"))[1]


async def late(parts: Parts) -> str:
    # The callback comes 4 s late: the first query (after the 1.5 s callback timeout) settles it.
    return (await _start(parts, "late", pay="immediately", callback="delay", callback_delay_seconds=4))[1]


async def never(parts: Parts) -> str:
    return (await _start(parts, "never", expires_in_seconds=5, pay="never"))[1]


async def down(parts: Parts) -> str:
    return (await _start(parts, "down", faults={"create": {"mode": "error", "times": -1}}))[1]


async def twice(parts: Parts) -> str:
    return (await _start(parts, "twice", pay="immediately", second_charge=True, second_charge_delay_seconds=0.3))[1]


async def paid_after_close(parts: Parts) -> str:
    return (
        await _start(
            parts, "paid_after_close", expires_in_seconds=5, pay="never", after_close="pay", after_close_delay_seconds=0.3
        )
    )[1]


async def mismatch_approved(parts: Parts) -> str:
    order, payment_id = await _start(parts, "mismatch_approved", pay="immediately", paid_amount="0.01")
    await _decide(parts, order, "approve", "customer paid the difference", reason_is="amount_mismatch")
    return payment_id


async def mismatch_rejected(parts: Parts) -> str:
    order, payment_id = await _start(parts, "mismatch_rejected", pay="immediately", paid_amount="0.01")
    await _decide(parts, order, "reject", "amount tampered, give the money back", reason_is="amount_mismatch")
    return payment_id


async def refund_retried(parts: Parts) -> str:
    order, payment_id = await _start(parts, "refund_retried", pay="immediately", refund="fail", refund_fail_times=-1)
    await wait_status(parts.api, payment_id, "SUCCEEDED")
    await _refund(parts, payment_id, "ret-1", AMOUNT)
    review = await _open_review(parts, order)  # every submission failed
    assert review["reason"] == "refund_failed", review
    await script(parts.sim, order, pay="immediately")  # the merchant topped up the balance
    await _decide(parts, order, "refund", "balance topped up, retry")
    return payment_id


async def status_unknown(parts: Parts) -> str:
    # Nobody pays, and at the end of the payment's time the provider cannot be reached to close it.
    order, payment_id = await _start(
        parts, "status_unknown", expires_in_seconds=5, pay="never", faults={"close": {"mode": "error", "times": -1}}
    )
    await _decide(parts, order, "reject", "the payer confirms they did not pay", reason_is="status_unknown")
    return payment_id


async def risk_rule(parts: Parts) -> str:
    # The same device tries three different amounts: the third payment goes to review first.
    device = f"dev-{new_order('risk')}"
    for amount in (100, 200):
        order = new_order("rec-risk-probe")
        await script(parts.sim, order, pay="never")
        response = await start_payment(parts.api, order, amount_minor=amount, device_id=device, expires_in_seconds=5)
        assert response.status_code == 201, response.text
    order = new_order("rec-risk-rule")
    await script(parts.sim, order, pay="immediately")
    response = await start_payment(parts.api, order, amount_minor=AMOUNT, device_id=device)
    assert response.status_code == 201, response.text
    parts.started["risk_rule"] = response.json()["payment_id"]
    await _decide(parts, order, "approve", "known customer, called them", reason_is="risk_rule")
    return response.json()["payment_id"]


async def provider_risk(parts: Parts) -> str:
    order, payment_id = await _start(parts, "provider_risk", pay="immediately", risk_hold=True)
    await _open_review(parts, order)
    await script(parts.sim, order, pay="immediately")  # the provider released its hold
    await _decide(parts, order, "approve", "provider released the hold", reason_is="provider_risk")
    return payment_id


async def settlement(parts: Parts) -> str:
    # Paid at the provider, but the callback is lost and every query fails: the payment stays
    # PENDING until the day's reconciliation signals what the bill says. Then the bill reports
    # another amount for the same trade: a settlement review, which a person approves.
    order, payment_id = await _start(
        parts,
        "settlement",
        expires_in_seconds=60,
        pay="immediately",
        callback="drop",
        faults={"query": {"mode": "error", "times": -1}},
    )
    trade = (await sim_trade(parts.sim, order))["trade"]
    assert trade["trade_status"] == "TRADE_SUCCESS", trade
    paid_at = datetime.fromisoformat(trade["gmt_payment"])
    handle = parts.client.get_workflow_handle(payment_id)

    def finding(kind: str, amount_minor: int) -> SettlementFinding:
        return SettlementFinding(
            kind=kind,
            day=paid_at.date(),
            order_id=provider_order(order),
            trade_no=trade["trade_no"],
            amount_minor=amount_minor,
            currency="CNY",
            paid_at=paid_at,
            detail=f"{kind} found by reconciliation",
        )

    await handle.signal("settlement", finding("open_payment", AMOUNT))
    await wait_status(parts.api, payment_id, "SUCCEEDED")
    await handle.signal("settlement", finding("open_payment", AMOUNT))  # the same day reconciled again
    await handle.signal("settlement", finding("amount_differs", 100))
    await _decide(
        parts, order, "approve", "our record stands; finance takes it up with the provider", reason_is="settlement_mismatch"
    )
    return payment_id


async def partial_refunds(parts: Parts) -> str:
    _, payment_id = await _start(parts, "partial_refunds", pay="immediately")
    await wait_status(parts.api, payment_id, "SUCCEEDED")
    await _refund(parts, payment_id, "ret-1", 3000)
    await wait_status(parts.api, payment_id, "PARTIALLY_REFUNDED")
    await _refund(parts, payment_id, "ret-2", AMOUNT - 3000)
    return payment_id


async def review_deadline(parts: Parts) -> str:
    # The provider holds the payment and nobody decides the review: at the deadline its default
    # (reject: no money moved) applies.
    order, payment_id = await _start(parts, "review_deadline", pay="immediately", risk_hold=True)
    review = await _open_review(parts, order)
    assert (review["reason"], review["default_action"]) == ("provider_risk", "reject"), review
    return payment_id


def _by_system(view: PaymentView) -> bool:
    return any("by system" in d for d in _events(view, "review decided"))


def _callback_after_query(view: PaymentView) -> bool:
    events = [e.event for e in view.timeline]
    return "paid" in events and "callback" in events and events.index("callback") > events.index("paid")


def _repaired_by_settlement(view: PaymentView) -> bool:
    return any("confirmed by settlement" in d for d in _events(view, "paid"))


BRANCHES = [
    Branch("paid", paid, "SUCCEEDED"),
    Branch("lost", lost, "SUCCEEDED"),
    Branch("late", late, "SUCCEEDED", also=_callback_after_query),
    Branch("never", never, "CLOSED"),
    Branch("down", down, "FAILED"),
    Branch("twice", twice, "SUCCEEDED", refunds=1, children={"refund": 1}),
    Branch("paid_after_close", paid_after_close, "REFUNDED", refunds=1, children={"refund": 1}),
    Branch("mismatch_approved", mismatch_approved, "SUCCEEDED", reviews=1, children={"review": 1}),
    Branch("mismatch_rejected", mismatch_rejected, "REFUNDED", refunds=1, reviews=1, children={"review": 1, "refund": 1}),
    Branch("refund_retried", refund_retried, "REFUNDED", refunds=1, reviews=1, children={"refund": 2, "review": 1}),
    Branch("status_unknown", status_unknown, "CLOSED", reviews=1, children={"review": 1}),
    Branch("risk_rule", risk_rule, "SUCCEEDED", reviews=1, children={"review": 1}),
    Branch("provider_risk", provider_risk, "SUCCEEDED", reviews=1, children={"review": 1}),
    Branch("settlement", settlement, "SUCCEEDED", reviews=1, children={"review": 1}, also=_repaired_by_settlement),
    Branch("partial_refunds", partial_refunds, "REFUNDED", refunds=2, children={"refund": 2}),
    Branch("review_deadline", review_deadline, "FAILED", reviews=1, children={"review": 1}, also=_by_system),
]
