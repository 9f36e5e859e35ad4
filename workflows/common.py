"""How every workflow calls activities: explicit timeouts and bounded retries.

The one place that says how an activity is called (its timeouts, retry policy and
non-retryable error types). Since 0.3.0 a payment calls the database, the provider and
the notification channels as local activities (a marker in its history instead of
scheduled/started/completed events and a workflow task each); ``db_call`` and
``provider_call`` stay for the frozen releases and the child workflows' histories.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Awaitable, Callable, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.monitor import MonitorActivities
    from activities.notify import UNSAFE_TARGET, NotificationActivities
    from activities.payment import ORDER_CONFLICT, PROVIDER_REJECTED
    from paysentinel.models import Incident, IncidentInput, PaymentTiming

# Database writes are idempotent: they keep retrying through an outage of hours (every
# 60 s at most) and give up only after DB_OUTAGE_LIMIT; the workflow's history keeps the
# truth meanwhile, and the payment row catches up with the next write.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
    non_retryable_error_types=[ORDER_CONFLICT],
)
DB_OUTAGE_LIMIT = timedelta(hours=6)

# Every activity is a method of an activities class taking one argument; the helpers below
# take the method itself, so the argument is checked and the result typed (for mypy).
Owner = TypeVar("Owner")
Arg = TypeVar("Arg")
Result = TypeVar("Result")
ActivityMethod = Callable[[Owner, Arg], Awaitable[Result]]


async def provider_call(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, timing: PaymentTiming, summary: str) -> Result:
    """A provider call: transient failures retried with backoff up to a limit, rejections never."""
    return await workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=PROVIDER_TIMEOUT,
        retry_policy=provider_retry(timing),
        summary=summary,
    )


def provider_retry(timing: PaymentTiming) -> RetryPolicy:
    """Transient provider failures: retried with backoff up to a limit; rejections never."""
    initial = timing.provider_retry_initial_seconds
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=initial * 8),
        maximum_attempts=timing.provider_max_attempts,
        non_retryable_error_types=[PROVIDER_REJECTED],
    )


PROVIDER_TIMEOUT = timedelta(seconds=15)
DB_TIMEOUT = timedelta(seconds=15)
NOTIFY_TIMEOUT = timedelta(seconds=30)


def notify_retry(timing: PaymentTiming) -> RetryPolicy:
    """A notification: retried with backoff a bounded number of times; an unsafe target never."""
    initial = timing.notify_retry_initial_seconds
    return RetryPolicy(
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=initial * 64),
        maximum_attempts=timing.notify_max_attempts,
        non_retryable_error_types=[UNSAFE_TARGET],
    )


# Per run: the history length (the workflow task) in which a local activity last ran.
_LOCAL_RAN_AT: dict[str, int] = {}


async def before_run_ends() -> None:
    """Call right before a run completes or continues as new.

    The server refuses to end a run in a workflow task when new events (a signal, an
    update) arrived while that task ran; the task is then run again from the history,
    and local activities whose markers were not recorded run again (a database write
    again with a newer snapshot number, a notification checked again). So a run ends only
    in a task that ran no local activity: if one ran in this task, a short timer starts a
    new one first (two events; most runs end on a timer anyway)."""
    info = workflow.info()
    if _LOCAL_RAN_AT.pop(info.run_id, None) == info.get_current_history_length():
        await workflow.sleep(0.01, summary="end the run in a workflow task of its own")


async def _local(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, **options: Any) -> Result:
    """A local activity; its failure raised as an ``ActivityError`` whose cause is the
    activity's error, as for an ordinary activity (so callers handle both alike)."""
    info = workflow.info()
    try:
        return await workflow.execute_local_activity_method(activity, arg, **options)
    except ActivityError:
        raise
    except FailureError as err:
        name = getattr(activity, "__name__", str(activity))
        raise ActivityError(
            f"local activity {name} failed",
            scheduled_event_id=0,
            started_event_id=0,
            identity="",
            activity_type=name,
            activity_id="",
            retry_state=None,
        ) from err
    finally:
        _LOCAL_RAN_AT[info.run_id] = info.get_current_history_length()


async def provider_local(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, timing: PaymentTiming, summary: str) -> Result:
    """A provider call as a local activity: the same timeouts and retries as ``provider_call``."""
    return await _local(
        activity, arg, start_to_close_timeout=PROVIDER_TIMEOUT, retry_policy=provider_retry(timing), summary=summary
    )


async def db_local(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, summary: str) -> Result:
    """A database write as a local activity: idempotent, retried through an outage up to DB_OUTAGE_LIMIT."""
    return await _local(
        activity,
        arg,
        start_to_close_timeout=DB_TIMEOUT,
        schedule_to_close_timeout=DB_OUTAGE_LIMIT,
        retry_policy=DB_RETRY,
        summary=summary,
    )


async def notify_local(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, timing: PaymentTiming, summary: str) -> Result:
    """A notification (e-mail, merchant webhook) as a local activity; each channel is sent once."""
    return await _local(activity, arg, start_to_close_timeout=NOTIFY_TIMEOUT, retry_policy=notify_retry(timing), summary=summary)


async def db_call(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, summary: str) -> Result:
    """A database write: idempotent, so retried a bounded number of times."""
    return await workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=DB_TIMEOUT,
        schedule_to_close_timeout=DB_OUTAGE_LIMIT,
        retry_policy=DB_RETRY,
        summary=summary,
    )


async def notify_call(activity: ActivityMethod[Owner, Arg, Result], arg: Arg, timing: PaymentTiming, summary: str) -> Result:
    """A notification as an activity (releases before 0.3.0)."""
    return await workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=NOTIFY_TIMEOUT,
        retry_policy=notify_retry(timing),
        summary=summary,
    )


ALERT_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=60), maximum_attempts=5)


async def alert_once(check: IncidentInput, summary: str) -> Incident | None:
    """Open, keep or resolve the incident ``check`` describes; send its news (the alert
    when it opens, the all-clear when it is over) once. Returns the incident, with
    ``to_send`` telling whether this call sent something."""
    incident: Incident | None = await db_call(MonitorActivities.track_incident, check, summary)
    await _send_news(incident)
    return incident


async def alert_once_local(check: IncidentInput, summary: str) -> Incident | None:
    """``alert_once`` with the incident's database write as a local activity."""
    incident: Incident | None = await db_local(MonitorActivities.track_incident, check, summary)
    await _send_news(incident)
    return incident


async def _send_news(incident: Incident | None) -> None:
    if incident is not None and incident.to_send:
        await workflow.execute_activity_method(
            NotificationActivities.send_alert,
            incident,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ALERT_RETRY,
            summary=f"alert: incident {incident.id} {incident.status.lower()}",
        )


def cause(err: ActivityError) -> str:
    return str(err.cause) if err.cause is not None else str(err)


def rejection_code(err: ActivityError) -> str | None:
    """The provider's code when the activity failed with a definitive rejection, else None."""
    if isinstance(err.cause, ApplicationError) and err.cause.type == PROVIDER_REJECTED:
        details = err.cause.details
        return str(details[0]) if details else "REJECTED"
    return None
