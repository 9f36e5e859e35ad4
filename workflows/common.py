"""How every workflow calls activities: explicit timeouts and bounded retries."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.monitor import MonitorActivities
    from activities.notify import NotificationActivities
    from activities.payment import ORDER_CONFLICT, PROVIDER_REJECTED
    from paysentinel.models import Incident, IncidentInput, PaymentTiming

# Database writes are idempotent: they keep retrying through an outage of hours (every
# 60 s at most) and give up only after DB_OUTAGE_LIMIT; the workflow's history keeps the
# truth meanwhile, and the payment row catches up with the next write.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=60), maximum_attempts=0,
    non_retryable_error_types=[ORDER_CONFLICT],
)
DB_OUTAGE_LIMIT = timedelta(hours=6)


async def provider_call(activity, arg, timing: PaymentTiming, summary: str):
    """A provider call: transient failures retried with backoff up to a limit, rejections never."""
    initial = timing.provider_retry_initial_seconds
    return await workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=timedelta(seconds=15),
        retry_policy=RetryPolicy(
            initial_interval=timedelta(seconds=initial),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=initial * 8),
            maximum_attempts=timing.provider_max_attempts,
            non_retryable_error_types=[PROVIDER_REJECTED],
        ),
        summary=summary,
    )


async def db_call(activity, arg, summary: str):
    """A database write: idempotent, so retried a bounded number of times."""
    return await workflow.execute_activity_method(
        activity, arg, start_to_close_timeout=timedelta(seconds=15), schedule_to_close_timeout=DB_OUTAGE_LIMIT,
        retry_policy=DB_RETRY, summary=summary,
    )


ALERT_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=60),
                          maximum_attempts=5)


async def alert_once(check: IncidentInput, summary: str) -> Incident | None:
    """Open, keep or resolve the incident ``check`` describes; send its news (the alert
    when it opens, the all-clear when it is over) once. Returns the incident, with
    ``to_send`` telling whether this call sent something."""
    incident: Incident | None = await db_call(MonitorActivities.track_incident, check, summary)
    if incident is not None and incident.to_send:
        await workflow.execute_activity_method(
            NotificationActivities.send_alert, incident, start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ALERT_RETRY, summary=f"alert: incident {incident.id} {incident.status.lower()}",
        )
    return incident


def cause(err: ActivityError) -> str:
    return str(err.cause) if err.cause is not None else str(err)


def rejection_code(err: ActivityError) -> str | None:
    """The provider's code when the activity failed with a definitive rejection, else None."""
    if isinstance(err.cause, ApplicationError) and err.cause.type == PROVIDER_REJECTED:
        details = err.cause.details
        return str(details[0]) if details else "REJECTED"
    return None
