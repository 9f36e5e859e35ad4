"""Customer notifications: what each outcome tells the customer, and where it may be sent.

Every message states the order number, the amount and currency, and what happens next,
so nobody is left guessing. Merchant notification URLs are checked so they cannot be
pointed at internal addresses (the worker would otherwise fetch them from inside).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from paysentinel.models import Incident, NotificationInput, NotifyKind, PaymentView, to_major


class UnsafeTarget(ValueError):
    """A notification URL that points somewhere it must not (internal, loopback, odd scheme)."""


# IPv6 ranges that carry an IPv4 address; such an address is judged as the IPv4 one it carries.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known NAT64 prefix: the last 32 bits
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # RFC 3056 6to4: bits 16-48
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")  # IPv4-mapped
_COMPATIBLE = ipaddress.ip_network("::/96")  # IPv4-compatible (deprecated; includes :: and ::1)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (NAT64, 6to4, IPv4-mapped, IPv4-compatible), else None."""
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    if ip in _NAT64 or ip in _MAPPED or ip in _COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; an IPv6 address that embeds an IPv4
    address is public only when the IPv4 address is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope id never makes an address public
    if isinstance(ip, ipaddress.IPv6Address):
        carried = embedded_ipv4(ip)
        if carried is not None:
            ip = carried
    return ip.is_global and not ip.is_multicast


_is_public = is_public_address  # the name this module used before


def _static_checks(url: str, allowed_hosts: Iterable[str]) -> tuple[str, str, int, bool]:
    """(scheme, host, port, allowed) of a URL that passes the checks that need no DNS."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeTarget(f"notification URLs must be http or https, not {parts.scheme or 'none'!r}")
    if parts.username or parts.password:
        raise UnsafeTarget("notification URLs must not carry credentials")
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeTarget("notification URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise UnsafeTarget(f"notification URL has an invalid port: {err}") from err
    if host in {h.lower() for h in allowed_hosts}:
        return parts.scheme, host, port, True
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise UnsafeTarget(f"{host} is an internal host name")
    if _literal(host) and not is_public_address(host):
        raise UnsafeTarget(f"{host} is not a public address")
    return parts.scheme, host, port, False


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_target(url: str, allowed_hosts: Iterable[str] = (), resolve: bool = False) -> None:
    """Raise UnsafeTarget unless ``url`` is http(s) to a public host (or an allowed one).

    With ``resolve``, every address the host name resolves to must be public too. This
    only validates: to send, use :func:`resolve_target` and :func:`post_pinned`, which
    connect to the very address that was checked."""
    scheme, host, port, allowed = _static_checks(url, allowed_hosts)
    if resolve and not allowed and not _literal(host):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise UnsafeTarget(f"{host} does not resolve: {err}") from err
        for info in infos:
            if not is_public_address(str(info[4][0])):
                raise UnsafeTarget(f"{host} resolves to {info[4][0]}, which is not a public address")


# --- Sending to a vetted address ------------------------------------------------------

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the addresses the host name resolves to."""


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """A notification URL resolved once: requests go to ``address``, never to a new lookup."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]  # all checked; tried in this order

    @property
    def address(self) -> str:
        return self.addresses[0]


async def resolve_target(url: str, allowed_hosts: Iterable[str] = (), resolver: Resolver = system_resolver) -> Target:
    """Check ``url`` and resolve its host once; every address it resolves to must be public
    (unless the host is allowed). The returned target is pinned to these addresses."""
    scheme, host, port, allowed = _static_checks(url, allowed_hosts)
    if _literal(host):
        return Target(url, scheme, host, port, (host,))
    try:
        addresses = await resolver(host, port)
    except (OSError, UnicodeError) as err:
        raise UnsafeTarget(f"{host} does not resolve: {err}") from err
    if not addresses:
        raise UnsafeTarget(f"{host} does not resolve")
    if not allowed:
        for address in addresses:
            if not is_public_address(address):
                raise UnsafeTarget(f"{host} resolves to {address}, which is not a public address")
    return Target(url, scheme, host, port, tuple(dict.fromkeys(addresses)))


def pinned_request(
    client: httpx.AsyncClient, target: Target, content: bytes, headers: dict[str, str], address: str | None = None
) -> httpx.Request:
    """A POST to ``address`` (a checked address of the target) that still names the host:
    the Host header and, for https, the TLS server name (SNI and certificate check) are
    the URL's host."""
    url = httpx.URL(target.url).copy_with(host=address or target.address)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{_bracketed(target.host)}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return client.build_request("POST", url, content=content, headers={**headers, "Host": host_header}, extensions=extensions)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DeliveryFailed(Exception):
    """A notification that did not arrive. ``public`` is what a payment's timeline may say;
    ``detail`` (addresses, connection errors) is for operators only: logs and history."""

    def __init__(self, public: str, detail: str):
        super().__init__(public)
        self.public, self.detail = public, detail


async def post_pinned(
    url: str,
    content: bytes,
    headers: dict[str, str],
    *,
    allowed_hosts: Iterable[str] = (),
    resolver: Resolver = system_resolver,
    timeout: float | httpx.Timeout = 10.0,
) -> httpx.Response:
    """POST to a merchant URL: resolved once, checked, connected to the checked address,
    redirects never followed. Raises UnsafeTarget for a refused URL, DeliveryFailed when
    the endpoint cannot be reached or does not answer 2xx."""
    target = await resolve_target(url, allowed_hosts, resolver)
    response, errors = None, []
    # A client of its own: no connection pooled for another host, no proxy from the environment.
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for address in target.addresses:  # the checked addresses only; never a new lookup
            try:
                response = await client.send(pinned_request(client, target, content, headers, address), follow_redirects=False)
                break
            except httpx.HTTPError as err:
                errors.append(f"{address}: {type(err).__name__}: {err}")
                if not isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
                    break  # the request may have arrived: not sent again to another address
    if response is None:
        raise DeliveryFailed("the merchant endpoint could not be reached; resending with backoff", f"{url}: " + "; ".join(errors))
    if response.is_redirect:
        raise DeliveryFailed(
            f"the merchant endpoint answered HTTP {response.status_code} (a redirect, not followed); resending with backoff",
            f"{url} ({target.address}) answered HTTP {response.status_code} to {response.headers.get('location')!r}",
        )
    if not response.is_success:
        raise DeliveryFailed(
            f"the merchant endpoint answered HTTP {response.status_code}; resending with backoff",
            f"{url} ({target.address}) answered HTTP {response.status_code}",
        )
    return response


def public_failure(detail: str) -> str:
    """What a payment's public timeline says of a failed notification ("<kind>: <reason>"):
    the reasons this module words for the public are kept, anything else (a connection
    error or an address recorded by an older release) is replaced."""
    kind, _, reason = detail.partition(": ")
    for prefix in ("NotDelivered: ", "UnsafeTarget: "):
        reason = reason.removeprefix(prefix)
    if reason.startswith(PUBLIC_PREFIXES):
        return f"{kind}: {reason}"
    return f"{kind}: the merchant endpoint could not be reached (operators see why in the payment's history)"


def public_view(view: PaymentView) -> PaymentView:
    """A payment as an unauthenticated or merchant-facing view shows it: notification
    failures say what failed, never an address or a connection error."""
    if not any(entry.event == "notification failed" for entry in view.timeline):
        return view
    timeline = [
        entry.model_copy(update={"detail": public_failure(entry.detail)}) if entry.event == "notification failed" else entry
        for entry in view.timeline
    ]
    return view.model_copy(update={"timeline": timeline})


UNSAFE_PUBLIC = "notify_url refused: it does not point to a public http(s) address"
PUBLIC_PREFIXES = ("the merchant endpoint answered HTTP ", "the merchant endpoint could not be reached", UNSAFE_PUBLIC)


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
    NotifyKind.REFUND_STARTED: "The money goes back to the account you paid with; banks usually show it within 1-5 working days.",
    NotifyKind.REFUNDED: "The refund is complete on our side; your bank shows it within 1-5 working days.",
    NotifyKind.IN_REVIEW: "Our team is checking the payment. You do not need to do anything or pay again; "
    "we will write to you with the outcome.",
}


def compose(n: NotificationInput) -> tuple[str, str]:
    """(subject, body) of the customer's message."""
    amount = f"{to_major(n.amount_minor, n.currency)} {n.currency}"
    subject = SUBJECTS[n.kind].format(order=n.order_id, amount=amount)
    body = "\n".join(
        [
            subject + ".",
            "",
            f"Order number: {n.order_id}",
            f"Amount: {amount}",
            f"What happened: {n.detail}",
            f"What happens next: {NEXT_STEPS[n.kind]}",
        ]
    )
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
        subject = head + (
            f": {incident.rate:g} differences need a person (threshold {incident.threshold:g})"
            if what == "unresolved"
            else ": failed"
        )
        next_step = (
            f"`paysentinel reconcile show --date {day}` lists each difference and what was done; the unresolved "
            "ones say what they need."
            if what == "unresolved"
            else "Fix what the error says (a bill that cannot be read: ask the provider for a corrected one; a provider "
            f"that does not answer: wait for it), then `paysentinel reconcile run --date {day}`."
        )
        body = "\n".join(
            [subject + ".", "", incident.detail, f"What to do: {next_step} Reconciling a day again repairs nothing twice."]
        )
        return subject, body
    if incident.kind == "stuck_payments":  # the monitor's stuck money: a count, not a rate
        return compose_stuck_alert(incident)
    if incident.kind == "child_failed":  # a payment's refund or review workflow failed
        if incident.status != "OPEN":
            subject = "[paysentinel] resolved: a payment's child workflows have finished"
            return subject, f"{subject}.\n\nWhen it opened: {incident.detail}\nWhat to do: nothing."
        subject = "[paysentinel] a refund or review workflow of a payment failed"
        return subject, "\n".join(
            [
                subject + ".",
                "",
                incident.detail,
                "What the payment did: a refund was started again with the same provider refund id (the provider "
                "refunds it once), a review was opened again; after three failures a refund goes to a person and a "
                "review applies its safe default.",
                "What to do: open the payment in the Temporal Web UI and read why the child failed (terminated, timed "
                "out, id in use); `paysentinel review list` shows what waits for a person.",
            ]
        )
    if incident.status == "OPEN":
        subject = f"[paysentinel] {name} {incident.rate:.1%} is above {incident.threshold:.1%} (monitor {incident.monitor})"
        next_step = (
            'Find the failed or closed payments in the Temporal Web UI (PaymentStatus = "FAILED" or '
            '"CLOSED") and read their histories: provider errors, rejections or callbacks that never came. '
            "You get one message per incident, and another when it is over."
        )
    else:
        subject = f"[paysentinel] resolved: {name} back under {incident.threshold:.1%} (monitor {incident.monitor})"
        next_step = "Nothing to do; the incident is closed."
    return subject, _incident_body(incident, subject, f"Highest rate seen: {incident.peak_rate:.1%}", next_step)


def _incident_body(incident: Incident, subject: str, peak: str, next_step: str) -> str:
    """An incident's message: what opened it, its worst figure, when it ended, what to do."""
    return "\n".join(
        [
            subject + ".",
            "",
            f"Incident: {incident.id} ({incident.kind}), opened {incident.opened_at:%Y-%m-%d %H:%M:%S} UTC",
            f"When opened: {incident.detail}",
            peak,
            *([f"Resolved: {incident.resolved_at:%Y-%m-%d %H:%M:%S} UTC"] if incident.resolved_at else []),
            f"What to do: {next_step}",
        ]
    )


def compose_stuck_alert(incident: Incident) -> tuple[str, str]:
    """(subject, body) of the stuck-money alert: which payments, and where to look."""
    if incident.status == "OPEN":
        subject = f"[paysentinel] {incident.rate:g} payments stuck: money is not moving (monitor {incident.monitor})"
        next_step = (
            "`paysentinel payment show <order>` and the payment's history in the Temporal Web UI "
            '(WorkflowId STARTS_WITH "<payment id>" lists it with its refunds and reviews). '
            "CREATED/PENDING past the time to live: is a worker running? REFUNDING/IN_REVIEW without a running "
            "refund or review workflow: the child ended (terminated, timed out) without its parent recording an "
            "outcome; settle the money with the provider and correct the payment. A refund PROCESSING past the "
            "provider's limit: ask the provider about that refund id. "
            "You get one message per incident, and another when it is over."
        )
    else:
        subject = f"[paysentinel] resolved: no payments stuck (monitor {incident.monitor})"
        next_step = "Nothing to do; the incident is closed."
    return subject, _incident_body(incident, subject, f"Most stuck at once: {incident.peak_rate:g}", next_step)
