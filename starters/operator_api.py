"""Operator API: its own listener (PAYSENTINEL_OPERATOR_PORT, 8004), never the public checkout port.

GET  /operator/reviews?status=open          reviews, newest first                     viewer
GET  /operator/reviews/{review_id}          one review: reason, evidence, possible actions  viewer
POST /operator/reviews/{review_id}/decision {"action", "reason"}: approve, reject, refund, mark_paid  operator
GET  /operator/payments/{payment_id}        a payment: status, money, refunds, timeline  viewer
GET  /operator/reconciliations              reconciliation reports, newest day first  viewer
GET  /operator/reconciliations/{day}        one day's report and every difference      viewer
POST /operator/reconciliations/{day}        reconcile a day now (idempotent)           operator
GET  /operator/audit?operator=&since=       every operator action, newest first        viewer

Operators are configured as ``name:role:sha256-hex-of-token`` (PAYSENTINEL_OPERATOR_TOKENS);
a bearer token is hashed and compared, in constant time, with every configured hash. Roles:
viewer (reads), operator (also decides reviews, runs reconciliation), approver (also gives
the second approval). 401 without a valid token, 403 for a role that may not do the action.

A decision is a Temporal update on the review's workflow; its validator refuses actions
that make no sense for the review (409 with the reason), and the history records who
decided what and why. Four eyes: a decision that moves more than PAYSENTINEL_FOUR_EYES_MINOR
is only recorded (202, pending) until a second, different approver decides the same; the
update runs then, under both names. Every action (and every refusal) is appended to the
``audit`` table.
"""

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError

from paysentinel.config import Settings
from starters.common import (
    add_metrics,
    error_body,
    lifespan_for,
    readable_validation_error,
)
from starters.operator_auth import Operator, operator
from starters.operator_books import router as books_router
from starters.operator_reviews import router as reviews_router

__all__ = ["Operator", "create_app", "operator"]

# --- The operator app ---------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The operator API on its own listener (`paysentinel up --parts operator`)."""
    from starters.codec_api import router as codec_router

    app = FastAPI(title="paysentinel operator API", version="0.1.0", lifespan=lifespan_for(settings))
    app.add_exception_handler(RequestValidationError, readable_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, error_body)  # type: ignore[arg-type]
    app.include_router(reviews_router)
    app.include_router(books_router)
    app.include_router(codec_router)  # the codec endpoint (starters/codec_api.py), behind the same tokens
    add_metrics(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
