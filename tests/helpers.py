"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from sqlalchemy import select
from temporalio.client import Client

from paysentinel import db, signing
from paysentinel.config import DEV_WEBHOOK_SECRET
from paysentinel.devserver import free_port


async def start_payment(api: httpx.AsyncClient, order_id: str, amount_minor: int = 9990, **extra) -> httpx.Response:
    body = {"order_id": order_id, "amount_minor": amount_minor, "currency": "CNY", "subject": "test order",
            "customer": {"email": f"{order_id}@example.com"}, **extra}
    return await api.post("/payments", json=body)


async def script(sim: httpx.AsyncClient, order_id: str, **behaviour) -> None:
    response = await sim.put(f"/control/scripts/{order_id}", json=behaviour)
    assert response.status_code == 200, response.text


async def wait_status(api: httpx.AsyncClient, payment_id: str, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    view: dict = {}
    while time.monotonic() < deadline:
        view = (await api.get(f"/payments/{payment_id}")).json()
        if view.get("status") == status:
            return view
        await asyncio.sleep(0.2)
    raise AssertionError(f"{payment_id} did not reach {status} in {timeout}s; last view: {view}")


async def wait_for(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def mails_to(mailbox, address: str, count: int, timeout: float = 20) -> list:
    """The e-mails to ``address`` once at least ``count`` have arrived."""
    async def arrived():
        found = mailbox.to(address)
        return found if len(found) >= count else None

    return await wait_for(arrived, timeout=timeout, what=f"{count} e-mail(s) to {address}")


async def payment_row(sessions, payment_id: str, status: str | None = None) -> db.Payment | None:
    """The payment's row; with ``status``, once the row shows it (it follows the workflow a moment later)."""
    deadline = time.monotonic() + 10
    while True:
        async with sessions() as session:
            row = await session.get(db.Payment, payment_id)
        if status is None or (row is not None and row.status == status) or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.1)


async def callback_rows(sessions, order_id: str) -> list[db.Callback]:
    async with sessions() as session:
        return list((await session.scalars(select(db.Callback).where(db.Callback.order_id == order_id))).all())


async def sim_trade(sim: httpx.AsyncClient, order_id: str) -> dict:
    response = await sim.get(f"/control/trades/{order_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def search_count(client: Client, query: str, expected: int, timeout: float = 15) -> int:
    """Visibility is eventually consistent: wait until the query finds ``expected`` workflows."""
    async def count() -> bool:
        return (await client.count_workflows(query)).count == expected

    await wait_for(count, timeout, f"{expected} workflow(s) matching {query}")
    return expected


def events(view: dict, name: str) -> list[dict]:
    return [entry for entry in view["timeline"] if entry["event"] == name]


@asynccontextmanager
async def receiver(answers: list[int], host: str = "127.0.0.1", secret: str = DEV_WEBHOOK_SECRET):
    """A real HTTP endpoint that checks Standard Webhooks signatures, answers the given
    status codes in turn (the last one repeats) and records (event, event id) it got."""
    received: list[tuple[dict, str]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        body = await request.body()
        event_id = signing.verify(secret, request.headers, body, tolerance_seconds=60)
        received.append((await request.json(), event_id))
        return Response(status_code=answers[min(len(received), len(answers)) - 1])

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://{host}:{port}/hook", received
    finally:
        server.should_exit = True
        await task
