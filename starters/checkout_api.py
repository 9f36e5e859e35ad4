"""Checkout API: the checkout service starts payments here and reads their status.

POST /payments                start (idempotent by order id) -> payment id, status, pay URL
GET  /payments/{id}           status, refunds and timeline
POST /payments/{id}/refunds   refund part or all of a paid payment (idempotent by Idempotency-Key)
GET  /callbacks               verified callbacks that could not be delivered to a payment
(The operator API is not served here: it has its own listener, see starters/operator_api.py.)
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Literal, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from temporalio.client import WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from paysentinel import db, tracing
from paysentinel.config import Settings, timing_from
from paysentinel.models import (
    ORDER_ID_PATTERN,
    CheckoutRequest,
    PaymentInput,
    PaymentStatus,
    PaymentView,
    RefundCommand,
    RefundCreate,
    RefundView,
)
from paysentinel.notify import UnsafeTarget, check_target, public_view
from paysentinel.providers import SUPPORTED_PROVIDERS
from paysentinel.logs import bind
from starters.limits import add_abuse_limits
from starters.common import (
    Resources,
    add_metrics,
    error_body,
    lifespan_for,
    readable_validation_error,
    resources,
    update_error,
)
from workflows.payment import AMOUNT_MINOR, CURRENCY, ORDER_ID, PAYMENT_STATUS, PROVIDER, PaymentWorkflow, payment_workflow_id

log = logging.getLogger("paysentinel.api")


def view_from_row(row: db.Payment) -> PaymentView:
    return PaymentView(
        payment_id=row.payment_id,
        order_id=row.order_id,
        status=PaymentStatus(row.status),
        amount_minor=row.amount_minor,
        currency=row.currency,
        provider=row.provider,
        pay_url=row.pay_url,
        trade_no=row.trade_no,
        reason=row.reason,
        review_reason=row.review_reason,
        expires_at=row.expires_at,
    )


async def start_payment(res: Resources, request: CheckoutRequest) -> tuple[PaymentView, bool]:
    """Record the order and start (or find) its workflow. Returns (view, created)."""
    settings = res.settings
    payment_id = payment_workflow_id(request.order_id)
    ttl = request.expires_in_seconds or settings.payment_ttl_seconds
    row, created = await db.claim_order(
        res.sessions, payment_id, request, datetime.now(timezone.utc) + timedelta(seconds=ttl)
    )
    stored_request = request if created else request.model_copy(update={"subject": row.subject})
    try:
        handle = await res.client.start_workflow(
            PaymentWorkflow.run,
            PaymentInput(
                payment_id=payment_id,
                request=stored_request,
                notify_url=f"{settings.effective_webhook_base_url}/webhooks/{request.provider}",
                timing=timing_from(settings),
            ),
            id=payment_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(PAYMENT_STATUS, PaymentStatus.CREATED.value),
                    SearchAttributePair(ORDER_ID, request.order_id),
                    SearchAttributePair(PROVIDER, request.provider),
                    SearchAttributePair(AMOUNT_MINOR, request.amount_minor),
                    SearchAttributePair(CURRENCY, request.currency),
                ]
            ),
            static_summary=f"Payment for order {request.order_id}",
        )
    except WorkflowAlreadyStartedError:
        handle = res.client.get_workflow_handle(payment_id)  # an earlier, finished run of this order
    try:
        view = await asyncio.wait_for(
            handle.execute_update(PaymentWorkflow.checkout), timeout=settings.checkout_wait_seconds
        )
        return view, created
    except (asyncio.TimeoutError, WorkflowUpdateFailedError, RPCError) as err:
        log.info("payment %s: answering from the database (%s)", payment_id, type(err).__name__)
    async with res.sessions() as session:
        row = await session.get(db.Payment, payment_id)
    return view_from_row(row), created


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="paysentinel checkout API", version="0.1.0", lifespan=lifespan_for(settings))
    app.add_exception_handler(RequestValidationError, readable_validation_error)
    app.add_exception_handler(HTTPException, error_body)
    add_metrics(app)
    add_abuse_limits(app, settings, "payments")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/payments", response_model=PaymentView, status_code=201)
    async def create_payment(
        request: CheckoutRequest, response: Response, res: Resources = Depends(resources)
    ) -> PaymentView:
        bind(payment_workflow_id(request.order_id))
        if request.provider not in SUPPORTED_PROVIDERS:
            raise HTTPException(422, f"unknown provider {request.provider!r}; supported: {', '.join(SUPPORTED_PROVIDERS)}")
        if request.notify_url:
            try:
                check_target(request.notify_url, res.settings.notify_allowed_hosts)
            except UnsafeTarget as err:
                raise HTTPException(422, f"notify_url rejected: {err}") from err
        try:
            with tracing.tracer.start_as_current_span(
                "checkout", attributes={"paysentinel.order_id": request.order_id, "paysentinel.provider": request.provider}
            ):
                view, created = await start_payment(res, request)
        except db.OrderConflict as err:
            raise HTTPException(409, str(err)) from err
        if not created:
            response.status_code = 200
        return view

    @app.get("/payments/{payment_id}", response_model=PaymentView)
    async def get_payment(payment_id: str, res: Resources = Depends(resources)) -> PaymentView:
        bind(payment_id)
        async with res.sessions() as session:
            row = await session.get(db.Payment, payment_id)
        if row is None:
            raise HTTPException(404, f"no payment {payment_id!r}; payment ids look like 'payment-<order id>'")
        try:
            view = await asyncio.wait_for(res.client.get_workflow_handle(payment_id).query(PaymentWorkflow.view), 5)
            return public_view(view)  # a notification failure's detail is for operators (history, logs)
        except Exception as err:  # timeout, worker down, query failed: the row alone is still correct
            log.info("payment %s: answering from the database (%s)", payment_id, err)
            return view_from_row(row)

    @app.post("/payments/{payment_id}/refunds", response_model=RefundView, status_code=202)
    async def refund_payment(
        payment_id: str,
        body: RefundCreate,
        idempotency_key: str = Header(
            ..., pattern=r"^[A-Za-z0-9_\-]{1,24}$",
            description="Your key for this refund: the same key again returns the same refund",
        ),
        res: Resources = Depends(resources),
    ) -> RefundView:
        bind(payment_id)
        async with res.sessions() as session:
            if await session.get(db.Payment, payment_id) is None:
                raise HTTPException(404, f"no payment {payment_id!r}; payment ids look like 'payment-<order id>'")
        command = RefundCommand(key=idempotency_key, amount_minor=body.amount_minor, reason=body.reason)
        try:
            return await res.client.get_workflow_handle(payment_id).execute_update(PaymentWorkflow.refund, command)
        except (WorkflowUpdateFailedError, RPCError) as err:
            raise update_error(err, f"payment {payment_id}") from err

    @app.get("/callbacks")
    async def list_callbacks(
        delivery: Optional[Literal["pending", "delivered", "unknown_payment", "payment_completed"]] = None,
        order_id: Optional[str] = Query(None, pattern=ORDER_ID_PATTERN),
        limit: int = Query(100, ge=1, le=1000),
        res: Resources = Depends(resources),
    ) -> list[dict]:
        query = select(db.Callback).order_by(db.Callback.id.desc()).limit(limit)
        if delivery:
            query = query.where(db.Callback.delivery == delivery)
        if order_id:
            query = query.where(db.Callback.order_id == order_id)
        async with res.sessions() as session:
            rows = (await session.scalars(query)).all()
        return [
            {
                "event_id": r.event_id, "provider": r.provider, "order_id": r.order_id, "payment_id": r.payment_id,
                "trade_status": r.trade_status, "delivery": r.delivery, "delivery_error": r.delivery_error,
                "received_at": r.received_at, "delivered_at": r.delivered_at,
            }
            for r in rows
        ]

    return app
