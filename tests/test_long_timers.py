"""Timers of hours and days at their production lengths, on Temporal's time-skipping test server.

The payment's own timings are the defaults users run with (``Settings()``): a 15-minute time
to live, a 25-hour window for late callbacks, a 90-day refund window, reviews escalated after
an hour and decided by their safe default after a day. The test server skips time whenever
every workflow waits on a timer, so each test takes seconds. The activities are the stubs of
tests/test_workflow_branches.py; the times they record are the server's (skipped) clock.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment

from paysentinel.codec import data_converter_for
from paysentinel.config import Settings, timing_from
from paysentinel.devserver import SEARCH_ATTRIBUTES
from paysentinel.models import RefundCommand
from tests.conftest import TEST_PAYLOAD_KEYS
from tests.test_workflow_branches import FakeProvider, callback, started_payment
from workflows.payment import PaymentWorkflow

DEFAULTS = timing_from(Settings())


@pytest.fixture
async def env(time_skipping_server: str):
    """A time-skipping server with the payments' search attributes and our data converter."""
    environment = await WorkflowEnvironment.start_time_skipping(
        data_converter=data_converter_for(Settings(payload_keys=TEST_PAYLOAD_KEYS)),
        test_server_existing_path=time_skipping_server,
        test_server_startup_timeout=timedelta(seconds=90),  # a JVM starting on a busy machine
    )
    try:
        await environment.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=environment.client.namespace,
                search_attributes={
                    name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{kind.upper()}") for name, kind in SEARCH_ATTRIBUTES.items()
                },
            )
        )
        yield environment
    finally:
        await environment.shutdown()


async def lifetime(client, handle) -> timedelta:
    """From the payment's start to the close of its last run, on the server's (skipped) clock."""
    first = await client.get_workflow_handle(handle.id, run_id=handle.result_run_id).describe()
    last = await client.get_workflow_handle(handle.id).describe()
    return last.close_time - first.start_time


def hours(delta: timedelta) -> float:
    return delta.total_seconds() / 3600


async def test_the_defaults_are_the_lengths_users_run_with():
    assert (DEFAULTS.payment_ttl_seconds, DEFAULTS.resend_window_seconds) == (900, 25 * 3600)
    assert (DEFAULTS.review_escalate_seconds, DEFAULTS.review_deadline_seconds) == (3600, 86400)
    assert DEFAULTS.refund_window_seconds == 90 * 86400


async def test_an_unpaid_payment_is_queried_for_its_time_to_live_closed_and_kept_for_late_callbacks(env):
    provider = FakeProvider()  # the payer never pays: every query says WAIT_BUYER_PAY
    async with started_payment(env.client, provider, [], timing=DEFAULTS) as handle:
        view = await handle.result()
        elapsed = await lifetime(env.client, handle)
    assert view.status.value == "CLOSED"
    queries = provider.calls.count("query")
    # after the 10 s callback wait: 5, 10, 30, 60, 120, 300, 300, ... seconds apart until 900 s
    assert 4 <= queries <= 8, provider.calls
    assert any(call.startswith("close:") for call in provider.calls)
    # the payment stays open for late callbacks for the whole resend window, then ends
    assert 25 <= hours(elapsed) < 26, elapsed


async def test_an_undecided_review_escalates_after_an_hour_and_its_default_applies_after_a_day(env):
    provider = FakeProvider(taken={"T1": 900})  # the provider took 900 of a 1000 order
    async with started_payment(env.client, provider, [callback(amount=900)], timing=DEFAULTS) as handle:
        view = await handle.result()
        start = (await handle.describe()).start_time
    assert provider.reviews == ["amount_mismatch"]
    escalated, decided = provider.times["escalate"], provider.times["close_review"]
    assert 1 <= hours(escalated - start) < 1.1, escalated - start
    assert 24 <= hours(decided - start) < 24.1, decided - start
    assert "decided:refund:system" in provider.calls
    assert (view.status.value, view.refunded_minor) == ("REFUNDED", 900)


async def test_a_paid_payment_takes_refunds_for_ninety_days_and_then_ends(env):
    provider = FakeProvider()
    async with started_payment(env.client, provider, [callback()], timing=DEFAULTS) as handle:
        await env.sleep(timedelta(days=89))
        refund = await handle.execute_update(
            PaymentWorkflow.refund, RefundCommand(key="day89", amount_minor=300, reason="returned one item")
        )
        assert refund.amount_minor == 300
        view = await handle.result()  # the refund window closes at day 90
        elapsed = await lifetime(env.client, handle)
    assert 90 <= elapsed.days < 91, elapsed
    assert (view.status.value, view.captured_minor, view.refunded_minor) == ("PARTIALLY_REFUNDED", 1000, 300)
    assert [call.split(":")[1] for call in provider.refund_calls] == ["300"]
