"""Notifications: e-mail over SMTP to the customer, a signed webhook to the merchant.

Once per event and channel: each (event key, channel) has a row; a channel already
marked sent is skipped when Temporal retries the activity, so a failing merchant URL
never makes the customer receive the e-mail twice. The webhook's ``webhook-id`` is the
event key, so the merchant can also deduplicate.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from paysentinel import db, metrics, signing
from paysentinel.models import Incident, NotificationInput, to_major
from paysentinel.notify import (
    UNSAFE_PUBLIC,
    DeliveryFailed,
    Resolver,
    UnsafeTarget,
    compose,
    compose_alert,
    post_pinned,
    system_resolver,
)

UNSAFE_TARGET = "UnsafeTarget"
NOT_DELIVERED = "NotDelivered"


@dataclass(frozen=True)
class Channels:
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "payments@paysentinel.local"
    webhook_secret: str | tuple[str, ...] = ""  # (current, previous) during a rotation: signed with each
    allowed_hosts: tuple[str, ...] = ()
    # Where the monitor's alerts go (operators' mailbox, an incident webhook); set by operators.
    alert_email: str = ""
    alert_webhook_url: str = ""


class NotificationActivities:
    def __init__(
        self,
        channels: Channels,
        http: httpx.AsyncClient,
        sessions: async_sessionmaker[AsyncSession],
        resolver: Resolver = system_resolver,
    ):
        self._channels = channels
        self._http = http
        self._sessions = sessions
        self._resolver = resolver  # how webhook hosts are looked up (once per send)

    @activity.defn
    async def notify(self, n: NotificationInput) -> list[str]:
        """Send what has not been sent yet; returns the channels sent by this attempt.

        The customer and the merchant read the merchant's own order id, not the internal
        order number ``<merchant>-<order>`` the workflow carries."""
        sent: list[str] = []
        if not (n.email and self._channels.smtp_host) and not n.webhook_url:
            activity.logger.info("payment %s: %s notification: no channel to send it on", n.payment_id, n.kind.value)
            return sent
        n = await self._as_merchant_sees_it(n)
        subject, body = compose(n)
        if n.email and self._channels.smtp_host:
            if await self._claim(n.key, "email", n.email, subject, n.payment_id, n.kind.value):
                await asyncio.to_thread(self._send_email, n.key, n.email, subject, body)
                await self._done(n.key, "email")
                sent.append("email")
        if n.webhook_url:
            if await self._claim(n.key, "webhook", n.webhook_url, subject, n.payment_id, n.kind.value):
                await self._send_webhook(n, subject, body)
                await self._done(n.key, "webhook")
                sent.append("webhook")
        activity.logger.info("payment %s: %s notification sent via %s", n.payment_id, n.kind.value, sent or "nothing new")
        return sent

    async def _as_merchant_sees_it(self, n: NotificationInput) -> NotificationInput:
        from paysentinel.merchants import merchant_order

        async with self._sessions() as session:
            row = await session.get(db.Payment, n.payment_id)
        if row is None or not row.merchant_id:
            return n
        return n.model_copy(update={"order_id": merchant_order(row.merchant_id, n.order_id)})

    @activity.defn
    async def send_alert(self, incident: Incident) -> list[str]:
        """Tell operators an incident opened or is over; once per incident and channel."""
        subject, body = compose_alert(incident)
        owner, channels = f"monitor:{incident.monitor}", self._channels
        sent = []
        if channels.alert_email and channels.smtp_host:
            if await self._claim(incident.key, "email", channels.alert_email, subject, owner, "alert"):
                await asyncio.to_thread(self._send_email, incident.key, channels.alert_email, subject, body)
                await self._done(incident.key, "email")
                sent.append("email")
        if channels.alert_webhook_url:
            if await self._claim(incident.key, "webhook", channels.alert_webhook_url, subject, owner, "alert"):
                event = {
                    "id": incident.key,
                    "type": f"alert.{incident.status.lower()}",
                    "data": {**incident.model_dump(mode="json", exclude={"to_send"}), "message": body},
                }
                await self._post_alert(channels.alert_webhook_url, incident.key, event)
                await self._done(incident.key, "webhook")
                sent.append("webhook")
        if not (channels.alert_email and channels.smtp_host) and not channels.alert_webhook_url:
            if await self._claim(incident.key, "log", "worker log", subject, owner, "alert"):
                activity.logger.warning(
                    "ALERT %s (set PAYSENTINEL_ALERT_EMAIL or PAYSENTINEL_ALERT_WEBHOOK_URL to have alerts sent)", subject
                )
                await self._done(incident.key, "log")
                sent.append("log")
        else:
            activity.logger.warning("alert %s: %s; sent via %s", incident.key, subject, sent or "nothing new")
        if sent and incident.status == "OPEN":  # counted once: a channel is sent once per incident
            metrics.alerts.labels(incident.kind.split(":", 1)[0]).inc()
        return sent

    async def _claim(self, key: str, channel: str, target: str, subject: str, owner: str, kind: str) -> bool:
        """True when this channel still has to be sent for the event."""
        async with self._sessions() as session:
            row = await session.get(db.Notification, f"{key}:{channel}")
            if row is None:
                row = db.Notification(
                    key=f"{key}:{channel}",
                    payment_id=owner,
                    kind=kind,
                    channel=channel,
                    target=target,
                    subject=subject,
                    status="sending",
                    attempts=0,
                )
                session.add(row)
            if row.status == "sent":
                return False
            row.attempts += 1
            await session.commit()
            return True

    async def _done(self, key: str, channel: str, error: str | None = None) -> None:
        async with self._sessions() as session:
            row = await session.get(db.Notification, f"{key}:{channel}")
            assert row is not None, f"notification {key}:{channel} was claimed before it is sent"
            row.status, row.sent_at, row.error = "sent", db.utcnow(), error
            await session.commit()

    def _send_email(self, key: str, to: str, subject: str, body: str) -> None:
        message = EmailMessage()
        message["From"] = self._channels.smtp_from
        message["To"] = to
        message["Subject"] = subject
        # Derived from the event: a receiving system can tell a resend from a new message.
        message["Message-ID"] = make_msgid(idstring=key.replace(":", "."), domain="paysentinel")
        message["X-Paysentinel-Event"] = key
        message.set_content(body)
        with smtplib.SMTP(self._channels.smtp_host, self._channels.smtp_port, timeout=10) as smtp:
            smtp.send_message(message)

    async def _send_webhook(self, n: NotificationInput, subject: str, body: str) -> None:
        assert n.webhook_url is not None
        event = {
            "id": n.key,
            "type": f"payment.{n.kind.value}",
            "data": {
                "payment_id": n.payment_id,
                "order_id": n.order_id,
                "kind": n.kind.value,
                "amount": to_major(n.amount_minor, n.currency),
                "amount_minor": n.amount_minor,
                "currency": n.currency,
                "detail": n.detail,
                "message": body,
            },
        }
        await self._post_signed(n.webhook_url, n.key, event)

    async def _post_alert(self, url: str, key: str, event: dict) -> None:
        """POST an alert to the operators' own webhook (their setting, so no target rules)."""
        payload = json.dumps(event, separators=(",", ":")).encode()
        headers = signing.signed_headers(self._channels.webhook_secret, key, payload)
        response = await self._http.post(url, content=payload, headers=headers, follow_redirects=False)
        if not response.is_success:
            raise RuntimeError(f"{url} answered HTTP {response.status_code}; resending with backoff")

    async def _post_signed(self, url: str, key: str, event: dict) -> None:
        """POST a Standard Webhooks message to a merchant; the message id is the event key.

        The host is resolved once and the request goes to that checked address (no second
        lookup, no redirect followed). What fails is told in two ways: the activity's error
        message (which the payment's timeline shows) names no address and no connection
        error; the worker's log, the ``notifications`` row and the error's details in the
        workflow history keep the whole story for operators."""
        payload = json.dumps(event, separators=(",", ":")).encode()
        headers = signing.signed_headers(self._channels.webhook_secret, key, payload)
        try:
            await post_pinned(
                url,
                payload,
                headers,
                allowed_hosts=self._channels.allowed_hosts,
                resolver=self._resolver,
                timeout=self._http.timeout,
            )
        except UnsafeTarget as err:
            activity.logger.warning("webhook %s not sent: %s", key, err)
            await self._done(key, "webhook", error=f"not sent: {err}")
            raise ApplicationError(UNSAFE_PUBLIC, str(err), type=UNSAFE_TARGET, non_retryable=True) from err
        except DeliveryFailed as err:
            activity.logger.warning("webhook %s not delivered: %s", key, err.detail)
            await self._failed(key, "webhook", err.detail)
            raise ApplicationError(err.public, err.detail, type=NOT_DELIVERED) from err

    async def _failed(self, key: str, channel: str, error: str) -> None:
        async with self._sessions() as session:
            row = await session.get(db.Notification, f"{key}:{channel}")
            if row is not None and row.status != "sent":
                row.error = error[:2000]
                await session.commit()
