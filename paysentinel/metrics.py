"""Prometheus metrics of the payment flow (prometheus-client).

Counted where a fact becomes durable, exactly once: a payment transition when its
database snapshot is applied (a retried write is not counted again), a refund when its
final state is saved, a callback when the receiver answers it. Rates such as the failure
rate are PromQL over these counters (see deploy/prometheus/alerts.yml); the monitor
workflow also publishes its own window figures as gauges.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from paysentinel.models import STUCK_KINDS

if TYPE_CHECKING:
    from paysentinel.models import PaymentRecord

payments_started = Counter("paysentinel_payments_started_total", "Payments whose trade was created", ["provider"])
payments_final = Counter(
    "paysentinel_payments_final_total",
    "Payments reaching their outcome: SUCCEEDED, FAILED (no trade) or CLOSED (unpaid, timed out)",
    ["status", "provider"],
)
payments_reviewed = Counter("paysentinel_reviews_opened_total", "Manual reviews opened", ["reason"])
transitions = Counter("paysentinel_payment_transitions_total", "Payment status transitions", ["status"])
provider_retries = Counter(
    "paysentinel_provider_retries_total", "Provider calls retried after a transient error", ["provider", "operation"]
)
refunds = Counter("paysentinel_refunds_total", "Refunds reaching a final state", ["status"])
refunded_minor = Counter("paysentinel_refunded_minor_total", "Refunded amount in minor units", ["currency"])
callbacks = Counter("paysentinel_callbacks_total", "Provider callbacks answered by the webhook receiver", ["provider", "result"])
callback_to_status = Histogram(
    "paysentinel_callback_to_status_seconds",
    "From receiving a callback to the payment status it caused",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
time_to_final = Histogram(
    "paysentinel_time_to_final_seconds",
    "From checkout to a final lifecycle state",
    ["status"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200),
)
# Published by the monitor workflow for its sliding window.
window_failure_rate = Gauge("paysentinel_window_failure_rate", "FAILED / finished payments in the monitor's window")
window_timeout_rate = Gauge("paysentinel_window_timeout_rate", "CLOSED (unpaid) / finished payments in the window")
alerts = Counter("paysentinel_alerts_total", "Alerts sent for incidents (monitor rates, reconciliation)", ["kind"])
# Read from the database when /metrics is scraped.
open_reviews = Gauge("paysentinel_open_reviews", "Manual reviews waiting for a decision")
oldest_review_seconds = Gauge("paysentinel_oldest_open_review_seconds", "Age of the oldest undecided review")
pending_payments = Gauge("paysentinel_pending_payments", "Payments waiting for the payer or the provider")
stuck_payments = Gauge(
    "paysentinel_stuck_payments",
    "Money that should be moving and is not (should stay 0), by kind: open_past_ttl (CREATED/PENDING past the "
    "time to live), refunding_without_child / review_without_child (REFUNDING/IN_REVIEW without a running refund "
    "or review workflow), refund_processing_too_long (refunds PROCESSING past the provider's limit)",
    ["kind"],
)
for _kind in STUCK_KINDS:  # served as 0 before the first measurement
    stuck_payments.labels(_kind)


def publish_stuck(counts: dict[str, int]) -> None:
    for kind in STUCK_KINDS:
        stuck_payments.labels(kind).set(counts.get(kind, 0))


def count_transition(record: "PaymentRecord", provider: str | None, created_at: datetime | None, *, finished: bool) -> None:
    """Count one applied transition (``finished``: it recorded the payment's outcome)."""
    now = datetime.now(timezone.utc)
    transitions.labels(record.status.value).inc()
    if record.event == "trade created":
        payments_started.labels(provider or "").inc()
    if finished and record.outcome is not None:
        payments_final.labels(record.outcome.value, provider or "").inc()
        if created_at is not None:
            time_to_final.labels(record.outcome.value).observe((now - created_at).total_seconds())
    if record.event == "review opened" and record.review_reason:
        payments_reviewed.labels(record.review_reason).inc()
    if record.callback_received_at is not None:
        callback_to_status.observe(max(0.0, (now - record.callback_received_at).total_seconds()))
