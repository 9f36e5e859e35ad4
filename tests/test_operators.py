"""Operators on the running stack: their own listener, roles, four eyes and the audit.

The stack's operators (tests/conftest.py): alice is an operator, bob and carol are
approvers, vera is a viewer; decisions moving more than FOUR_EYES_MINOR need two people.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import select, text

from paysentinel import db
from paysentinel.config import DEV_OPERATOR, Settings, token_digest
from tests.conftest import FOUR_EYES_MINOR, Stack, bearer, new_order
from tests.helpers import assert_books_balance, provider_order, script, start_payment, wait_status
from tests.test_refunds_reviews_e2e import ledger, open_review, run_cli


async def _audit(sessions, target: str) -> list[db.AuditEntry]:
    async with sessions() as session:
        return list(
            (await session.scalars(select(db.AuditEntry).where(db.AuditEntry.target == target).order_by(db.AuditEntry.id))).all()
        )


async def test_the_checkout_port_does_not_serve_the_operator_api(api, stack: Stack):
    for path in ("/operator/reviews", "/operator/audit", "/operator/reconciliations"):
        response = await api.get(path, headers=bearer("bob"))
        assert response.status_code == 404, f"{path} on the checkout port: {response.status_code}"
    refused = await api.post(
        "/operator/reviews/any/decision", headers=bearer("bob"), json={"action": "approve", "reason": "from outside"}
    )
    assert refused.status_code == 404
    async with httpx.AsyncClient(base_url=stack.operator_url) as anonymous:
        assert (await anonymous.get("/health")).status_code == 200
        assert (await anonymous.get("/operator/audit")).status_code == 401
        bad = await anonymous.get("/operator/audit", headers={"Authorization": "Bearer alice-token-012345678X"})
        assert bad.status_code == 401 and "operator token" in bad.json()["error"]


async def test_a_viewer_reads_but_may_not_decide_and_nothing_changes(api, sim, sessions, operator, stack: Stack):
    order = new_order("viewer")
    await script(sim, order, pay="immediately", paid_amount="0.01")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "IN_REVIEW")
    review = await open_review(operator, order)
    decision = f"/operator/reviews/{review['review_id']}/decision"
    async with httpx.AsyncClient(base_url=stack.operator_url, headers=bearer("vera"), timeout=30) as vera:
        assert (await vera.get(f"/operator/reviews/{review['review_id']}")).status_code == 200
        assert (await vera.get(f"/operator/payments/{payment_id}")).json()["status"] == "IN_REVIEW"
        assert (await vera.get("/operator/reconciliations")).status_code == 200
        refused = await vera.post(decision, json={"action": "reject", "reason": "looks tampered"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "viewer vera may not decide reviews; ask an operator"
        run = await vera.post("/operator/reconciliations/2001-01-01")
        assert run.status_code == 403 and run.json()["error"] == "viewer vera may not run reconciliation; ask an operator"
        await asyncio.sleep(1)
        unchanged = (await vera.get(f"/operator/reviews/{review['review_id']}")).json()
    assert (
        unchanged["status"] in ("OPEN", "ESCALATED") and unchanged["decision"] is None and unchanged["pending_decision"] is None
    )
    assert (await api.get(f"/payments/{payment_id}")).json()["status"] == "IN_REVIEW"
    assert (await ledger(sim, order))["refunded_minor"] == 0
    [entry] = await _audit(sessions, review["review_id"])
    assert (entry.operator, entry.role, entry.action, entry.result) == ("vera", "viewer", "review.reject", "refused")
    assert entry.address == "127.0.0.1" and entry.reason == "looks tampered" and "403" in entry.detail

    ok = await operator.post(decision, json={"action": "approve", "reason": "customer paid the rest offline"})
    assert ok.status_code == 200 and ok.json()["operator"] == "alice"  # below the four-eyes amount: one person
    await wait_status(api, payment_id, "SUCCEEDED")
    entries = await _audit(sessions, review["review_id"])
    assert [(e.operator, e.role, e.result) for e in entries] == [("vera", "viewer", "refused"), ("alice", "operator", "done")]


async def test_a_large_reject_needs_a_second_different_approver(api, sim, sessions, operator, stack: Stack):
    order = new_order("foureyes")
    await script(sim, order, pay="immediately", paid_amount="1500.00")  # the order is 2000.00
    payment_id = (await start_payment(api, order, amount_minor=200_000)).json()["payment_id"]
    await wait_status(api, payment_id, "IN_REVIEW")
    review = await open_review(operator, order)
    review_id = review["review_id"]
    decision = f"/operator/reviews/{review_id}/decision"
    assert 150_000 > FOUR_EYES_MINOR

    first = await operator.post(decision, json={"action": "reject", "reason": "amount tampered"})
    assert first.status_code == 202, first.text
    assert "pending a second approval by an approver" in first.json()["message"]
    assert first.json()["amount_minor"] == 150_000
    await asyncio.sleep(1)
    assert (await ledger(sim, order))["refunded_minor"] == 0  # nothing moved at the provider
    shown = (await operator.get(f"/operator/reviews/{review_id}")).json()
    assert shown["status"] in ("OPEN", "ESCALATED") and shown["decision"] is None
    assert shown["pending_decision"]["operator"] == "alice" and shown["pending_decision"]["action"] == "reject"

    again = await operator.post(decision, json={"action": "reject", "reason": "really tampered"})
    assert again.status_code == 409 and "second approval by a different approver" in again.json()["error"]
    async with httpx.AsyncClient(base_url=stack.operator_url, headers=bearer("bob"), timeout=30) as bob:
        other = await bob.post(decision, json={"action": "approve", "reason": "fine by me"})
        assert other.status_code == 409 and "approve that action (reject)" in other.json()["error"]
        assert (await ledger(sim, order))["refunded_minor"] == 0
        done = await bob.post(decision, json={"action": "reject", "reason": "confirmed with the customer"})
        assert done.status_code == 200, done.text
        assert done.json()["operator"] == "alice+bob" and "second approval by bob" in done.json()["reason"]
    await wait_status(api, payment_id, "REFUNDED", timeout=30)
    assert (await ledger(sim, order))["refunded_minor"] == 150_000
    await assert_books_balance(sim, sessions, [provider_order(order)])

    entries = await _audit(sessions, review_id)
    assert [(e.operator, e.role, e.action, e.result) for e in entries] == [
        ("alice", "operator", "review.reject", "pending"),
        ("alice", "operator", "review.reject", "refused"),
        ("bob", "approver", "review.approve", "refused"),
        ("bob", "approver", "review.reject", "done"),
    ]
    assert all(e.address == "127.0.0.1" and e.at is not None for e in entries)
    async with sessions() as session:
        assert await session.get(db.PendingDecision, review_id) is None
        row = await session.get(db.Review, review_id)
    assert row.decided_by == "alice+bob" and row.action == "reject"

    # The audit through the API (viewers may read it) and through the CLI.
    async with httpx.AsyncClient(base_url=stack.operator_url, headers=bearer("vera"), timeout=30) as vera:
        listed = (await vera.get("/operator/audit", params={"operator": "alice"})).json()
    mine = [e for e in listed if e["target"] == review_id]
    assert [e["result"] for e in mine] == ["refused", "pending"]  # newest first
    printed = await asyncio.to_thread(run_cli, stack, "audit", "list", "--operator", "bob", "--since", "10m")
    assert printed.returncode == 0, printed.stdout + printed.stderr
    assert review_id in printed.stdout and "review.reject" in printed.stdout and "approver" in printed.stdout
    assert "done" in printed.stdout and "refused" in printed.stdout and "127.0.0.1" in printed.stdout


async def test_an_operator_may_not_give_the_second_approval(api, sim, sessions, operator, stack: Stack):
    order = new_order("second")
    await script(sim, order, pay="immediately", paid_amount="900.00")
    payment_id = (await start_payment(api, order, amount_minor=100_000)).json()["payment_id"]
    await wait_status(api, payment_id, "IN_REVIEW")
    review_id = (await open_review(operator, order))["review_id"]
    decision = f"/operator/reviews/{review_id}/decision"
    async with (
        httpx.AsyncClient(base_url=stack.operator_url, headers=bearer("carol"), timeout=30) as carol,
        httpx.AsyncClient(base_url=stack.operator_url, headers=bearer("bob"), timeout=30) as bob,
    ):
        assert (await carol.post(decision, json={"action": "refund", "reason": "give it back"})).status_code == 202
        refused = await operator.post(decision, json={"action": "refund", "reason": "agreed"})
        assert refused.status_code == 403
        assert refused.json()["error"] == "operator alice may not give the second approval of carol's refund; ask an approver"
        assert (await ledger(sim, order))["refunded_minor"] == 0
        assert (await bob.post(decision, json={"action": "refund", "reason": "agreed"})).status_code == 200
    await wait_status(api, payment_id, "REFUNDED", timeout=30)
    assert (await ledger(sim, order))["refunded_minor"] == 90_000


async def test_the_audit_table_is_append_only(sessions):
    async with sessions() as session, session.begin():
        session.add(
            db.AuditEntry(
                operator="t",
                role="viewer",
                address="127.0.0.1",
                action="test",
                target="append-only",
                reason="",
                result="done",
                detail="",
            )
        )
    for statement in (
        "UPDATE audit SET result = 'done' WHERE target = 'append-only'",
        "DELETE FROM audit WHERE target = 'append-only'",
    ):
        with pytest.raises(Exception, match="append-only"):
            async with sessions() as session, session.begin():
                await session.execute(text(statement))
    assert len(await _audit(sessions, "append-only")) == 1


def test_operator_entries_are_hashed_with_a_role(monkeypatch):
    monkeypatch.setenv("PAYSENTINEL_OPERATOR_TOKENS", "alice:dev-operator-token-x")
    with pytest.raises(ValueError, match="name:role:sha256-hex-of-token"):
        Settings()
    monkeypatch.setenv("PAYSENTINEL_OPERATOR_TOKENS", f"alice:root:{token_digest('x' * 20)}")
    with pytest.raises(ValueError, match="roles: viewer, operator, approver"):
        Settings()
    monkeypatch.setenv("PAYSENTINEL_OPERATOR_TOKENS", f"alice:viewer:{token_digest('secret-of-alice')}")
    monkeypatch.delenv("PAYSENTINEL_OPERATOR_TOKEN", raising=False)
    settings = Settings()
    assert settings.operators == [("alice", "viewer", bytes.fromhex(token_digest("secret-of-alice")))]
    assert settings.effective_operator_token == ""  # only the development operator has a known token
    assert DEV_OPERATOR.startswith("operator:approver:") and "dev-operator-token" not in DEV_OPERATOR


def test_operator_new_prints_a_token_once_and_its_entry():
    from typer.testing import CliRunner

    from paysentinel.cli import app

    result = CliRunner().invoke(app, ["operator", "new", "dora", "--role", "approver"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    token = lines[lines.index(next(line for line in lines if line.startswith("token for dora"))) + 1]
    entry = next(line for line in lines if line.startswith("dora:approver:"))
    assert entry == f"dora:approver:{token_digest(token)}" and token not in entry
    assert CliRunner().invoke(app, ["operator", "new", "dora", "--role", "root"]).exit_code != 0
