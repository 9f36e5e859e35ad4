"""Back-pressure: an overloaded API answers 503 with ``Retry-After``, never a 500.

``Admission`` bounds the checkouts one API process runs at once (a semaphore with a short
wait for a slot). ``add_overload_answers`` turns what an overloaded Temporal or database
raises (an RPC that was refused, timed out or cancelled; a database pool that is exhausted
or a SQLite file that stays locked) into 503 with ``Retry-After`` on every route.

A checkout refused this way may have recorded the order already: retrying it with the same
order id is safe (POST /payments is idempotent by order id) and starts its payment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeoutError
from temporalio.client import RPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

log = logging.getLogger("paysentinel.backpressure")

overloaded = Counter("paysentinel_overloaded_total", "Requests answered 503 because the system was busy", ["route", "reason"])

# RPC statuses that say "busy or unreachable, try again" rather than "this request is wrong".
BUSY_STATUSES = frozenset(
    {
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.ABORTED,
    }
)


class Overloaded(Exception):
    """Answered 503 with Retry-After."""

    def __init__(self, message: str, reason: str, retry_after: int = 1):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class Admission:
    """At most ``limit`` requests at once; one more waits up to ``wait_seconds`` for a slot."""

    def __init__(self, limit: int, wait_seconds: float, retry_after: int = 1):
        self.limit, self.wait_seconds, self.retry_after = limit, wait_seconds, retry_after
        self._slots = asyncio.Semaphore(limit)
        self.in_flight = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_seconds)
        except asyncio.TimeoutError:
            raise Overloaded(
                f"busy: {self.limit} checkouts are in progress on this server; retry after {self.retry_after} s "
                "with the same order id",
                "in_flight",
                self.retry_after,
            ) from None
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()


def is_busy(err: BaseException) -> bool:
    """Whether ``err`` is Temporal or the database being too busy (or away) to take a request."""
    if isinstance(err, (RPCTimeoutOrCancelledError, PoolTimeoutError, OperationalError, asyncio.TimeoutError, ConnectionError)):
        return True
    return isinstance(err, RPCError) and err.status in BUSY_STATUSES


def add_overload_answers(app: FastAPI, route: str, retry_after: int = 1) -> None:
    """503 + Retry-After for ``Overloaded`` and for Temporal or database overload anywhere in ``app``."""

    async def answer(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, Overloaded):
            reason, wait, message = exc.reason, exc.retry_after, str(exc)
        elif is_busy(exc):
            reason, wait = type(exc).__name__, retry_after
            message = (
                f"busy: Temporal or the database did not take the request in time ({type(exc).__name__}); "
                f"retry after {wait} s" + (" with the same order id" if route == "payments" else "")
            )
        else:  # not overload: a real error, the usual 500
            raise exc
        overloaded.labels(route, reason).inc()
        log.warning("%s %s answered 503: %s", request.method, request.url.path, message)
        return JSONResponse(
            status_code=503, content={"error": message, "retry_after_seconds": wait}, headers={"Retry-After": str(wait)}
        )

    for kind in (Overloaded, RPCTimeoutOrCancelledError, RPCError, PoolTimeoutError, OperationalError):
        app.add_exception_handler(kind, answer)
