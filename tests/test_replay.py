"""The release gate: recorded workflow histories replayed against today's workflow code.

Payments live for days, so a deploy must run the workflows every released version
started. Each release's histories are kept under tests/histories/<version>/ (never
overwritten) and replayed here; a change that breaks determinism for them fails.

- ``test_kept_histories_of_each_release_replay``: every kept release replays.
- ``test_every_branch_is_recorded_and_replays``: one payment through each branch of
  PaymentWorkflow (tests/scenarios.py) on the running system, each until it is settled,
  then every history of the session replays. With ``PAYSENTINEL_RECORD_HISTORIES=<dir>``
  it writes the histories of a new release into <dir>: ``<branch>.json`` per payment
  (``<branch>.continued.json`` for the run it continued as new into, if it did),
  ``<branch>.refund.json`` / ``<branch>.review.json`` for its child workflows (a second
  child of the same kind: ``<branch>.refund.2.json``), ``monitor.json`` (the monitor's schedule,
  triggered) and ``reconcile.json`` (yesterday reconciled through the operator API).
- ``test_gate_catches_an_unpatched_change``: the gate works: a PaymentWorkflow with one
  extra command fails on every payment history of the newest release, the same change
  behind ``workflow.patched`` passes.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowReplayResults
from temporalio.workflow import NondeterminismError

from paysentinel.codec import data_converter, parse_keys
from paysentinel.config import Settings
from paysentinel.models import PaymentInput
from tests import scenarios
from tests.conftest import OPERATOR_HEADERS, TEST_PAYLOAD_KEYS, Stack
from tests.helpers import wait_for
from workers.main import WORKFLOWS
from workflows.monitor import MONITOR_SCHEDULE_ID
from workflows.payment import PaymentWorkflow
from workflows.reconcile import reconcile_workflow_id

HISTORIES = Path(__file__).parent / "histories"
RECORD_ENV = "PAYSENTINEL_RECORD_HISTORIES"
SETTLEMENT_TIMEZONE = Settings.model_fields["settlement_timezone"].default  # the stack runs with the default


def version_key(name: str) -> tuple:
    """Sort releases as versions: 0.10.0 after 0.9.0."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-+]", name))


RELEASES = sorted((p.name for p in HISTORIES.iterdir() if p.is_dir()), key=version_key)


def kept_histories(release: str) -> list[WorkflowHistory]:
    files = sorted((HISTORIES / release).glob("*.json"))
    assert files, f"no kept histories in {HISTORIES / release}"
    return [WorkflowHistory.from_json(f"{release}/{f.stem}", f.read_text()) for f in files]


async def replay(histories: Sequence[WorkflowHistory], workflows: Sequence[type] = WORKFLOWS, **options) -> WorkflowReplayResults:
    async def each():
        for history in histories:
            yield history

    # The workers' converter: histories of this session are encrypted (the test keys), kept ones
    # recorded before encryption pass through the codec unchanged.
    replayer = Replayer(workflows=workflows, data_converter=data_converter(parse_keys(TEST_PAYLOAD_KEYS)), **options)
    return await replayer.replay_workflows(each(), raise_on_replay_failure=False)


def failures(histories: Sequence[WorkflowHistory], results: WorkflowReplayResults) -> dict[str, str]:
    """Replay failures by history name (workflow id), shortened."""
    return {h.workflow_id: str(results.replay_failures[h.run_id])[:500] for h in histories if h.run_id in results.replay_failures}


@pytest.mark.parametrize("release", RELEASES)
async def test_kept_histories_of_each_release_replay(release: str):
    """The release gate: payments started by every released version still run on today's code."""
    histories = kept_histories(release)
    assert failures(histories, await replay(histories)) == {}


# --- Recording: every branch on the running system ------------------------------------------


async def test_every_branch_is_recorded_and_replays(client: Client, stack: Stack, api, sim):
    record_to = os.environ.get(RECORD_ENV)
    if record_to:
        target = Path(record_to)
        assert not (target.is_dir() and any(target.glob("*.json"))), (
            f"{target} already holds histories: a release's histories are never overwritten; "
            "record into the directory of a new release"
        )
    async with httpx.AsyncClient(base_url=stack.operator_url, headers=OPERATOR_HEADERS, timeout=30) as operator:
        parts = scenarios.Parts(api=api, sim=sim, operator=operator, client=client)

        async def run(branch: scenarios.Branch) -> str:
            payment_id = await branch.drive(parts)
            await scenarios.settled(client, branch, payment_id)
            kinds = [kind for kind, _, _ in await scenarios.children(client, payment_id)]
            started = {kind: kinds.count(kind) for kind in set(kinds)}
            assert started == branch.children, f"branch {branch.name}: child workflows {kinds}, expected {branch.children}"
            return payment_id

        # The monitor and the daily reconciliation, run as their schedules run them.
        await client.get_schedule_handle(MONITOR_SCHEDULE_ID).trigger()
        yesterday = datetime.now(ZoneInfo(SETTLEMENT_TIMEZONE)).date() - timedelta(days=1)
        started = await operator.post(f"/operator/reconciliations/{yesterday}")
        assert started.status_code == 202, started.text
        outcomes = await asyncio.gather(*(run(b) for b in scenarios.BRANCHES), return_exceptions=True)
    broken = {b.name: f"{type(o).__name__}: {o}" for b, o in zip(scenarios.BRANCHES, outcomes) if isinstance(o, BaseException)}
    for name in broken:
        if name in parts.started and "timeline" not in broken[name]:  # say where the payment got to
            view = await scenarios.payment_view(client, parts.started[name])
            broken[name] += f"; {parts.started[name]}: {scenarios.describe(view)}"
    assert not broken, "branches that did not end as the README says:\n" + "\n".join(
        f"- {name}: {why}" for name, why in broken.items()
    )
    payments = {b.name: payment_id for b, payment_id in zip(scenarios.BRANCHES, outcomes)}

    query = f'TaskQueue = "{stack.task_queue}"'
    others = {
        "monitor": f'{query} AND WorkflowType = "MonitorWorkflow"',
        "reconcile": f'{query} AND WorkflowId = "{reconcile_workflow_id("simulator", yesterday)}"',
    }
    found = {
        name: await wait_for(lambda q=q: _first_completed(client, q), timeout=60, what=f"{name}: {q} completed")
        for name, q in others.items()
    }

    await wait_for(lambda: _counted(client, query, len(payments) + len(found)), what="visibility to list this session's runs")
    executions = [(e.id, e.run_id) async for e in client.list_workflows(query)]
    histories = await asyncio.gather(*(client.get_workflow_handle(i, run_id=r).fetch_history() for i, r in executions))
    assert failures(histories, await replay(histories)) == {}
    types = {scenarios.workflow_type(h) for h in histories}
    assert {"PaymentWorkflow", "RefundWorkflow", "ManualReviewWorkflow", "MonitorWorkflow", "ReconciliationWorkflow"} <= types, (
        types
    )

    if record_to:
        await _record(client, Path(record_to), payments, found)


async def _record(client: Client, target: Path, payments: dict[str, str], others: dict[str, tuple[str, str]]):
    """Write each branch's payment history and its children's, named by branch."""
    target.mkdir(parents=True, exist_ok=True)
    for name, payment_id in payments.items():
        chain = await scenarios.runs(client, payment_id)
        for file_name, history in zip(scenarios.run_file_names(name, len(chain)), chain):
            (target / file_name).write_text(history.to_json())
        kids = await scenarios.children(client, payment_id)
        for file_name, (_, child_id, run_id) in zip(scenarios.child_file_names(name, [k for k, _, _ in kids]), kids):
            child = await client.get_workflow_handle(child_id, run_id=run_id).fetch_history()
            (target / file_name).write_text(child.to_json())
    for name, (workflow_id, run_id) in others.items():
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        (target / f"{name}.json").write_text(history.to_json())


async def _first_completed(client: Client, query: str) -> tuple[str, str] | None:
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        if (await handle.describe()).status is WorkflowExecutionStatus.COMPLETED:
            return execution.id, execution.run_id
    return None


async def _counted(client: Client, query: str, at_least: int) -> bool:
    return (await client.count_workflows(query)).count >= at_least


# --- The gate works: an unpatched change fails, a patched one passes ---------------------------


@workflow.defn(name="PaymentWorkflow")
class UnpatchedChange(PaymentWorkflow):
    """A deploy that adds one command at the start of every payment, for payments in flight too."""

    @workflow.init
    def __init__(self, input: PaymentInput) -> None:
        super().__init__(input)

    @workflow.run
    async def run(self, input: PaymentInput):
        await workflow.sleep(1)
        return await super().run(input)


@workflow.defn(name="PaymentWorkflow")
class PatchedChange(PaymentWorkflow):
    """The same change, only for payments started by the new code."""

    @workflow.init
    def __init__(self, input: PaymentInput) -> None:
        super().__init__(input)

    @workflow.run
    async def run(self, input: PaymentInput):
        if workflow.patched("replay-gate-extra-sleep"):
            await workflow.sleep(1)
        return await super().run(input)


def with_payment_workflow(changed: type) -> list[type]:
    return [changed if w is PaymentWorkflow else w for w in WORKFLOWS]


async def test_gate_catches_an_unpatched_change():
    newest = RELEASES[-1]
    histories = kept_histories(newest)
    payments = [h for h in histories if scenarios.workflow_type(h) == "PaymentWorkflow"]
    assert payments, f"no PaymentWorkflow histories kept in {HISTORIES / newest}"
    # These classes live in this test module, which imports far more than a workflow may:
    # they replay outside the sandbox (determinism is checked by the SDK's core either way).
    runner = UnsandboxedWorkflowRunner()

    unpatched = await replay(histories, with_payment_workflow(UnpatchedChange), workflow_runner=runner)
    for history in histories:
        failure = unpatched.replay_failures.get(history.run_id)
        if history in payments:
            assert isinstance(failure, NondeterminismError) and "TMPRL1100" in str(failure), (
                f"{history.workflow_id}: an unpatched change replayed without a nondeterminism error: {failure!r}"
            )
        else:  # only PaymentWorkflow changed: its children, the monitor and reconciliation still replay
            assert failure is None, f"{history.workflow_id}: {failure}"

    patched = await replay(histories, with_payment_workflow(PatchedChange), workflow_runner=runner)
    assert failures(histories, patched) == {}
