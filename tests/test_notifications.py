"""Customer e-mail over real SMTP and signed merchant webhooks, once per event."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from paysentinel import db
from paysentinel.notify import UnsafeTarget, check_target
from tests.conftest import new_order
from tests.helpers import mails_to, receiver, script, start_payment, wait_for, wait_status


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
    "http://[::1]/hook", "http://192.168.0.10/x", "file:///etc/passwd", "ftp://example.com/x",
    "http://user:pw@example.com/x", "http://db.internal/x", "http:///nohost",
])
def test_internal_or_odd_notification_targets_are_refused(url):
    with pytest.raises(UnsafeTarget):
        check_target(url)


def test_public_targets_and_allowed_hosts_pass():
    check_target("https://merchant.example.com/paysentinel")
    check_target("http://93.184.216.34/hook")
    check_target("http://localhost:9999/hook", allowed_hosts=["localhost"])


async def test_unsafe_notify_url_is_rejected_at_checkout(api):
    response = await start_payment(api, new_order("ssrf"), notify_url="http://169.254.169.254/latest/meta-data")
    assert response.status_code == 422
    assert "notify_url rejected: 169.254.169.254 is not a public address" in response.json()["error"]


def subject(mail) -> str:
    return " ".join(str(mail["Subject"]).split())  # long subjects arrive folded


async def test_paid_payment_tells_customer_and_merchant_once(api, sim, mailbox, sessions):
    order = new_order("mail")
    await script(sim, order, pay="immediately", callback="duplicate")
    async with receiver([200], host="localhost") as (url, received):
        payment_id = (await start_payment(api, order, notify_url=url)).json()["payment_id"]
        await wait_status(api, payment_id, "SUCCEEDED")
        mails = await mails_to(mailbox, f"{order}@example.com", 1)
        await wait_for(lambda: _received(received, 1), what="the merchant notification")
        await asyncio.sleep(1.5)  # a duplicate callback or a retry must not send again
    mails = mailbox.to(f"{order}@example.com")
    assert len(mails) == 1 and len(received) == 1
    mail = mails[0]
    assert subject(mail) == f"Order {order}: payment of 99.90 CNY received"
    text = mail.get_content()
    assert f"Order number: {order}" in text and "Amount: 99.90 CNY" in text and "Your order is confirmed" in text
    event, event_id = received[0]
    assert event["type"] == "payment.paid" and event_id == f"{payment_id}:paid"
    assert (event["data"]["order_id"], event["data"]["amount"], event["data"]["currency"]) == (order, "99.90", "CNY")
    async with sessions() as session:
        rows = (await session.scalars(select(db.Notification).where(db.Notification.payment_id == payment_id))).all()
    assert sorted((r.channel, r.status, r.attempts) for r in rows) == [("email", "sent", 1), ("webhook", "sent", 1)]


async def _received(received: list, count: int) -> bool:
    return len(received) >= count


async def test_failing_merchant_endpoint_is_retried_without_a_second_email(api, sim, mailbox):
    order = new_order("retry")
    await script(sim, order, pay="immediately")
    async with receiver([500, 502, 200], host="localhost") as (url, received):
        payment_id = (await start_payment(api, order, notify_url=url)).json()["payment_id"]
        await wait_status(api, payment_id, "SUCCEEDED")
        await wait_for(lambda: _received(received, 3), timeout=20, what="three delivery attempts")
        await asyncio.sleep(1)
    assert len(received) == 3 and len({event_id for _, event_id in received}) == 1
    assert len(mailbox.to(f"{order}@example.com")) == 1  # the activity was retried, the e-mail not resent


async def test_refunds_and_unpaid_outcomes_are_told(api, sim, mailbox):
    order = new_order("refundmail")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    await api.post(f"/payments/{payment_id}/refunds", json={"amount_minor": 3000, "reason": "one item returned"},
                   headers={"Idempotency-Key": "r1"})
    mails = await mails_to(mailbox, f"{order}@example.com", 3)
    subjects = [subject(m) for m in mails]
    assert subjects == [f"Order {order}: payment of 99.90 CNY received", f"Order {order}: refund of 30.00 CNY started",
                        f"Order {order}: 30.00 CNY refunded"]
    assert "the shop refunds you: one item returned" in mails[1].get_content()

    unpaid = new_order("closedmail")
    await script(sim, unpaid, pay="never")
    payment_id = (await start_payment(api, unpaid, expires_in_seconds=5)).json()["payment_id"]
    await wait_status(api, payment_id, "CLOSED", timeout=30)
    [mail] = await mails_to(mailbox, f"{unpaid}@example.com", 1)
    assert subject(mail) == f"Order {unpaid}: payment not completed, nothing was charged"
    assert "no money was taken" in mail.get_content()
