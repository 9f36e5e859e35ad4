"""Replay recorded histories against today's workflow code.

Two sources: histories committed under tests/histories/ (runs of earlier code: a change
that breaks determinism for payments already in flight fails here), and every history
this test session produced on the real server.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.conftest import new_order
from tests.helpers import script, start_payment, wait_for
from workers.main import WORKFLOWS
from workflows.payment import PaymentWorkflow

HISTORIES = Path(__file__).parent / "histories"


async def replay(histories: list[WorkflowHistory]):
    async def each():
        for history in histories:
            yield history

    replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter)
    return await replayer.replay_workflows(each(), raise_on_replay_failure=False)


RELEASES = sorted(p.name for p in HISTORIES.iterdir() if p.is_dir())


@pytest.mark.parametrize("release", RELEASES)
async def test_kept_histories_of_each_release_replay(release: str):
    """The release gate: payments started by every released version still run on today's code."""
    files = sorted((HISTORIES / release).glob("*.json"))
    assert files, f"no kept histories in {HISTORIES / release}"
    histories = [WorkflowHistory.from_json(f"{release}/{f.stem}", f.read_text()) for f in files]
    results = await replay(histories)
    assert results.replay_failures == {}, {k: str(v)[:500] for k, v in results.replay_failures.items()}


async def test_histories_of_this_session_replay(client: Client, stack, api, sim):
    scenarios = {
        "paid": {"pay": "immediately"},
        "lost": {"pay": "immediately", "callback": "drop"},
        "never": {"pay": "never"},
        "down": {"faults": {"create": {"mode": "error", "times": -1}}},
        "late": {"pay": "never", "after_close": "pay"},
        "twice": {"pay": "immediately", "second_charge": True, "second_charge_delay_seconds": 0.3},
    }
    ids = []
    for name, behaviour in scenarios.items():
        order = new_order(f"replay-{name}")
        await script(sim, order, **behaviour)
        ids.append((name, (await start_payment(api, order, expires_in_seconds=5)).json()["payment_id"]))
    # Wait until each is settled, so the recorded histories cover every branch taken.
    # (Paid payments stay open for refunds; a history in progress replays just the same.)
    await asyncio.gather(*(wait_for(lambda p=payment_id: _settled(client, p), timeout=60,
                                    what=f"{payment_id} settled") for _, payment_id in ids))

    query = f'TaskQueue = "{stack.task_queue}"'
    await wait_for(lambda: _counted(client, query, len(ids)), what="visibility to list this session's runs")
    histories = [
        await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
        async for execution in client.list_workflows(query)
    ]
    results = await replay(histories)
    assert results.replay_failures == {}
    assert len(histories) >= len(ids)

    record_to = os.environ.get("PAYSENTINEL_RECORD_HISTORIES")
    if record_to:  # refresh tests/histories/ from a run of the current code
        Path(record_to).mkdir(parents=True, exist_ok=True)
        for name, payment_id in ids:
            history = await client.get_workflow_handle(payment_id).fetch_history()
            Path(record_to, f"{name}.json").write_text(history.to_json())
        for selection, name in (('WorkflowType = "MonitorWorkflow"', "monitor"),
                                ('WorkflowId STARTS_WITH "reconcile-simulator-"', "reconcile")):
            async for execution in client.list_workflows(f"{query} AND {selection}"):
                history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
                Path(record_to, f"{name}.json").write_text(history.to_json())
                break


async def _settled(client: Client, payment_id: str) -> bool:
    view = await client.get_workflow_handle(payment_id).query(PaymentWorkflow.view)
    return view.status.value in ("SUCCEEDED", "FAILED", "CLOSED", "REFUNDED") and any(
        e.event == "listening" for e in view.timeline)


async def _counted(client: Client, query: str, at_least: int) -> bool:
    return (await client.count_workflows(query)).count >= at_least
