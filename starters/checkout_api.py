"""Checkout API: the checkout service starts payments here and reads their status.

POST /payments                start (idempotent by order id) -> payment id, status, pay URL
GET  /payments/{id}           status, refunds and timeline
POST /payments/{id}/refunds   refund part or all of a paid payment (idempotent by Idempotency-Key)
GET  /callbacks               verified callbacks that could not be delivered to a payment

Every route but /health, /metrics and the docs needs ``Authorization: Bearer <merchant API key>``
with a scope: POST /payments ``payments``, refunds ``refunds``, the reads ``read`` (401 without a
valid key, 403 naming the missing scope). A merchant sees only its own payments: another
merchant's payment answers 404 exactly like an unknown one. The merchant's ``order_id`` becomes
the internal order number ``<merchant>-<order>`` (the workflow's, the provider's, the operators');
every view here shows the merchant's own order id again. See paysentinel/merchants.py.
(The operator API is not served here: it has its own listener, see starters/operator_api.py.)
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from paysentinel import db, tracing
from paysentinel.merchants import INTERNAL_ORDER_MAX, Caller, authenticate, internal_order, merchant_order
from paysentinel.config import Settings, timing_from
from paysentinel.models import (
    ORDER_ID_PATTERN,
    CheckoutRequest,
    PaymentInput,
    PaymentOrder,
    PaymentStatus,
    PaymentView,
    RefundCommand,
    RefundCreate,
    RefundView,
)
from paysentinel.notify import UnsafeTarget, check_target, public_view
from paysentinel.logs import bind
from starters.backpressure import Admission, add_overload_answers
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
from paysentinel.names import payment_workflow_id
from paysentinel.projection import AMOUNT_MINOR, CURRENCY, ORDER_ID, PAYMENT_STATUS, PROVIDER
from workflows.payment import PaymentWorkflow

log = logging.getLogger("paysentinel.api")
bearer = HTTPBearer(auto_error=False)
UNAUTHENTICATED = (
    "merchant API key missing, unknown or revoked: send 'Authorization: Bearer <merchant API key>'; "
    "create one with `paysentinel key create --merchant M --scope payments`"
)


def merchant_key(scope: str):
    """A dependency: the caller of a valid, unrevoked merchant key holding ``scope``."""

    async def caller(
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer), res: Resources = Depends(resources)
    ) -> Caller:
        found = await authenticate(res.sessions, credentials.credentials) if credentials else None
        if found is None:
            raise HTTPException(401, UNAUTHENTICATED, headers={"WWW-Authenticate": "Bearer"})
        if scope not in found.scopes:
            raise HTTPException(
                403,
                f"key {found.key_id} of merchant {found.merchant_id} lacks the scope {scope!r} "
                f"(it has: {', '.join(found.scopes) or 'none'}); create a key with it: "
                f"`paysentinel key create --merchant {found.merchant_id} --scope {scope}`",
            )
        return found

    return caller


def unknown_payment(payment_id: str) -> HTTPException:
    """The same answer for a payment that does not exist and one of another merchant."""
    return HTTPException(404, f"no payment {payment_id!r}; payment ids are the payment_id POST /payments answered")


def merchant_view(view: PaymentView, merchant_id: str) -> PaymentView:
    """A view as the merchant sees it: its own order id, not the internal order number."""
    return view.model_copy(update={"order_id": merchant_order(merchant_id, view.order_id)})


async def own_payment(res: Resources, caller: Caller, payment_id: str) -> db.Payment:
    async with res.sessions() as session:
        row = await session.get(db.Payment, payment_id)
    if row is None or row.merchant_id != caller.merchant_id:
        raise unknown_payment(payment_id)
    return row


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


async def start_payment(res: Resources, request: CheckoutRequest, merchant_id: str) -> tuple[PaymentView, bool]:
    """Record the order and start (or find) its workflow. ``request`` carries the internal order
    number (``<merchant>-<order>``). Returns (view, created); the view shows the internal number."""
    settings = res.settings
    payment_id = payment_workflow_id(request.order_id)
    ttl = request.expires_in_seconds or settings.payment_ttl_seconds
    row, created = await db.claim_order(
        res.sessions, payment_id, request, datetime.now(timezone.utc) + timedelta(seconds=ttl), merchant_id
    )
    stored_request = request if created else request.model_copy(update={"subject": row.subject})
    start: dict[str, Any] = dict(
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
    payment_input = PaymentInput(
        payment_id=payment_id,
        request=PaymentOrder.of(stored_request),  # the workflow's own model, apart from the API's
        notify_url=f"{settings.effective_webhook_base_url}/webhooks/{request.provider}",
        timing=timing_from(settings),
    )
    # Start the workflow and wait for its pay URL in one request (update-with-start): the
    # checkout update reaches the payment in its first workflow task.
    try:
        view = await asyncio.wait_for(
            res.client.execute_update_with_start_workflow(
                PaymentWorkflow.checkout,
                start_workflow_operation=WithStartWorkflowOperation(PaymentWorkflow.run, payment_input, **start),
            ),
            timeout=settings.checkout_wait_seconds,
        )
        return view, created
    except WorkflowAlreadyStartedError:
        log.info("payment %s: an earlier, finished run; answering from the database", payment_id)
    except (asyncio.TimeoutError, WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as err:
        # The payment is recorded; its workflow runs (started below if need be): the row says where it is.
        log.info("payment %s: answering from the database (%s)", payment_id, type(err).__name__)
        # The workflow must run even if the request above never reached the server (starting is idempotent).
        try:
            await res.client.start_workflow(PaymentWorkflow.run, payment_input, **start)
        except WorkflowAlreadyStartedError:
            pass
    async with res.sessions() as session:
        current = await session.get(db.Payment, payment_id)
    assert current is not None, f"payment {payment_id} was recorded above"
    return view_from_row(current), created


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="paysentinel checkout API", version="0.1.0", lifespan=lifespan_for(settings))
    app.add_exception_handler(RequestValidationError, readable_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, error_body)  # type: ignore[arg-type]
    add_metrics(app)
    add_abuse_limits(app, settings, "payments")
    add_overload_answers(app, "payments", settings.retry_after_seconds)
    checkouts = Admission(settings.checkout_concurrency, settings.checkout_queue_seconds, settings.retry_after_seconds)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/payments", response_model=PaymentView, status_code=201)
    async def create_payment(
        request: CheckoutRequest,
        response: Response,
        res: Resources = Depends(resources),
        caller: Caller = Depends(merchant_key("payments")),
    ) -> PaymentView:
        merchant = caller.merchant_id
        internal = request.model_copy(update={"order_id": internal_order(merchant, request.order_id)})
        if len(internal.order_id) > INTERNAL_ORDER_MAX:
            raise HTTPException(
                422,
                f"order_id is too long: merchant {merchant}'s order ids have at most "
                f"{INTERNAL_ORDER_MAX - len(merchant) - 1} characters",
            )
        bind(payment_workflow_id(internal.order_id))
        adapter = res.providers.get(request.provider)
        if adapter is None:
            raise HTTPException(
                422, f"unknown provider {request.provider!r}; this deployment takes {', '.join(res.providers) or 'none'}"
            )
        if (problem := adapter.check_order(internal.order_id, request.amount_minor, request.currency)) is not None:
            raise HTTPException(422, f"{request.provider} cannot take this order: {problem}")
        if request.notify_url:
            try:
                check_target(request.notify_url, res.settings.notify_allowed_hosts)
            except UnsafeTarget as err:
                raise HTTPException(422, f"notify_url rejected: {err}") from err
        try:
            with tracing.tracer.start_as_current_span(
                "checkout", attributes={"paysentinel.order_id": internal.order_id, "paysentinel.provider": request.provider}
            ):
                async with checkouts.slot():
                    view, created = await start_payment(res, internal, merchant)
        except db.OrderConflict as err:
            raise HTTPException(409, str(db.OrderConflict(request.order_id, err.differences))) from err
        if not created:
            response.status_code = 200
        return merchant_view(view, merchant)

    @app.get("/payments/{payment_id}", response_model=PaymentView)
    async def get_payment(
        payment_id: str, res: Resources = Depends(resources), caller: Caller = Depends(merchant_key("read"))
    ) -> PaymentView:
        bind(payment_id)
        row = await own_payment(res, caller, payment_id)
        try:
            view = await asyncio.wait_for(res.client.get_workflow_handle(payment_id).query(PaymentWorkflow.view), 5)
            view = public_view(view)  # a notification failure's detail is for operators (history, logs)
        except Exception as err:  # timeout, worker down, query failed: the row alone is still correct
            log.info("payment %s: answering from the database (%s)", payment_id, err)
            view = view_from_row(row)
        return merchant_view(view, caller.merchant_id)

    @app.post("/payments/{payment_id}/refunds", response_model=RefundView, status_code=202)
    async def refund_payment(
        payment_id: str,
        body: RefundCreate,
        idempotency_key: str = Header(
            ...,
            pattern=r"^[A-Za-z0-9_\-]{1,24}$",
            description="Your key for this refund: the same key again returns the same refund",
        ),
        res: Resources = Depends(resources),
        caller: Caller = Depends(merchant_key("refunds")),
    ) -> RefundView:
        bind(payment_id)
        await own_payment(res, caller, payment_id)
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
        caller: Caller = Depends(merchant_key("read")),
    ) -> list[dict]:
        """The merchant's own callbacks: those for its order numbers (``<merchant>-...``)."""
        merchant = caller.merchant_id
        query = (
            select(db.Callback)
            .where(db.Callback.order_id.startswith(f"{merchant}-", autoescape=True))
            .order_by(db.Callback.id.desc())
            .limit(limit)
        )
        if delivery:
            query = query.where(db.Callback.delivery == delivery)
        if order_id:
            query = query.where(db.Callback.order_id == internal_order(merchant, order_id))
        async with res.sessions() as session:
            rows = (await session.scalars(query)).all()
        return [
            {
                "event_id": r.event_id,
                "provider": r.provider,
                "order_id": merchant_order(merchant, r.order_id or ""),
                "payment_id": r.payment_id,
                "trade_status": r.trade_status,
                "delivery": r.delivery,
                "delivery_error": r.delivery_error,
                "received_at": r.received_at,
                "delivered_at": r.delivered_at,
            }
            for r in rows
        ]

    return app
