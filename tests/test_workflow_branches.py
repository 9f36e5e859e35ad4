"""PaymentWorkflow's branch logic with stubbed activities, on the real dev server."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.payment import PROVIDER_REJECTED
from paysentinel.models import (
    PaymentOrder,
    CreateTradeInput,
    Incident,
    IncidentInput,
    PaymentInput,
    PaymentRecord,
    PaymentTiming,
    PaymentView,
    ProviderCallback,
    ProviderRefund,
    RecordPaymentInput,
    RefundInput,
    RefundRecord,
    RefundStatus,
    ReviewInput,
    ReviewOutcome,
    RiskCheckInput,
    RiskVerdict,
    Trade,
    TradeRef,
    TradeStatus,
)
from workers.main import WORKFLOWS
from workflows.payment import PaymentWorkflow

TIMING = PaymentTiming(
    callback_timeout_seconds=0.3,
    query_backoff_seconds=[0.2],
    payment_ttl_seconds=3,
    resend_window_seconds=0.3,
    close_attempts=2,
    provider_retry_initial_seconds=0.05,
    provider_max_attempts=2,
    refund_window_seconds=0.3,
    refund_submissions=2,
    review_escalate_seconds=0.2,
    review_deadline_seconds=0.5,  # nobody decides in these tests: the safe default applies
)


class FakeProvider:
    """Scripted provider results; records every call and database snapshot."""

    def __init__(
        self,
        queries: list[str | None] | None = None,
        close: str | None = "TRADE_CLOSED",
        close_fails: bool = False,
        create_error: Exception | None = None,
        refund_fails: bool = False,
        risk_hits: list[str] | None = None,
        taken: dict[str, int] | None = None,
        query_fails: bool = False,
        refund_seconds: float = 0,
        save_failures: int = 0,
        create_error_times: int = -1,
    ):
        self.queries = list(queries or [])
        self.refund_fails = refund_fails
        self.risk_hits = risk_hits or []
        self.refund_calls: list[str] = []
        self.reviews: list[str] = []
        self.close = close
        self.close_fails = close_fails
        self.create_error = create_error
        self.calls: list[str] = []
        self.records: list[PaymentRecord] = []
        self.taken = taken or {}  # trade -> what the provider took, when not the order's 1000
        self.query_fails = query_fails
        self.refund_seconds = refund_seconds
        self.alerts: list[str] = []
        self.save_failures = save_failures  # the SUCCEEDED snapshot is refused (for good) this many times
        self.create_error_times = create_error_times  # -1: create_error every time
        self.creates: list[CreateTradeInput] = []
        self.times: dict[str, datetime] = {}  # activity -> when it was last scheduled (the server's clock)

    def trade(self, order_id: str, status: str | None, trade_no: str = "T1") -> Trade:
        if status is None:
            return Trade(exists=False, order_id=order_id)
        return Trade(
            order_id=order_id,
            trade_no=trade_no,
            status=TradeStatus(status),
            amount_minor=self.taken.get(trade_no, 1000),
            currency="CNY",
            pay_url=f"http://pay/{trade_no}",
        )

    def activities(self) -> list:
        @activity.defn(name="record_payment")
        async def record_payment(payload: RecordPaymentInput) -> None:
            self.calls.append("record")

        @activity.defn(name="open_payment")
        async def open_payment(payload: RecordPaymentInput) -> RiskVerdict:
            self.calls.append("record")
            return RiskVerdict(flagged=bool(self.risk_hits), hits=self.risk_hits)

        @activity.defn(name="save_payment_state")
        async def save_payment_state(record: PaymentRecord) -> bool:
            if record.status.value == "SUCCEEDED" and self.save_failures > 0:
                self.save_failures -= 1
                raise ApplicationError("database refused the write", non_retryable=True)
            self.records.append(record)
            return True

        @activity.defn(name="create_trade")
        async def create_trade(payload: CreateTradeInput) -> Trade:
            self.calls.append(f"create:{payload.idempotency_key}")
            self.creates.append(payload)
            if self.create_error and self.create_error_times != 0:
                self.create_error_times -= 1
                raise self.create_error
            return self.trade(payload.order_id, "WAIT_BUYER_PAY")

        @activity.defn(name="query_trade")
        async def query_trade(ref: TradeRef) -> Trade:
            self.calls.append("query" if ref.trade_no is None else f"query:{ref.trade_no}")
            if self.query_fails:
                raise RuntimeError("provider down")
            if ref.trade_no is not None:  # a given trade of the order: paid, as the callbacks say
                return self.trade(ref.order_id, "TRADE_SUCCESS", ref.trade_no)
            status = self.queries.pop(0) if self.queries else "WAIT_BUYER_PAY"
            return self.trade(ref.order_id, status)

        @activity.defn(name="close_trade")
        async def close_trade(ref: TradeRef) -> Trade:
            self.calls.append(f"close:{ref.idempotency_key}")
            if self.close_fails:
                raise RuntimeError("provider down")
            return self.trade(ref.order_id, self.close)

        @activity.defn(name="refund_trade")
        async def refund_trade(request: RefundInput) -> ProviderRefund:
            self.refund_calls.append(f"{request.trade_no}:{request.amount_minor}:{request.refund_id}")
            await asyncio.sleep(self.refund_seconds)
            status = RefundStatus.FAILED if self.refund_fails else RefundStatus.SUCCEEDED
            return ProviderRefund(
                refund_id=request.refund_id,
                trade_no=request.trade_no,
                amount_minor=request.amount_minor,
                status=status,
                fail_reason="no balance",
            )

        @activity.defn(name="query_refund")
        async def query_refund(request: RefundInput) -> ProviderRefund | None:
            return None

        @activity.defn(name="save_refund")
        async def save_refund(record: RefundRecord) -> None:
            pass

        @activity.defn(name="open_review")
        async def open_review(review: ReviewInput) -> None:
            self.reviews.append(review.reason.value)

        @activity.defn(name="escalate_review")
        async def escalate_review(review: ReviewInput) -> None:
            self.calls.append("escalate")
            self.times["escalate"] = activity.info().current_attempt_scheduled_time

        @activity.defn(name="close_review")
        async def close_review(outcome: ReviewOutcome) -> None:
            self.calls.append(f"decided:{outcome.action.value}:{outcome.operator}")
            self.times["close_review"] = activity.info().current_attempt_scheduled_time

        @activity.defn(name="assess_risk")
        async def assess_risk(check: RiskCheckInput) -> RiskVerdict:
            return RiskVerdict(flagged=bool(self.risk_hits), hits=self.risk_hits)

        @activity.defn(name="track_incident")
        async def track_incident(check: IncidentInput) -> Incident | None:
            self.alerts.append(f"{check.kind}:{'open' if check.breach else 'resolved'}")
            now = datetime.now(timezone.utc)
            return Incident(
                id=len(self.alerts),
                monitor=check.monitor,
                kind=check.kind,
                status="OPEN" if check.breach else "RESOLVED",
                rate=check.rate,
                peak_rate=check.rate,
                threshold=check.threshold,
                payments=check.payments,
                detail=check.detail,
                opened_at=now,
                to_send=True,
            )

        @activity.defn(name="send_alert")
        async def send_alert(incident: Incident) -> None:
            self.calls.append(f"alert:{incident.kind}:{incident.status}")

        return [
            record_payment,
            open_payment,
            save_payment_state,
            create_trade,
            query_trade,
            close_trade,
            refund_trade,
            query_refund,
            save_refund,
            open_review,
            escalate_review,
            close_review,
            assess_risk,
            track_incident,
            send_alert,
        ]


@asynccontextmanager
async def started_payment(
    client: Client, provider: FakeProvider, signals: list[ProviderCallback], *, timing: PaymentTiming = TIMING
):
    """A payment on its own task queue, with a worker running the stubbed activities."""
    task_queue = f"branches-{uuid.uuid4().hex[:8]}"
    order = f"wf-{uuid.uuid4().hex[:8]}"
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
        for event in signals:
            await handle.signal(PaymentWorkflow.callback, event.model_copy(update={"order_id": order}))
        yield handle


async def run_payment(client: Client, provider: FakeProvider, signals: list[ProviderCallback] = ()) -> PaymentView:
    async with started_payment(client, provider, list(signals)) as handle:
        return await handle.result()


async def run_payment_until(
    client: Client, provider: FakeProvider, signals: list[ProviderCallback], status: str, reviews: int
) -> PaymentView:
    """For payments that wait for a person: run until the status shows and ``reviews`` were opened."""
    async with started_payment(client, provider, signals) as handle:
        for _ in range(150):
            view = await handle.query(PaymentWorkflow.view)
            if view.status.value == status and len(provider.reviews) >= reviews:
                await asyncio.sleep(1.0)  # nothing more happens by itself
                view = await handle.query(PaymentWorkflow.view)
                await handle.terminate("test done")
                return view
            await asyncio.sleep(0.2)
        await handle.terminate("test timed out")
        raise AssertionError(f"never reached {status} with {reviews} reviews: {view}")


def callback(
    status: str = "TRADE_SUCCESS", amount: int = 1000, event_id: str = "evt_1", trade_no: str = "T1"
) -> ProviderCallback:
    return ProviderCallback(
        event_id=event_id,
        provider="simulator",
        order_id="",
        trade_no=trade_no,
        trade_status=TradeStatus(status),
        amount_minor=amount,
        currency="CNY",
        received_at=datetime.now(timezone.utc),
    )


def statuses(provider: FakeProvider) -> list[str]:
    return [r.status.value for r in provider.records]


async def test_callback_timeout_then_query_finds_payment(client):
    provider = FakeProvider(queries=["WAIT_BUYER_PAY", "TRADE_SUCCESS"])
    view = await run_payment(client, provider)
    assert view.status.value == "SUCCEEDED", [(e.event, e.detail) for e in view.timeline]
    assert provider.calls.count("query") == 2
    assert statuses(provider) == ["PENDING", "SUCCEEDED"]
    seqs = [r.seq for r in provider.records]
    assert seqs == sorted(set(seqs))  # every snapshot newer than the one before


async def test_unpaid_payment_is_closed_at_provider_first(client):
    provider = FakeProvider(close="TRADE_CLOSED")
    view = await run_payment(client, provider)
    assert view.status.value == "CLOSED"
    assert provider.calls[-1] == f"close:{view.payment_id}:close"


async def test_close_that_reveals_payment_means_paid(client):
    provider = FakeProvider(close="TRADE_SUCCESS")
    view = await run_payment(client, provider)
    assert view.status.value == "SUCCEEDED"
    assert "confirmed by close" in [e for e in view.timeline if e.event == "paid"][0].detail


async def test_provider_unreachable_at_close_goes_to_review(client):
    provider = FakeProvider(close_fails=True)
    view = await run_payment(client, provider)
    # rounds x attempts at the end of the time to live, then once more while listening
    assert sum(c.startswith("close") for c in provider.calls) >= 2 * 2 + 2
    assert provider.reviews == ["status_unknown"]
    assert "escalate" in provider.calls and "decided:reject:system" in provider.calls  # deadline default
    assert (view.status.value, view.review_reason) == ("CLOSED", "status_unknown")
    assert statuses(provider) == ["PENDING", "IN_REVIEW", "CLOSED"]


async def test_provider_rejection_on_create_fails_without_retry(client):
    error = ApplicationError("ACQ.INVALID_PARAMETER: bad", type=PROVIDER_REJECTED, non_retryable=True)
    provider = FakeProvider(create_error=error)
    view = await run_payment(client, provider)
    assert view.status.value == "FAILED" and "rejected" in view.reason
    assert [c for c in provider.calls if c.startswith("create")] == [f"create:{view.payment_id}:create"]


async def test_duplicate_signal_makes_one_transition(client):
    provider = FakeProvider()
    view = await run_payment(client, provider, [callback(), callback()])
    assert view.status.value == "SUCCEEDED"
    assert statuses(provider) == ["PENDING", "SUCCEEDED"]
    assert [e.event for e in view.timeline].count("callback duplicate") == 1


async def test_wrong_claim_is_checked_with_the_provider(client):
    provider = FakeProvider()  # the callback claims 1; the provider took the order's 1000
    view = await run_payment(client, provider, [callback(amount=1)])
    assert "query:T1" in provider.calls and provider.reviews == [] and provider.refund_calls == []
    assert (view.status.value, view.captured_minor) == ("SUCCEEDED", 1000)


async def test_wrong_amount_goes_to_review_and_defaults_to_refund(client):
    provider = FakeProvider(taken={"T1": 900})  # the provider's own view: 900 taken
    view = await run_payment(client, provider, [callback(amount=1)])
    assert provider.reviews == ["amount_mismatch"]
    assert "decided:refund:system" in provider.calls
    assert [c.split(":")[:2] for c in provider.refund_calls] == [["T1", "900"]]  # what the provider took
    assert (view.status.value, view.captured_minor, view.refunded_minor) == ("REFUNDED", 900, 900)
    assert statuses(provider) == ["PENDING", "IN_REVIEW", "REFUNDING", "REFUNDED"]


async def test_terminal_status_never_regresses(client):
    provider = FakeProvider()
    later = [callback(), callback("TRADE_CLOSED", event_id="evt_2"), callback("WAIT_BUYER_PAY", event_id="evt_3")]
    view = await run_payment(client, provider, later)
    assert view.status.value == "SUCCEEDED"
    assert statuses(provider) == ["PENDING", "SUCCEEDED"]


async def test_success_after_closed_callback_is_refunded(client):
    provider = FakeProvider()
    view = await run_payment(client, provider, [callback("TRADE_CLOSED", event_id="evt_a"), callback(event_id="evt_b")])
    assert statuses(provider) == ["PENDING", "CLOSED", "REFUNDING", "REFUNDED"]
    assert len(provider.refund_calls) == 1 and view.refunds[0].reason == "paid after the payment was CLOSED"


async def test_second_paid_trade_is_refunded_once(client):
    provider = FakeProvider()
    second = callback(event_id="evt_2", trade_no="T2")
    view = await run_payment(client, provider, [callback(), second, second.model_copy(update={"event_id": "evt_3"})])
    assert [c.split(":")[:2] for c in provider.refund_calls] == [["T2", "1000"]]
    assert (view.status.value, view.trade_no, view.captured_minor, view.refunded_minor) == ("SUCCEEDED", "T1", 2000, 1000)
    assert statuses(provider) == ["PENDING", "SUCCEEDED", "REFUNDING", "SUCCEEDED"]


async def test_failing_refund_goes_to_review_and_is_bounded(client):
    provider = FakeProvider(refund_fails=True)
    view = await run_payment_until(
        client, provider, [callback("TRADE_CLOSED", event_id="evt_a"), callback(event_id="evt_b")], "IN_REVIEW", reviews=3
    )
    assert provider.reviews == ["refund_failed"] * 3
    assert len(provider.refund_calls) == 3 * TIMING.refund_submissions  # deadline default retried twice, then waits
    assert view.review_reason == "refund_failed"


async def test_risk_rule_hit_is_rejected_by_default_before_any_money_moves(client):
    provider = FakeProvider(risk_hits=["device d1 tried 3 different amounts within 600s"])
    view = await run_payment(client, provider)
    assert provider.reviews == ["risk_rule"]
    assert not [c for c in provider.calls if c.startswith("create")]
    assert view.status.value == "FAILED" and "risk review" in view.reason


async def test_provider_risk_hold_goes_to_review_and_is_rejected_by_default(client):
    error = ApplicationError("ACQ.RISK_HOLD: held by risk control", "ACQ.RISK_HOLD", type=PROVIDER_REJECTED, non_retryable=True)
    provider = FakeProvider(create_error=error)
    view = await run_payment(client, provider)
    assert provider.reviews == ["provider_risk"]
    assert [c for c in provider.calls if c.startswith("create")] == [f"create:{view.payment_id}:create"]
    assert view.status.value == "FAILED" and "provider risk hold" in view.reason
