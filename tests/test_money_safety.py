"""No path loses money, doubles it or gets stuck: PaymentWorkflow's hard cases.

Each test drives the real workflow on the real dev server with scripted provider
activities (tests/test_workflow_branches.py's FakeProvider), so a failing child, a
provider that cannot say what it took or an operator's late decision can be staged
exactly. Each ends with the payment's books: captured − refunded − refunding equals
the accepted amount, or a review is open.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities.payment import PROVIDER_REJECTED
from paysentinel.ledger import Ledger, retry_budget
from paysentinel.models import (
    PaymentOrder,
    PaymentInput,
    PaymentStatus,
    PaymentView,
    RefundCommand,
    ReviewAction,
    ReviewDecision,
)
from tests.helpers import wait_for
from tests.test_workflow_branches import TIMING, FakeProvider, callback, statuses
from workers.main import WORKFLOWS
from workflows.common import DB_OUTAGE_LIMIT, DB_RETRY
from paysentinel.rules import merchant_refund_key, refund_id_for
from workflows.payment import PaymentWorkflow
from workflows.review import ManualReviewWorkflow, review_workflow_id

# Reviews wait for the test's operator (or, where a test wants the default, for 2 s).
PATIENT = TIMING.model_copy(
    update={"review_escalate_seconds": 30, "review_deadline_seconds": 60, "resend_window_seconds": 4, "refund_window_seconds": 1}
)


@asynccontextmanager
async def payment(client: Client, provider: FakeProvider, timing=PATIENT):
    task_queue = f"money-{uuid.uuid4().hex[:8]}"
    order = f"ms-{uuid.uuid4().hex[:8]}"
    payment_input = PaymentInput(
        payment_id=f"payment-{order}",
        request=PaymentOrder(order_id=order, amount_minor=1000, currency="CNY"),
        notify_url="http://127.0.0.1:1/webhooks/simulator",
        timing=timing,
    )
    async with Worker(client, task_queue=task_queue, workflows=WORKFLOWS, activities=provider.activities()):
        handle = await client.start_workflow(
            PaymentWorkflow.run, payment_input, id=payment_input.payment_id, task_queue=task_queue
        )
        yield handle


async def send(handle: WorkflowHandle, *events) -> None:
    order = handle.id.removeprefix("payment-")
    for event in events:
        await handle.signal(PaymentWorkflow.callback, event.model_copy(update={"order_id": order}))


async def view_of(handle: WorkflowHandle) -> PaymentView:
    return await handle.query(PaymentWorkflow.view)


async def review_open(handle: WorkflowHandle, number: int) -> str:
    review_id = review_workflow_id(handle.id, number)

    async def opened():
        view = await view_of(handle)
        return view.review_id == review_id

    await wait_for(opened, what=f"review {review_id} to open")
    return review_id


async def decide(client: Client, review_id: str, action: ReviewAction) -> None:
    """An operator's decision, once the review workflow has started."""
    decision = ReviewDecision(action=action, reason="checked with the provider", operator="alice")
    deadline = time.monotonic() + 10
    while True:
        try:
            await client.get_workflow_handle(review_id).execute_update(ManualReviewWorkflow.decide, decision)
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def finished(handle: WorkflowHandle, timeout: float = 40) -> PaymentView:
    return await asyncio.wait_for(handle.result(), timeout)


# --- 1. Child failures are handled -----------------------------------------------------------


async def test_a_terminated_review_is_opened_again_and_the_payment_does_not_fail(client):
    provider = FakeProvider(close_fails=True)  # nobody can say whether it was paid: status_unknown
    async with payment(client, provider) as handle:
        first = await review_open(handle, 1)
        await wait_for(lambda: asyncio.sleep(0, bool(provider.reviews)), what="the review stored")
        await client.get_workflow_handle(first).terminate("closed by mistake in the Web UI")
        second = await review_open(handle, 2)
        await decide(client, second, ReviewAction.REJECT)
        view = await finished(handle)
    events = [e.event for e in view.timeline]
    assert "child workflow failed" in events
    assert provider.reviews == ["status_unknown", "status_unknown"]
    assert view.status.value == "CLOSED"
    assert provider.alerts[0] == "child_failed:open" and provider.alerts[-1] == "child_failed:resolved"
    assert "alert:child_failed:OPEN" in provider.calls


async def test_a_terminated_refund_is_started_again_with_the_same_provider_refund_id(client):
    provider = FakeProvider(refund_seconds=1.5)
    async with payment(client, provider) as handle:
        await send(handle, callback("TRADE_CLOSED", event_id="evt_a"), callback(event_id="evt_b"))  # paid after close
        child = f"{handle.id}-refund-late-T1"
        await wait_for(lambda: asyncio.sleep(0, bool(provider.refund_calls)), what="the refund to reach the provider")
        await client.get_workflow_handle(child).terminate("terminated from the Web UI")
        view = await finished(handle)
    assert view.status.value == "REFUNDED", [(e.event, e.detail) for e in view.timeline]
    assert len({call.split(":")[2] for call in provider.refund_calls}) == 1  # one provider refund id, ever
    assert view.refunded_minor == 1000 and view.captured_minor == 1000
    assert "child_failed:open" in provider.alerts


async def test_database_writes_survive_an_outage_of_an_hour():
    budget = retry_budget(
        DB_RETRY.initial_interval,
        DB_RETRY.backoff_coefficient,
        DB_RETRY.maximum_interval or DB_RETRY.initial_interval,
        DB_RETRY.maximum_attempts,
    )
    assert min(budget, DB_OUTAGE_LIMIT) >= timedelta(hours=1)
    assert DB_RETRY.maximum_interval is not None and DB_RETRY.maximum_interval <= timedelta(minutes=1)


# --- 2. An approved mismatch never leaves a second charge -------------------------------------


async def test_approving_a_mismatch_on_a_paid_order_refunds_the_second_charge(client):
    provider = FakeProvider(taken={"T2": 500})
    async with payment(client, provider) as handle:
        await send(handle, callback())  # T1: the order amount, accepted
        await wait_for(lambda: _status(handle, "SUCCEEDED"), what="paid")
        await send(handle, callback(amount=500, event_id="evt_2", trade_no="T2"))
        await decide(client, await review_open(handle, 1), ReviewAction.APPROVE)
        await wait_for(lambda: _status(handle, "SUCCEEDED", refunded=500), what="the second charge refunded")
        view = await view_of(handle)
    assert view.trade_no == "T1" and view.captured_minor == 1500 and view.refunded_minor == 500
    assert [c.split(":")[:2] for c in provider.refund_calls] == [["T2", "500"]]


async def test_a_correct_payment_during_a_mismatch_review_wins_and_the_approved_one_goes_back(client):
    provider = FakeProvider(taken={"T2": 500})
    async with payment(client, provider) as handle:
        await send(handle, callback(amount=500, event_id="evt_2", trade_no="T2"))
        review = await review_open(handle, 1)
        await send(handle, callback())  # T1 with the order amount arrives while the person looks
        await decide(client, review, ReviewAction.APPROVE)
        await wait_for(lambda: _status(handle, "SUCCEEDED", refunded=500), what="the second charge refunded")
        view = await view_of(handle)
    assert view.trade_no == "T1" and [c.split(":")[:2] for c in provider.refund_calls] == [["T2", "500"]]


async def test_an_approved_mismatch_records_when_it_was_paid(client):
    provider = FakeProvider(taken={"T1": 900})
    async with payment(client, provider) as handle:
        await send(handle, callback(amount=900))
        await decide(client, await review_open(handle, 1), ReviewAction.APPROVE)
        await wait_for(lambda: _status(handle, "SUCCEEDED"), what="accepted")
        await wait_for(lambda: asyncio.sleep(0, provider.records[-1].status.value == "SUCCEEDED"), what="the row written")
    assert provider.records[-1].paid_at is not None and provider.records[-1].paid_amount_minor == 900


# --- 4. Merchant refund keys have a namespace of their own ----------------------------------


async def test_a_merchant_key_named_like_an_internal_refund_is_a_new_refund(client):
    provider = FakeProvider()
    async with payment(client, provider) as handle:
        await send(handle, callback(), callback(event_id="evt_2", trade_no="T2"))  # T2: refunded as duplicate
        await wait_for(lambda: _status(handle, "SUCCEEDED", refunded=1000), what="the duplicate refunded")
        mine = await handle.execute_update(
            PaymentWorkflow.refund, RefundCommand(key="dup-T2", amount_minor=100, reason="damaged")
        )
    order = handle.id.removeprefix("payment-")
    assert (mine.trade_no, mine.amount_minor, mine.requested_by) == ("T1", 100, "merchant")
    assert mine.refund_id == refund_id_for(order, merchant_refund_key("dup-T2")) != refund_id_for(order, "dup-T2")


# --- 5. The payments row converges to the workflow ------------------------------------------


async def test_a_write_that_gave_up_is_written_again(client):
    provider = FakeProvider(save_failures=2)  # the SUCCEEDED snapshot is refused twice, for good each time
    async with payment(client, provider) as handle:
        await send(handle, callback())
        view = await finished(handle)
    assert view.status.value == "SUCCEEDED"
    assert statuses(provider)[-1] == "SUCCEEDED"
    assert "database sync failed" in [e.event for e in view.timeline]


async def test_after_a_workflow_reset_every_write_is_newer(client):
    provider = FakeProvider()
    async with payment(client, provider, PATIENT.model_copy(update={"resend_window_seconds": 30})) as handle:
        await send(handle, callback())
        await wait_for(lambda: _status(handle, "SUCCEEDED"), what="paid")
        before = len(provider.records)
        history = await handle.fetch_history()
        first_task = next(e.event_id for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
        await client.workflow_service.reset_workflow_execution(
            ResetWorkflowExecutionRequest(
                namespace=client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=handle.id),
                reason="operator reset",
                workflow_task_finish_event_id=first_task,
                request_id=uuid.uuid4().hex,
            )
        )
        await wait_for(lambda: asyncio.sleep(0, len(provider.records) > before), what="the reset run to write")
        await client.get_workflow_handle(handle.id).terminate("test done")
    old = [r.seq for r in provider.records[:before]]
    new = [r.seq for r in provider.records[before:]]
    assert min(new) > max(old), (old, new)


# --- 8. A status_unknown review is settled by the provider's answer --------------------------


async def test_a_late_success_during_a_status_unknown_review_settles_it_as_paid(client):
    provider = FakeProvider(close_fails=True)
    async with payment(client, provider) as handle:
        await review_open(handle, 1)
        await send(handle, callback())  # the payer paid in time; the callback was late
        view = await finished(handle)
    assert view.status.value == "SUCCEEDED" and provider.refund_calls == []
    assert "decided:mark_paid:system" in provider.calls
    assert provider.records[-1].paid_at is not None


async def test_a_payment_closed_by_review_keeps_asking_the_provider(client):
    provider = FakeProvider(close_fails=True)
    quick = PATIENT.model_copy(
        update={"review_escalate_seconds": 0.2, "review_deadline_seconds": 0.5, "resend_window_seconds": 8}
    )
    async with payment(client, provider, quick) as handle:
        await wait_for(lambda: _status(handle, "CLOSED"), what="closed by the review's default")
        provider.close_fails, provider.close = False, "TRADE_SUCCESS"  # the provider is back: it was paid
        view = await finished(handle)
    assert view.status.value == "REFUNDED", [(e.event, e.detail) for e in view.timeline]
    assert [c.split(":")[:2] for c in provider.refund_calls] == [["T1", "1000"]]


# --- 9. Amounts come from what the provider took, never from a claim --------------------------


async def test_a_wrong_amount_claim_is_neither_refunded_nor_accepted_while_the_provider_cannot_say(client):
    provider = FakeProvider(query_fails=True, taken={"T1": 96296})
    async with payment(client, provider) as handle:
        await send(handle, callback(amount=9629))  # claims less than the provider took
        review = await review_open(handle, 1)
        view = await view_of(handle)
        assert provider.refund_calls == [] and view.captured_minor == 0
        assert "nothing is refunded or accepted" in [e for e in view.timeline if e.event == "review opened"][-1].detail
        provider.query_fails = False
        await decide(client, review, ReviewAction.REJECT)
        await decide(client, await review_open(handle, 2), ReviewAction.REFUND)
        view = await finished(handle)
    assert [c.split(":")[:2] for c in provider.refund_calls] == [["T1", "96296"]]  # what it took
    assert (view.status.value, view.captured_minor, view.refunded_minor) == ("REFUNDED", 96296, 96296)


# --- 10. A provider risk hold approved late gives the payer a full time to live ---------------


async def test_approving_a_provider_risk_hold_late_resets_the_time_to_live(client):
    hold = ApplicationError("ACQ.RISK_HOLD: held", "ACQ.RISK_HOLD", type=PROVIDER_REJECTED, non_retryable=True)
    provider = FakeProvider(create_error=hold, create_error_times=1)
    async with payment(client, provider) as handle:
        review = await review_open(handle, 1)
        await asyncio.sleep(TIMING.payment_ttl_seconds + 0.5)  # longer than the time to live
        approved_at = datetime.now(timezone.utc)
        await decide(client, review, ReviewAction.APPROVE)
        await wait_for(lambda: asyncio.sleep(0, len(provider.creates) == 2), what="the trade created again")
        await client.get_workflow_handle(handle.id).terminate("test done")
    assert provider.creates[1].expires_at > approved_at + timedelta(seconds=TIMING.payment_ttl_seconds - 1)


# --- The ledger's rules -------------------------------------------------------------------------


def test_ledger_owes_back_every_trade_the_order_is_not_paid_with():
    ledger = Ledger(captured={"T1": 1000, "T2": 500}, accepted="T1")
    assert ledger.excess() == {"T2": 500} and not ledger.balanced(reviews_open=False)
    assert ledger.balanced(reviews_open=True)
    ledger.refunding["T2"] = 500
    assert ledger.excess() == {} and ledger.status(PaymentStatus.SUCCEEDED, reviews_open=False).value == "REFUNDING"
    ledger.refunding.clear()
    ledger.refunded["T2"] = 500
    assert ledger.balanced(reviews_open=False) and ledger.refundable() == 1000
    ledger.refunded["T1"] = 300
    assert ledger.refundable() == 700 and ledger.status(PaymentStatus.SUCCEEDED, False).value == "PARTIALLY_REFUNDED"


def test_ledger_keeps_what_a_person_decided_to_keep():
    ledger = Ledger(captured={"T9": 800}, kept={"T9": 800})
    assert ledger.balanced(reviews_open=False)


async def _status(handle: WorkflowHandle, status: str, refunded: int | None = None) -> bool:
    view = await view_of(handle)
    return view.status.value == status and (refunded is None or view.refunded_minor == refunded)
