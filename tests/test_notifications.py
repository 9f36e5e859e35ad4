"""Customer e-mail over real SMTP and signed merchant webhooks, once per event."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from paysentinel import db
from paysentinel.notify import UnsafeTarget, check_target
from tests.conftest import new_order
from tests.helpers import mails_to, receiver, script, start_payment, wait_for, wait_status


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/hook",
        "http://192.168.0.10/x",
        "file:///etc/passwd",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
        "http://db.internal/x",
        "http:///nohost",
    ],
)
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
    await api.post(
        f"/payments/{payment_id}/refunds",
        json={"amount_minor": 3000, "reason": "one item returned"},
        headers={"Idempotency-Key": "r1"},
    )
    mails = await mails_to(mailbox, f"{order}@example.com", 3)
    subjects = [subject(m) for m in mails]
    assert subjects == [
        f"Order {order}: payment of 99.90 CNY received",
        f"Order {order}: refund of 30.00 CNY started",
        f"Order {order}: 30.00 CNY refunded",
    ]
    assert "the shop refunds you: one item returned" in mails[1].get_content()

    unpaid = new_order("closedmail")
    await script(sim, unpaid, pay="never")
    payment_id = (await start_payment(api, unpaid, expires_in_seconds=5)).json()["payment_id"]
    await wait_status(api, payment_id, "CLOSED", timeout=30)
    [mail] = await mails_to(mailbox, f"{unpaid}@example.com", 1)
    assert subject(mail) == f"Order {unpaid}: payment not completed, nothing was charged"
    assert "no money was taken" in mail.get_content()


# --- Outbound requests: one lookup, the checked address, no redirects ----------------------

from paysentinel.notify import (  # noqa: E402
    UNSAFE_PUBLIC,
    DeliveryFailed,
    is_public_address,
    pinned_request,
    post_pinned,
    public_failure,
    resolve_target,
)

PRIVATE_V4 = ["127.0.0.1", "10.1.2.3", "192.168.0.10", "169.254.169.254", "172.16.5.4", "100.64.0.1", "0.0.0.0"]


def embedded_forms(v4: str) -> list[str]:
    """An IPv4 address written in each IPv6 form that carries one."""
    import ipaddress

    n = int(ipaddress.IPv4Address(v4))
    high, low = f"{n >> 16:x}", f"{n & 0xFFFF:x}"
    return [f"64:ff9b::{high}:{low}", f"2002:{high}:{low}::1", f"::ffff:{v4}", f"::{high}:{low}"]


@pytest.mark.parametrize("v4", PRIVATE_V4)
def test_ipv6_forms_embedding_an_internal_ipv4_address_are_refused(v4):
    for address in embedded_forms(v4):
        assert not is_public_address(address), address
        with pytest.raises(UnsafeTarget):
            check_target(f"http://[{address}]:8080/hook")


def test_ipv6_forms_embedding_a_public_ipv4_address_pass():
    for address in embedded_forms("93.184.216.34"):
        assert is_public_address(address), address
    assert is_public_address("2606:4700:4700::1111") and not is_public_address("fd00::1")


class Listener:
    """A real HTTP endpoint on 127.0.0.1 that counts every connection and answers ``status``
    (with ``location`` for a redirect); ``hosts`` are the Host headers it got."""

    def __init__(self, status: int = 200, location: str = ""):
        self.status, self.location = status, location
        self.connections, self.hosts = 0, []

    async def __aenter__(self) -> "Listener":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        self.hosts.append(headers.get("Host") or headers.get("host"))
        length = int(headers.get("Content-Length") or headers.get("content-length") or 0)
        if length:
            await reader.readexactly(length)
        extra = f"Location: {self.location}\r\n" if self.location else ""
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()


def scripted_resolver(*answers: list[str]):
    """A resolver that gives each answer in turn (the last repeats) and counts the lookups."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    return resolve, calls


async def test_a_name_that_rebinds_to_loopback_never_reaches_a_loopback_listener():
    async with Listener() as listener:
        resolver, calls = scripted_resolver(["93.184.216.34"], ["127.0.0.1"])
        url = f"http://rebind.example:{listener.port}/hook"
        with pytest.raises(DeliveryFailed) as failed:
            await post_pinned(url, b"{}", {}, resolver=resolver, timeout=1.0)
        assert listener.connections == 0 and calls == ["rebind.example"]  # resolved once, public address used
        assert "127.0.0.1" not in failed.value.public and "93.184.216.34" not in failed.value.public
        assert "93.184.216.34" in failed.value.detail  # operators see where it went

        # Asked again, the name now answers loopback: refused before any connection.
        with pytest.raises(UnsafeTarget):
            await post_pinned(url, b"{}", {}, resolver=resolver, timeout=1.0)
        assert listener.connections == 0


async def test_the_request_goes_to_the_resolved_address_with_the_original_host():
    async with Listener() as listener:
        resolver, calls = scripted_resolver(["127.0.0.1"], ["10.9.9.9"])
        url = f"http://merchant.test:{listener.port}/hook"
        response = await post_pinned(url, b"{}", {}, allowed_hosts=["merchant.test"], resolver=resolver)
        assert response.status_code == 200 and calls == ["merchant.test"]
        assert listener.connections == 1 and listener.hosts == [f"merchant.test:{listener.port}"]


async def test_https_keeps_the_host_name_for_tls():
    import httpx

    target = await resolve_target("https://shop.example.com/hook", resolver=scripted_resolver(["93.184.216.34"])[0])
    async with httpx.AsyncClient() as client:
        request = pinned_request(client, target, b"{}", {})
    assert request.url.host == "93.184.216.34" and request.headers["Host"] == "shop.example.com"
    assert request.extensions["sni_hostname"] == "shop.example.com"  # SNI and certificate check


async def test_a_redirect_answer_is_not_followed():
    async with Listener() as inner:
        async with Listener(302, f"http://127.0.0.1:{inner.port}/latest/meta-data") as outer:
            with pytest.raises(DeliveryFailed) as failed:
                await post_pinned(
                    f"http://localhost:{outer.port}/hook",
                    b"{}",
                    {},
                    allowed_hosts=["localhost"],
                    resolver=scripted_resolver(["127.0.0.1"])[0],
                )
            assert outer.connections == 1 and inner.connections == 0
    assert "redirect, not followed" in failed.value.public and "meta-data" not in failed.value.public


def test_public_timeline_keeps_no_connection_details():
    assert (
        public_failure("paid: NotDelivered: the merchant endpoint answered HTTP 500; resending with backoff")
        == "paid: the merchant endpoint answered HTTP 500; resending with backoff"
    )
    assert public_failure(f"paid: UnsafeTarget: {UNSAFE_PUBLIC}") == f"paid: {UNSAFE_PUBLIC}"
    for leaky in [
        "paid: ConnectError: [Errno 111] Connection refused",
        "paid: UnsafeTarget: db.corp resolves to 10.0.0.3, which is not a public address",
        "paid: RuntimeError: http://10.0.0.3:5432/ answered HTTP 404; resending with backoff",
    ]:
        shown = public_failure(leaky)
        assert shown.startswith("paid: the merchant endpoint could not be reached") and "10.0.0.3" not in shown
        assert "Errno" not in shown


async def test_unreachable_merchant_endpoint_detail_stays_out_of_the_payment_view(api, sim, sessions):
    from paysentinel.devserver import free_port

    order = new_order("unreach")
    await script(sim, order, pay="immediately")
    url = f"http://localhost:{free_port()}/hook"  # nobody listens: connection refused
    payment_id = (await start_payment(api, order, notify_url=url)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")

    async def failure_noted():
        view = (await api.get(f"/payments/{payment_id}")).json()
        return [e["detail"] for e in view["timeline"] if e["event"] == "notification failed"]

    [shown] = await wait_for(failure_noted, timeout=30, what="the notification failure on the timeline")
    assert shown == "paid: the merchant endpoint could not be reached; resending with backoff"
    async with sessions() as session:
        row = await session.get(db.Notification, f"{payment_id}:paid:webhook")
    assert row.status != "sent" and "127.0.0.1" in row.error and "ConnectError" in row.error  # for operators
