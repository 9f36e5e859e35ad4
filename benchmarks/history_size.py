"""Benchmark: how many events a payment's history holds, per scenario.

A payment's history is what every worker replays after a restart or a cache eviction,
and what the server keeps for days; fewer events per payment means cheaper replays and
more payments per history shard. This runs PaymentWorkflow (the code of this checkout)
on a Temporal dev server with scripted activities (no provider, no database), started
the way the checkout API starts it, and prints the events of each payment's first run:

- ``running``: once the outcome is final and the payment listens for late callbacks;
- ``finished``: when the run has ended (completed, or continued as new into its refund
  phase).

Scenarios: ``paid`` (the callback arrives), ``lost`` (the callback never comes, the first
query finds the payment), ``never`` (nobody pays within a 60 s time to live). Timings are
the defaults (callback timeout 10 s, query backoff 5, 10, 30, 60 s, ...) scaled down by
``--scale`` so a run takes seconds; the number of queries, timers and writes is the same.
The customer has an e-mail address, so every outcome is notified.

    python benchmarks/history_size.py [--scale 0.05] [--address host:port] [--start start-then-update]
"""

from __future__ import annotations

import argparse
import base64
import asyncio
import os
import sys
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from temporalio import activity  # noqa: E402
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowExecutionStatus  # noqa: E402
from temporalio.common import WorkflowIDConflictPolicy  # noqa: E402
from temporalio.worker import Worker  # noqa: E402

from paysentinel.models import (  # noqa: E402
    PaymentOrder,
    CreateTradeInput,
    OrderCustomer,
    Incident,
    IncidentInput,
    NotificationInput,
    PaymentInput,
    PaymentRecord,
    PaymentTiming,
    PaymentView,
    ProviderCallback,
    ProviderRefund,
    RecordPaymentInput,
    RefundInput,
    RefundRecord,
    ReviewInput,
    ReviewOutcome,
    RiskCheckInput,
    RiskVerdict,
    Trade,
    TradeRef,
    TradeStatus,
)
from workers.main import WORKFLOWS  # noqa: E402
from workflows.payment import PaymentWorkflow  # noqa: E402

DEFAULTS = {"callback": 10.0, "backoff": [5, 10, 30, 60, 120, 300], "retry": 1.0, "notify": 2.0}


def timing(scale: float, ttl: float) -> PaymentTiming:
    return PaymentTiming(
        callback_timeout_seconds=DEFAULTS["callback"] * scale,
        query_backoff_seconds=[s * scale for s in DEFAULTS["backoff"]],
        payment_ttl_seconds=ttl * scale,
        resend_window_seconds=max(1.0, 20 * scale),
        close_attempts=5,
        provider_retry_initial_seconds=DEFAULTS["retry"] * scale,
        provider_max_attempts=4,
        refund_window_seconds=3600,
        notify_retry_initial_seconds=DEFAULTS["notify"] * scale,
    )


class Scripted:
    """The provider and the database, scripted: ``paid_on_query`` makes queries find the payment."""

    def __init__(self, paid_on_query: bool):
        self.paid_on_query = paid_on_query

    def trade(self, order_id: str, status: str) -> Trade:
        return Trade(
            order_id=order_id,
            trade_no="T1",
            status=TradeStatus(status),
            amount_minor=1000,
            currency="CNY",
            pay_url="http://pay/T1",
        )

    def activities(self) -> list:
        @activity.defn(name="record_payment")
        async def record_payment(payload: RecordPaymentInput) -> None:
            return None

        @activity.defn(name="open_payment")
        async def open_payment(payload: RecordPaymentInput) -> RiskVerdict:
            return RiskVerdict(flagged=False)

        @activity.defn(name="assess_risk")
        async def assess_risk(check: RiskCheckInput) -> RiskVerdict:
            return RiskVerdict(flagged=False)

        @activity.defn(name="save_payment_state")
        async def save_payment_state(record: PaymentRecord) -> bool:
            return True

        @activity.defn(name="create_trade")
        async def create_trade(payload: CreateTradeInput) -> Trade:
            return self.trade(payload.order_id, "WAIT_BUYER_PAY")

        @activity.defn(name="query_trade")
        async def query_trade(ref: TradeRef) -> Trade:
            return self.trade(ref.order_id, "TRADE_SUCCESS" if self.paid_on_query else "WAIT_BUYER_PAY")

        @activity.defn(name="close_trade")
        async def close_trade(ref: TradeRef) -> Trade:
            return self.trade(ref.order_id, "TRADE_CLOSED")

        @activity.defn(name="refund_trade")
        async def refund_trade(request: RefundInput) -> ProviderRefund:
            raise RuntimeError("not in these scenarios")

        @activity.defn(name="query_refund")
        async def query_refund(request: RefundInput) -> ProviderRefund | None:
            return None

        @activity.defn(name="save_refund")
        async def save_refund(record: RefundRecord) -> None:
            return None

        @activity.defn(name="open_review")
        async def open_review(review: ReviewInput) -> None:
            return None

        @activity.defn(name="escalate_review")
        async def escalate_review(review: ReviewInput) -> None:
            return None

        @activity.defn(name="close_review")
        async def close_review(outcome: ReviewOutcome) -> None:
            return None

        @activity.defn(name="track_incident")
        async def track_incident(check: IncidentInput) -> Incident | None:
            return None

        @activity.defn(name="send_alert")
        async def send_alert(incident: Incident) -> None:
            return None

        @activity.defn(name="notify")
        async def notify(n: NotificationInput) -> list[str]:
            return ["email"]

        return [
            record_payment,
            open_payment,
            assess_risk,
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
            track_incident,
            send_alert,
            notify,
        ]


async def start(client: Client, payment_input: PaymentInput, task_queue: str, how: str) -> None:
    """As the checkout API does: start the payment and wait for its pay URL (the checkout update)."""
    options = dict(id=payment_input.payment_id, task_queue=task_queue, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
    if how == "update-with-start":  # the checkout API since 0.3.0
        await client.execute_update_with_start_workflow(
            PaymentWorkflow.checkout,
            start_workflow_operation=WithStartWorkflowOperation(PaymentWorkflow.run, payment_input, **options),
        )
        return
    handle = await client.start_workflow(PaymentWorkflow.run, payment_input, **options)
    await handle.execute_update(PaymentWorkflow.checkout)


async def events(client: Client, workflow_id: str, run_id: str) -> int:
    return len((await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()).events)


async def scenario(client: Client, name: str, scale: float, how: str) -> tuple[int, int]:
    scripted = Scripted(paid_on_query=name == "lost")
    task_queue = f"history-size-{uuid.uuid4().hex[:8]}"
    order = f"hs-{name}-{uuid.uuid4().hex[:8]}"
    payment_input = PaymentInput(
        payment_id=f"payment-{order}",
        request=PaymentOrder(
            order_id=order, amount_minor=1000, currency="CNY", customer=OrderCustomer(email="payer@example.com")
        ),
        notify_url="http://127.0.0.1:1/webhooks/simulator",
        timing=timing(scale, 60 if name == "never" else 900),  # never: a 60 s time to live
    )
    async with Worker(client, task_queue=task_queue, workflows=WORKFLOWS, activities=scripted.activities()):
        await start(client, payment_input, task_queue, how)
        handle = client.get_workflow_handle(payment_input.payment_id)
        run_id = (await handle.describe()).run_id
        if name == "paid":
            await asyncio.sleep(DEFAULTS["callback"] * scale / 3)  # the payer pays
            await handle.signal(
                PaymentWorkflow.callback,
                ProviderCallback(
                    event_id="evt-1",
                    provider="simulator",
                    order_id=order,
                    trade_no="T1",
                    trade_status=TradeStatus.TRADE_SUCCESS,
                    amount_minor=1000,
                    currency="CNY",
                    received_at=datetime.now(timezone.utc),
                ),
            )
        deadline = datetime.now(timezone.utc) + timedelta(seconds=600 * scale + 60)
        running = None
        while datetime.now(timezone.utc) < deadline:
            first = client.get_workflow_handle(payment_input.payment_id, run_id=run_id)
            described = await first.describe()
            if described.status is not WorkflowExecutionStatus.RUNNING:
                return running or await events(client, first.id, run_id), await events(client, first.id, run_id)
            if running is None:
                view: PaymentView = await first.query(PaymentWorkflow.view)
                if "listening" in [e.event for e in view.timeline]:
                    running = await events(client, first.id, run_id)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{name}: the payment did not end")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--address", default=os.environ.get("TEMPORAL_ADDRESS"))
    parser.add_argument(
        "--start",
        choices=("update-with-start", "start-then-update"),
        default="update-with-start",
        help="how the checkout API starts a payment (before 0.3.0: start-then-update)",
    )
    args = parser.parse_args()
    server = None
    address = args.address
    if not address:
        from paysentinel.config import DEFAULT_CACHE_DIR
        from paysentinel.devserver import DevServer, ensure_temporal_cli, free_port

        cli = ensure_temporal_cli(Path(os.environ.get("PAYSENTINEL_CACHE_DIR", DEFAULT_CACHE_DIR)))
        log_file = Path(tempfile.mkdtemp(prefix="history-size-")) / "temporal.log"
        server = DevServer(cli, log_file=log_file, port=free_port(), ui_port=free_port())
        server.start()
        await server.wait_ready()
        address = server.address
    from paysentinel.config import Settings
    from paysentinel.temporal import connect

    # The workers' data converter, with a throwaway payload key.
    key = base64.b64encode(os.urandom(32)).decode()
    client = await connect(Settings(TEMPORAL_ADDRESS=address, payload_keys=f"bench:{key}"))
    try:
        from paysentinel.devserver import ensure_search_attributes

        await ensure_search_attributes(client)
        results = await asyncio.gather(*(scenario(client, name, args.scale, args.start) for name in ("paid", "lost", "never")))
        print(f"{'scenario':<10}{'running':>9}{'finished':>10}")
        for name, (running, finished) in zip(("paid", "lost", "never"), results):
            print(f"{name:<10}{running:>9}{finished:>10}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
