"""What the HTTP starters share: the Temporal client and database built once per app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.monitor import measure_stuck
from paysentinel import db, metrics
from paysentinel.config import Settings
from paysentinel.providers import Provider, build_providers
from paysentinel.temporal import connect

log = logging.getLogger("paysentinel.metrics")


@dataclass
class Resources:
    settings: Settings
    client: Client
    sessions: async_sessionmaker[AsyncSession]
    providers: dict[str, Provider]


def lifespan_for(settings: Settings):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = await connect(settings)
        engine = db.make_engine(settings.effective_database_url)
        async with httpx.AsyncClient(timeout=settings.provider_timeout_seconds) as http:
            app.state.resources = Resources(settings, client, db.make_sessionmaker(engine), build_providers(settings, http))
            try:
                yield
            finally:
                await engine.dispose()

    return lifespan


def resources(request: Request) -> Resources:
    return request.app.state.resources


def add_metrics(app: FastAPI) -> None:
    """GET /metrics: this process's counters, plus what is open right now (from the database)."""

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        res = resources(request)
        figures = await db.open_figures(res.sessions, grace_seconds=res.settings.stuck_grace_seconds)
        metrics.pending_payments.set(figures["pending"])
        try:
            metrics.publish_stuck((await measure_stuck(res.sessions, res.client, res.settings)).counts)
        except RPCError as err:  # Temporal unreachable: what the database alone says, the rest unchanged
            log.warning("stuck payments without Temporal's visibility (%s)", err)
            metrics.stuck_payments.labels("open_past_ttl").set(figures["stuck"])
        metrics.open_reviews.set(figures["open_reviews"])
        metrics.oldest_review_seconds.set(figures["oldest_review_seconds"])
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def readable_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem, e.g. "amount_minor: Input should be greater than 0"."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"] if part != "body")
        problems.append(f"{location or 'body'}: {error['msg']}")
    return JSONResponse(status_code=422, content={"error": "invalid request", "problems": problems})


async def error_body(_: Request, exc: HTTPException) -> JSONResponse:
    """Every error answers {"error": "what went wrong and what to do"}."""
    return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)


def update_error(err: Exception, what: str) -> HTTPException:
    """A refused Temporal update as an HTTP error that says why."""
    if isinstance(err, WorkflowUpdateFailedError):
        cause: Any = err.cause
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        return HTTPException(409, str(getattr(cause, "message", None) or cause or err))
    if isinstance(err, RPCError) and err.status == RPCStatusCode.NOT_FOUND:
        return HTTPException(409, f"{what} is no longer running (its refund and review windows are over)")
    return HTTPException(503, f"Temporal did not take the request ({err}); try again", headers={"Retry-After": "1"})
