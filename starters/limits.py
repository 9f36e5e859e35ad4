"""Abuse limits on the routes anyone can call: POST /payments and POST /webhooks/{provider}.

Each request counts against two token buckets (paysentinel/ratelimit.py): its client's
(the credential it sends in ``Authorization``, else its address) and its address's (an
IPv6 address counts by its /64). Over either, it is answered 429 with ``Retry-After``
before its body is read or anything is stored or started.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Literal

from fastapi import FastAPI
from prometheus_client import Counter
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from paysentinel.config import Settings
from paysentinel.ratelimit import Limit, RateLimiter, admit

log = logging.getLogger("paysentinel.limits")

limited = Counter("paysentinel_rate_limited_total", "Requests refused by an abuse limit (429)", ["route", "limit"])

Route = Literal["payments", "webhooks"]


def limits_from(settings: Settings, route: Route) -> tuple[Limit, Limit]:
    """(per client, per address) of a route, from the settings."""
    if route == "payments":
        return (
            Limit(settings.rate_limit_payments_per_second, settings.rate_limit_payments_burst),
            Limit(settings.rate_limit_payments_address_per_second, settings.rate_limit_payments_address_burst),
        )
    return (
        Limit(settings.rate_limit_webhooks_per_second, settings.rate_limit_webhooks_burst),
        Limit(settings.rate_limit_webhooks_address_per_second, settings.rate_limit_webhooks_address_burst),
    )


def address_key(host: str) -> str:
    """The remote address as a bucket key; IPv6 by its /64 (one subscriber's block)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_key(headers: dict[bytes, bytes], address: str) -> str:
    credential = headers.get(b"authorization")
    if credential:
        return "credential:" + hashlib.sha256(credential).hexdigest()[:32]
    return "address:" + address


class AbuseLimits:
    """ASGI middleware: the limits of one route (``POST`` to paths that ``matches``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        route: Route,
        matches: Callable[[str], bool],
        client: Limit,
        address: Limit,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.app, self.route, self.matches, self.clock = app, route, matches, clock
        self.clients, self.addresses = RateLimiter(client), RateLimiter(address)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.matches(scope["path"]):
            await self.app(scope, receive, send)
            return
        address = address_key((scope.get("client") or ("unknown", 0))[0])
        headers = dict(scope["headers"])
        refusal = admit(
            [("client", self.clients, client_key(headers, address)), ("address", self.addresses, address)], self.clock()
        )
        if refusal is None:
            await self.app(scope, receive, send)
            return
        limited.labels(self.route, refusal.name).inc()
        log.info("%s %s from %s refused: %s limit", scope["method"], scope["path"], address, refusal.name)
        who = "this client" if refusal.name == "client" else "this address"
        body = {
            "error": f"too many requests: {who} may make {refusal.limit.per_second:g} per second "
            f"(bursts of {refusal.limit.burst}) to {scope['path']}; retry after "
            f"{refusal.retry_after_header} s. Nothing was done with this request.",
            "limit": refusal.name,
            "retry_after_seconds": round(refusal.retry_after, 3),
        }
        response = JSONResponse(status_code=429, content=body, headers={"Retry-After": refusal.retry_after_header})
        await response(scope, receive, send)


def _payments(path: str) -> bool:
    return path.rstrip("/") == "/payments"


def _webhooks(path: str) -> bool:
    return path.startswith("/webhooks/")


def add_abuse_limits(app: FastAPI, settings: Settings, route: Route) -> None:
    """Limit POST /payments (``payments``) or POST /webhooks/{provider} (``webhooks``)."""
    client, address = limits_from(settings, route)
    app.add_middleware(
        AbuseLimits, route=route, matches=_payments if route == "payments" else _webhooks, client=client, address=address
    )
