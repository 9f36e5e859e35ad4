"""Webhook receiver: turns each verified provider callback into a workflow signal.

Order of checks: size (413) -> signature and timestamp over the raw body (401) ->
body shape (400). Nothing is stored or changed for a rejected request. A verified
callback is stored first (deduplicated by the provider's event id), then signalled to
its payment's workflow; we answer 2xx only once it is durably accepted, so the
provider resends otherwise. A verified callback for an unknown or finished payment
is stored and surfaced (GET /callbacks on the API), never dropped.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request, Response
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from temporalio.service import RPCError, RPCStatusCode

from paysentinel import db, metrics
from paysentinel.config import Settings
from paysentinel.models import CallbackOutcome, ProviderCallback
from paysentinel.providers import CallbackIgnored, MalformedCallback
from paysentinel.signing import SignatureError
from paysentinel.logs import bind
from starters.common import Resources, add_metrics, error_body, lifespan_for
from starters.backpressure import add_overload_answers
from starters.limits import add_abuse_limits
from paysentinel.names import payment_workflow_id
from workflows.payment import PaymentWorkflow

log = logging.getLogger("paysentinel.webhooks")


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body exceeds the {limit}-byte limit")
    return bytes(body)


async def store(res: Resources, event: ProviderCallback, raw: bytes) -> tuple[db.Callback | None, db.Payment | None]:
    """Insert the callback and find its payment, in one transaction. The callback is None when
    this event id was already settled (then nothing else is read)."""
    async with res.sessions() as session:
        row: db.Callback | None = db.Callback(
            provider=event.provider,
            event_id=event.event_id,
            order_id=event.order_id,
            trade_status=event.trade_status.value,
            raw_body=raw.decode("utf-8", "replace"),
            signature_verified=True,
            delivery="pending",
            received_at=event.received_at,
        )
        session.add(row)
        try:
            await session.flush()
        except IntegrityError:
            await session.rollback()
            existing = await session.scalar(
                select(db.Callback).where(db.Callback.provider == event.provider, db.Callback.event_id == event.event_id)
            )
            # A resend of an event whose delivery failed earlier is delivered again.
            row = existing if existing is not None and existing.delivery == "pending" else None
            if row is None:
                return None, None
        payment = await session.scalar(
            select(db.Payment).where(db.Payment.order_id == event.order_id, db.Payment.provider == event.provider)
        )
        await session.commit()
        return row, payment


async def mark(res: Resources, row_id: int, **values: object) -> None:
    async with res.sessions() as session:
        await session.execute(update(db.Callback).where(db.Callback.id == row_id).values(**values))
        await session.commit()


async def deliver(res: Resources, event: ProviderCallback, raw: bytes) -> CallbackOutcome:
    row, payment = await store(res, event, raw)
    if row is None:
        return CallbackOutcome(result="duplicate", event_id=event.event_id)
    if payment is None:
        await mark(res, row.id, delivery="unknown_payment")
        log.warning("verified callback %s for unknown order %s stored for review", event.event_id, event.order_id)
        return CallbackOutcome(result="unknown_payment", event_id=event.event_id)
    try:
        await res.client.get_workflow_handle(payment.payment_id).signal(PaymentWorkflow.callback, event)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            await mark(res, row.id, payment_id=payment.payment_id, delivery="payment_completed", delivery_error=err.message)
            log.warning("callback %s for finished payment %s stored for review", event.event_id, payment.payment_id)
            return CallbackOutcome(result="payment_completed", event_id=event.event_id, payment_id=payment.payment_id)
        await mark(res, row.id, payment_id=payment.payment_id, delivery_error=f"{err.status}: {err.message}")
        raise HTTPException(503, "payment workflow unreachable; the callback is stored and will be accepted on resend") from err
    await mark(res, row.id, payment_id=payment.payment_id, delivery="delivered", delivered_at=db.utcnow())
    return CallbackOutcome(result="delivered", event_id=event.event_id, payment_id=payment.payment_id)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="paysentinel webhook receiver", version="0.1.0", lifespan=lifespan_for(settings))
    app.add_exception_handler(HTTPException, error_body)  # type: ignore[arg-type]
    add_metrics(app)
    add_abuse_limits(app, settings, "webhooks")
    add_overload_answers(app, "webhooks", settings.retry_after_seconds)  # the provider resends

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/{provider}", response_model=CallbackOutcome)
    async def receive(provider: str, request: Request) -> Response:
        """Each provider is answered in its own protocol (``Provider.callback_reply``)."""
        res: Resources = request.app.state.resources
        adapter = res.providers.get(provider)
        if adapter is None:
            raise HTTPException(404, f"unknown provider {provider!r}")

        def reply(status: int, detail: object) -> Response:
            answer = adapter.callback_reply(status, detail)
            return Response(answer.body, answer.status, headers=answer.headers, media_type=answer.media_type)

        try:
            raw = await read_limited(request, settings.webhook_max_body_bytes)
        except HTTPException as err:
            metrics.callbacks.labels(provider, "rejected_too_large").inc()
            return reply(err.status_code, err.detail)
        try:
            event = adapter.parse_callback(request.headers, raw)
        except SignatureError as err:
            log.warning("rejected %s callback: %s", provider, err)
            metrics.callbacks.labels(provider, "rejected_signature").inc()
            return reply(401, f"signature check failed: {err}")
        except MalformedCallback as err:
            log.warning("rejected %s callback: %s", provider, err)
            metrics.callbacks.labels(provider, "rejected_malformed").inc()
            return reply(400, str(err))
        except CallbackIgnored as err:
            log.info("acknowledged %s notification without delivering it: %s", provider, err)
            metrics.callbacks.labels(provider, "ignored").inc()
            return reply(200, {"result": "ignored", "detail": str(err)})
        bind(payment_workflow_id(event.order_id))
        try:
            outcome = await deliver(res, event, raw)
        except HTTPException as err:
            metrics.callbacks.labels(provider, "not_accepted").inc()
            return reply(err.status_code, err.detail)
        except (SQLAlchemyError, OSError) as err:
            # The database is unreachable: nothing stored, so the provider must send it again.
            log.warning(
                "callback %s for order %s not accepted: the database is unavailable (%s)",
                event.event_id,
                event.order_id,
                type(err).__name__,
            )
            metrics.callbacks.labels(provider, "not_accepted").inc()
            return reply(503, "the database is unavailable; the callback was not stored and will be accepted on resend")
        metrics.callbacks.labels(provider, outcome.result).inc()
        log.info("callback %s for order %s: %s", event.event_id, event.order_id, outcome.result)
        return reply(200, outcome.model_dump(mode="json"))

    return app
