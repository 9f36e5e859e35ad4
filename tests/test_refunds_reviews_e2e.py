"""Refunds and reviews end to end: HTTP, Temporal, PostgreSQL and the simulator.

After each test the simulator's own ledger proves the money: what it captured minus
what it refunded equals what our database says was paid minus refunded.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx

from tests.conftest import OPERATORS, Stack, new_order
from tests.helpers import (
    assert_books_balance,
    events,
    payment_row,
    provider_order,
    script,
    search_count,
    sim_trade,
    start_payment,
    wait_for,
    wait_status,
)


async def ledger(sim: httpx.AsyncClient, order: str) -> dict:
    response = await sim.get(f"/control/ledger/{provider_order(order)}")
    assert response.status_code == 200, response.text
    return response.json()


async def assert_books_agree(sim, sessions, order: str) -> dict:
    """The provider's books and ours agree on the money for this order; the provider's ledger."""
    return (await assert_books_balance(sim, sessions, [provider_order(order)]))[provider_order(order)]


async def refund(api, payment_id: str, key: str, amount: int, reason: str = "customer returned the goods"):
    return await api.post(
        f"/payments/{payment_id}/refunds", json={"amount_minor": amount, "reason": reason}, headers={"Idempotency-Key": key}
    )


async def open_review(operator: httpx.AsyncClient, order: str) -> dict:
    async def found():
        reviews = (await operator.get("/operator/reviews", params={"order_id": provider_order(order)})).json()
        return reviews[0] if reviews else None

    return await wait_for(found, what=f"an open review for {order}")


async def test_duplicate_charge_is_refunded_exactly_once(api, sim, sessions):
    order = new_order("twice")
    await script(sim, order, pay="immediately", second_charge=True, second_charge_delay_seconds=0.5)
    payment_id = (await start_payment(api, order)).json()["payment_id"]

    async def refunded():
        view = (await api.get(f"/payments/{payment_id}")).json()
        done = view["refunds"] and view["refunds"][0]["status"] == "SUCCEEDED" and view["status"] == "SUCCEEDED"
        return view if done else None

    view = await wait_for(refunded, timeout=30, what="the second charge refunded")
    assert len(view["refunds"]) == 1 and view["refunds"][0]["trade_no"] != view["trade_no"]
    assert "duplicate charge" in view["refunds"][0]["reason"]
    await asyncio.sleep(2)  # the second charge's callback may be resent: still one refund
    books = await assert_books_agree(sim, sessions, order)
    assert (books["captured_minor"], books["refunded_minor"], len(books["refunds"])) == (2 * 9990, 9990, 1)


async def test_success_after_close_is_refunded(api, sim, sessions, client):
    order = new_order("paidlate")
    await script(sim, order, pay="never", after_close="pay", after_close_delay_seconds=0.3)
    payment_id = (await start_payment(api, order, expires_in_seconds=5)).json()["payment_id"]
    view = await wait_status(api, payment_id, "REFUNDED", timeout=40)
    assert [e["event"] for e in view["timeline"] if e["event"] in ("closed", "paid after close", "refunded")] == [
        "closed",
        "paid after close",
        "refunded",
    ]
    books = await assert_books_agree(sim, sessions, order)
    assert (books["captured_minor"], books["refunded_minor"]) == (9990, 9990)
    await search_count(client, f'OrderId = "{provider_order(order)}" AND PaymentStatus = "REFUNDED"', 1)


async def test_partial_refunds_up_to_the_captured_amount(api, sim, sessions):
    order = new_order("partial")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")

    first = await refund(api, payment_id, "ret-1", 3000)
    assert first.status_code == 202 and first.json()["status"] == "PROCESSING", first.text
    again = await refund(api, payment_id, "ret-1", 3000)  # the client retries: the same refund
    assert again.json()["refund_id"] == first.json()["refund_id"]
    await wait_status(api, payment_id, "PARTIALLY_REFUNDED")

    changed = await refund(api, payment_id, "ret-1", 3001)
    assert changed.status_code == 409 and "already used" in changed.json()["error"]
    too_much = await refund(api, payment_id, "ret-2", 7000)
    assert too_much.status_code == 409
    assert "exceeds what is refundable: 69.90 CNY" in too_much.json()["error"]
    rest = await refund(api, payment_id, "ret-3", 6990)
    assert rest.status_code == 202
    view = await wait_status(api, payment_id, "REFUNDED")
    assert view["refunded_minor"] == 9990 and len(view["refunds"]) == 2
    assert (await refund(api, payment_id, "ret-4", 1)).status_code == 409
    bad = await api.post(f"/payments/{payment_id}/refunds", json={"amount_minor": 1, "reason": "x"})
    assert bad.status_code == 422 and "idempotency-key" in bad.text.lower()
    assert (await refund(api, "payment-nope", "k", 1)).status_code == 404
    books = await assert_books_agree(sim, sessions, order)
    assert (books["refunded_minor"], len(books["refunds"])) == (9990, 2)


async def test_refund_failure_is_retried_then_reviewed(api, sim, sessions, operator):
    order = new_order("refundfail")
    await script(sim, order, pay="immediately", refund="fail", refund_fail_times=-1)
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    assert (await refund(api, payment_id, "ret-1", 9990)).status_code == 202
    view = await wait_status(api, payment_id, "IN_REVIEW", timeout=30)
    assert view["review_reason"] == "refund_failed"
    assert (await ledger(sim, order))["refunds"][0]["submissions"] == 2  # PAYSENTINEL_REFUND_SUBMISSIONS

    review = await open_review(operator, order)
    assert review["reason"] == "refund_failed" and "insufficient merchant balance" in review["evidence"]
    await script(sim, order, pay="immediately")  # the merchant topped up the balance
    decided = await operator.post(
        f"/operator/reviews/{review['review_id']}/decision", json={"action": "refund", "reason": "balance topped up, retry"}
    )
    assert decided.status_code == 200 and decided.json()["operator"] == "alice"
    await wait_status(api, payment_id, "REFUNDED", timeout=30)
    books = await assert_books_agree(sim, sessions, order)
    assert (books["refunded_minor"], len(books["refunds"])) == (9990, 1)  # one refund id, resubmitted


async def test_risk_rule_hit_goes_to_review_then_approved_and_paid(api, sim, sessions, operator, books):
    device = f"dev-{new_order()}"
    for amount in (100, 200):
        order = new_order("probe")
        books.exempt(order, "a probe the payer never pays, 60 s to live: the test ends while it is PENDING")
        await script(sim, order, pay="never")
        assert (await start_payment(api, order, amount_minor=amount, device_id=device, expires_in_seconds=60)).status_code == 201
    order = new_order("risky")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order, amount_minor=300, device_id=device)).json()["payment_id"]
    view = await wait_status(api, payment_id, "IN_REVIEW")
    assert view["review_reason"] == "risk_rule"
    assert (await sim_trade(sim, order))["calls"]["create"] == 0  # no money moved before the review

    review = await open_review(operator, order)
    assert "tried 3 different amounts" in review["evidence"]
    await operator.post(
        f"/operator/reviews/{review['review_id']}/decision", json={"action": "approve", "reason": "known customer, called them"}
    )
    await wait_status(api, payment_id, "SUCCEEDED", timeout=30)
    decided = (await operator.get(f"/operator/reviews/{review['review_id']}")).json()
    assert decided["decision"]["operator"] == "alice" and decided["status"] == "DECIDED"
    await assert_books_agree(sim, sessions, order)


async def test_wrong_amount_review_rejected_is_refunded(api, sim, sessions, operator):
    order = new_order("amount")
    await script(sim, order, pay="immediately", paid_amount="0.01")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    view = await wait_status(api, payment_id, "IN_REVIEW")
    assert view["review_reason"] == "amount_mismatch"
    review = await open_review(operator, order)
    assert "0.01 CNY" in review["evidence"] and "query says 0.01 CNY" in review["evidence"]
    await operator.post(
        f"/operator/reviews/{review['review_id']}/decision",
        json={"action": "reject", "reason": "amount tampered, give the money back"},
    )
    view = await wait_status(api, payment_id, "REFUNDED", timeout=30)
    assert view["refunds"][0]["requested_by"] == "alice"
    books = await assert_books_agree(sim, sessions, order)
    assert (books["captured_minor"], books["refunded_minor"]) == (1, 1)  # what the provider took


async def test_review_deadline_applies_the_safe_default(api, sim, sessions, operator):
    order = new_order("deadline")
    await script(sim, order, pay="immediately", paid_amount="0.01")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "IN_REVIEW")
    review = await open_review(operator, order)
    assert review["default_action"] == "refund"
    escalated = await wait_for(lambda: _review_status(operator, review["review_id"], "ESCALATED"), timeout=20, what="escalation")
    assert escalated["status"] == "ESCALATED"
    await wait_status(api, payment_id, "REFUNDED", timeout=40)
    decided = (await operator.get(f"/operator/reviews/{review['review_id']}")).json()
    assert decided["decision"]["operator"] == "system" and "deadline" in decided["decision"]["reason"]
    await assert_books_agree(sim, sessions, order)


async def _review_status(operator, review_id: str, status: str):
    review = (await operator.get(f"/operator/reviews/{review_id}")).json()
    return review if review["status"] == status else None


async def test_invalid_operator_actions_change_nothing(api, sim, sessions, operator, stack):
    order = new_order("invalid")
    await script(sim, order, pay="immediately", paid_amount="0.01")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "IN_REVIEW")
    review = await open_review(operator, order)
    decision = f"/operator/reviews/{review['review_id']}/decision"

    wrong = await operator.post(decision, json={"action": "mark_paid", "reason": "looks fine"})
    assert wrong.status_code == 409
    assert "'mark_paid' is not possible for a amount_mismatch review; possible: approve, reject, refund" in wrong.json()["error"]
    assert (await operator.post(decision, json={"action": "approve"})).status_code == 422  # no reason
    assert (await operator.post(decision, json={"action": "pay", "reason": "yes"})).status_code == 422
    async with httpx.AsyncClient(base_url=stack.operator_url) as anonymous:
        assert (await anonymous.post(decision, json={"action": "approve", "reason": "ok!"})).status_code == 401
        bad_token = await anonymous.get("/operator/reviews", headers={"Authorization": "Bearer nope"})
        assert bad_token.status_code == 401 and "operator token" in bad_token.json()["error"]
    assert (
        await operator.post("/operator/reviews/nope/decision", json={"action": "approve", "reason": "ok!"})
    ).status_code == 404
    during = await refund(api, payment_id, "ret-1", 100)
    assert during.status_code == 409 and "under review" in during.json()["error"]

    assert (await _review_status(operator, review["review_id"], "OPEN")) is not None
    assert (await api.get(f"/payments/{payment_id}")).json()["status"] == "IN_REVIEW"
    assert (await payment_row(sessions, payment_id, "IN_REVIEW")).status == "IN_REVIEW"

    ok = await operator.post(decision, json={"action": "approve", "reason": "customer paid the difference offline"})
    assert ok.status_code == 200
    again = await operator.post(decision, json={"action": "reject", "reason": "changed my mind"})
    assert again.status_code == 409 and "already decided: approve by alice" in again.json()["error"]
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert any("accepted by alice" in e["detail"] for e in events(view, "accepted"))
    await assert_books_agree(sim, sessions, order)


async def test_worker_restart_during_refund_still_refunds_once(api, sim, sessions, stack: Stack):
    order = new_order("restart")
    await script(sim, order, pay="immediately", refund_delay_seconds=3)
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    assert (await refund(api, payment_id, "ret-1", 9990)).status_code == 202
    await wait_for(lambda: _refund_submitted(sim, order), what="the refund at the provider")
    await asyncio.to_thread(stack.restart_app)  # the worker stops mid-refund and comes back
    view = await wait_status(api, payment_id, "REFUNDED", timeout=40)
    assert len(view["refunds"]) == 1
    books = await assert_books_agree(sim, sessions, order)
    assert (books["refunded_minor"], len(books["refunds"]), books["refunds"][0]["submissions"]) == (9990, 1, 1)


async def _refund_submitted(sim, order: str) -> bool:
    return bool((await ledger(sim, order))["refunds"])


def run_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    env = {**stack.env, "PAYSENTINEL_OPERATOR_TOKEN": OPERATORS["bob"], "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "paysentinel.cli", *args, "--api", stack.operator_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_operator_cli_lists_shows_and_decides(api, sim, sessions, operator, stack: Stack):
    order = new_order("cli")
    await script(sim, order, pay="immediately", paid_amount="0.01")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "IN_REVIEW")
    review_id = (await open_review(operator, order))["review_id"]

    listed = await asyncio.to_thread(run_cli, stack, "review", "list", "--order", provider_order(order))
    assert listed.returncode == 0 and review_id in listed.stdout and "amount_mismatch" in listed.stdout
    shown = await asyncio.to_thread(run_cli, stack, "review", "show", review_id)
    assert shown.returncode == 0 and "possible: approve, reject, refund" in shown.stdout and "timeline" in shown.stdout
    refused = await asyncio.to_thread(run_cli, stack, "review", "mark-paid", review_id, "--reason", "looks fine")
    assert refused.returncode == 1 and "is not possible for a amount_mismatch review" in refused.stdout
    decided = await asyncio.to_thread(run_cli, stack, "review", "reject", review_id, "--reason", "tampered amount")
    assert decided.returncode == 0 and "reject by bob" in decided.stdout, decided.stdout + decided.stderr
    await wait_status(api, payment_id, "REFUNDED", timeout=30)
    payment = await asyncio.to_thread(run_cli, stack, "payment", "show", provider_order(order))
    assert payment.returncode == 0 and "REFUNDED" in payment.stdout and "refunded 0.01" in payment.stdout
    await assert_books_agree(sim, sessions, order)


async def test_a_paid_payment_continues_into_its_refund_phase_and_is_refundable_after_a_deploy(
    api, sim, sessions, stack: Stack, client
):
    """After the resend window the payment continues as new (compact state, current code);
    a worker restart (a deploy) later, the merchant still refunds it, once."""
    order = new_order("phase")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    first_run = (await client.get_workflow_handle(payment_id).describe()).run_id

    async def continued():
        return (await client.get_workflow_handle(payment_id).describe()).run_id != first_run

    await wait_for(continued, timeout=30, what="the payment to continue into its refund phase")
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert view["status"] == "SUCCEEDED" and events(view, "refund phase") and events(view, "paid")
    await asyncio.to_thread(stack.restart_app)  # a deploy
    assert (await refund(api, payment_id, "after-deploy", 9990)).status_code == 202
    view = await wait_status(api, payment_id, "REFUNDED", timeout=40)
    assert len(view["refunds"]) == 1
    books = await assert_books_agree(sim, sessions, order)
    assert books["refunded_minor"] == 9990
