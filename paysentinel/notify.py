"""Customer notifications: what each outcome tells the customer, and where it may be sent.

Every message states the order number, the amount and currency, and what happens next,
so nobody is left guessing. Merchant notification URLs are checked so they cannot be
pointed at internal addresses (the worker would otherwise fetch them from inside).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from paysentinel.models import Incident, NotificationInput, NotifyKind, to_major


class UnsafeTarget(ValueError):
    """A notification URL that points somewhere it must not (internal, loopback, odd scheme)."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


def check_target(url: str, allowed_hosts: Iterable[str] = (), resolve: bool = False) -> None:
    """Raise UnsafeTarget unless ``url`` is http(s) to a public host (or an allowed one).

    With ``resolve``, every address the host name resolves to must be public too (checked
    again right before sending, so a DNS answer cannot be switched after validation)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeTarget(f"notification URLs must be http or https, not {parts.scheme or 'none'!r}")
    if parts.username or parts.password:
        raise UnsafeTarget("notification URLs must not carry credentials")
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeTarget("notification URL has no host")
    if host in {h.lower() for h in allowed_hosts}:
        return
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise UnsafeTarget(f"{host} is an internal host name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass  # a host name: checked by resolving it
    else:
        if not _is_public(host):
            raise UnsafeTarget(f"{host} is not a public address")
        return
    if resolve:
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
        except socket.gaierror as err:
            raise UnsafeTarget(f"{host} does not resolve: {err}") from err
        for info in infos:
            if not _is_public(str(info[4][0])):
                raise UnsafeTarget(f"{host} resolves to {info[4][0]}, which is not a public address")


SUBJECTS = {
    NotifyKind.PAID: "Order {order}: payment of {amount} received",
    NotifyKind.FAILED: "Order {order}: payment failed, nothing was charged",
    NotifyKind.CLOSED: "Order {order}: payment not completed, nothing was charged",
    NotifyKind.REFUND_STARTED: "Order {order}: refund of {amount} started",
    NotifyKind.REFUNDED: "Order {order}: {amount} refunded",
    NotifyKind.IN_REVIEW: "Order {order}: we are checking your payment",
}

NEXT_STEPS = {
    NotifyKind.PAID: "Your order is confirmed; nothing else is needed from you.",
    NotifyKind.FAILED: "No money was taken. You can place the order again and pay.",
    NotifyKind.CLOSED: "The payment window has closed and no money was taken. Place the order again to pay.",
    NotifyKind.REFUND_STARTED: "The money goes back to the account you paid with; banks usually show it within "
                               "1-5 working days.",
    NotifyKind.REFUNDED: "The refund is complete on our side; your bank shows it within 1-5 working days.",
    NotifyKind.IN_REVIEW: "Our team is checking the payment. You do not need to do anything or pay again; "
                          "we will write to you with the outcome.",
}


def compose(n: NotificationInput) -> tuple[str, str]:
    """(subject, body) of the customer's message."""
    amount = f"{to_major(n.amount_minor, n.currency)} {n.currency}"
    subject = SUBJECTS[n.kind].format(order=n.order_id, amount=amount)
    body = "\n".join([
        subject + ".",
        "",
        f"Order number: {n.order_id}",
        f"Amount: {amount}",
        f"What happened: {n.detail}",
        f"What happens next: {NEXT_STEPS[n.kind]}",
    ])
    return subject, body


ALERT_NAMES = {"failure_rate": "payment failure rate", "timeout_rate": "unpaid (timed-out) payment rate"}


def compose_alert(incident: Incident) -> tuple[str, str]:
    """(subject, body) of an operator alert: what crossed which line, and where to look."""
    name = ALERT_NAMES.get(incident.kind, incident.kind)
    if incident.kind.startswith(("unresolved:", "failed:")):  # a reconciliation run
        what, day = incident.kind.split(":", 1)
        head = f"[paysentinel] reconciliation {day} ({incident.monitor.split(':', 1)[-1]})"
        if incident.status != "OPEN":
            subject = f"{head}: resolved, {'no longer failing' if what == 'failed' else 'differences dealt with'}"
            return subject, f"{subject}.\n\nWhen it opened: {incident.detail}\nWhat to do: nothing; the incident is closed."
        subject = head + (f": {incident.rate:g} differences need a person (threshold {incident.threshold:g})"
                          if what == "unresolved" else ": failed")
        next_step = (
            f"`paysentinel reconcile show --date {day}` lists each difference and what was done; the unresolved "
            "ones say what they need." if what == "unresolved" else
            "Fix what the error says (a bill that cannot be read: ask the provider for a corrected one; a provider "
            f"that does not answer: wait for it), then `paysentinel reconcile run --date {day}`."
        )
        body = "\n".join([subject + ".", "", incident.detail,
                           f"What to do: {next_step} Reconciling a day again repairs nothing twice."])
        return subject, body
    if incident.kind == "stuck_payments":  # the monitor's stuck money: a count, not a rate
        return compose_stuck_alert(incident)
    if incident.kind == "child_failed":  # a payment's refund or review workflow failed
        if incident.status != "OPEN":
            subject = "[paysentinel] resolved: a payment's child workflows have finished"
            return subject, f"{subject}.\n\nWhen it opened: {incident.detail}\nWhat to do: nothing."
        subject = "[paysentinel] a refund or review workflow of a payment failed"
        return subject, "\n".join([
            subject + ".", "", incident.detail,
            "What the payment did: a refund was started again with the same provider refund id (the provider "
            "refunds it once), a review was opened again; after three failures a refund goes to a person and a "
            "review applies its safe default.",
            "What to do: open the payment in the Temporal Web UI and read why the child failed (terminated, timed "
            "out, id in use); `paysentinel review list` shows what waits for a person.",
        ])
    if incident.status == "OPEN":
        subject = f"[paysentinel] {name} {incident.rate:.1%} is above {incident.threshold:.1%} (monitor {incident.monitor})"
        next_step = ("Find the failed or closed payments in the Temporal Web UI (PaymentStatus = \"FAILED\" or "
                     "\"CLOSED\") and read their histories: provider errors, rejections or callbacks that never came. "
                     "You get one message per incident, and another when it is over.")
    else:
        subject = f"[paysentinel] resolved: {name} back under {incident.threshold:.1%} (monitor {incident.monitor})"
        next_step = "Nothing to do; the incident is closed."
    body = "\n".join([
        subject + ".",
        "",
        f"Incident: {incident.id} ({incident.kind}), opened {incident.opened_at:%Y-%m-%d %H:%M:%S} UTC",
        f"When opened: {incident.detail}",
        f"Highest rate seen: {incident.peak_rate:.1%}",
        *( [f"Resolved: {incident.resolved_at:%Y-%m-%d %H:%M:%S} UTC"] if incident.resolved_at else [] ),
        f"What to do: {next_step}",
    ])
    return subject, body


def compose_stuck_alert(incident: Incident) -> tuple[str, str]:
    """(subject, body) of the stuck-money alert: which payments, and where to look."""
    if incident.status == "OPEN":
        subject = f"[paysentinel] {incident.rate:g} payments stuck: money is not moving (monitor {incident.monitor})"
        next_step = (
            "`paysentinel payment show <order>` and the payment's history in the Temporal Web UI "
            "(WorkflowId STARTS_WITH \"<payment id>\" lists it with its refunds and reviews). "
            "CREATED/PENDING past the time to live: is a worker running? REFUNDING/IN_REVIEW without a running "
            "refund or review workflow: the child ended (terminated, timed out) without its parent recording an "
            "outcome; settle the money with the provider and correct the payment. A refund PROCESSING past the "
            "provider's limit: ask the provider about that refund id. "
            "You get one message per incident, and another when it is over."
        )
    else:
        subject = f"[paysentinel] resolved: no payments stuck (monitor {incident.monitor})"
        next_step = "Nothing to do; the incident is closed."
    body = "\n".join([
        subject + ".",
        "",
        f"Incident: {incident.id} ({incident.kind}), opened {incident.opened_at:%Y-%m-%d %H:%M:%S} UTC",
        f"When opened: {incident.detail}",
        f"Most stuck at once: {incident.peak_rate:g}",
        *([f"Resolved: {incident.resolved_at:%Y-%m-%d %H:%M:%S} UTC"] if incident.resolved_at else []),
        f"What to do: {next_step}",
    ])
    return subject, body
