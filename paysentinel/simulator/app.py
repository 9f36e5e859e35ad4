"""The provider simulator's HTTP service.

Provider API (what the worker calls), shaped after Alipay's trade API:

- ``POST /v1/trades`` create a trade; idempotent by ``out_trade_no`` (the merchant's
  order number): the same order with the same amount returns the existing trade, with
  a different amount it is ``ACQ.CONTEXT_INCONSISTENT``.
- ``GET /v1/trades/{out_trade_no}`` query; ``ACQ.TRADE_NOT_EXIST`` when unknown.
- ``POST /v1/trades/{out_trade_no}/close`` close an unpaid trade; a paid one answers
  ``ACQ.TRADE_STATUS_ERROR`` with the trade, so the caller learns it was paid.

- ``POST /v1/trades/{out_trade_no}/refunds`` refund part or all of a paid trade
  (``trade_no`` picks one of the order's trades); idempotent by ``out_request_no``;
  never more than the trade's total; a failed refund is retried by submitting the same
  ``out_request_no`` again.
- ``GET /v1/trades/{out_trade_no}/refunds/{out_request_no}`` query a refund.

Every status change produces an event ``evt_...`` sent to the trade's ``notify_url``,
signed in the Standard Webhooks scheme and resent with backoff until acknowledged.

Control API (what tests, the demo and people call): ``PUT /control/scripts/{order}``
scripts an order's behaviour, ``GET /control/trades/{order}`` shows the trade, the
calls the provider received and every callback delivery, ``POST
/control/trades/{order}/pay`` makes the payer pay now. ``/pay/{trade_no}`` is the
cashier page a payer opens from the pay URL. ``GET /control/ledger/{order}`` is the
provider's books for the order: captured over its paid trades, refunded over its
successful refunds, net (minor units); ``GET /control/ledger?order=a&order=b`` gives
the books of several orders at once.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from paysentinel.config import Settings
from paysentinel.simulator.cashier import add_cashier_routes
from paysentinel.simulator.control import add_control_routes
from paysentinel.simulator.provider import Provider
from paysentinel.simulator.provider_api import add_provider_routes
from paysentinel.simulator.trades import _error


def create_app(settings: Settings) -> FastAPI:
    provider = Provider(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=5) as http:
            provider.http = http
            yield
            await provider.shutdown()

    app = FastAPI(
        title="paysentinel provider simulator",
        lifespan=lifespan,
        description="Alipay-like trades with scripted behaviour, for development and tests.",
    )
    app.state.provider = provider

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return _error(400, "ACQ.INVALID_PARAMETER", "; ".join(problems))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    add_provider_routes(app, provider, settings)
    add_control_routes(app, provider)
    add_cashier_routes(app, provider)

    return app
