"""What a payment tells others, alongside its main line: the customer and the merchant
(one notification per event, by e-mail and/or the merchant's webhook) and the operators
(an alert once per payment when a child workflow failed, an all-clear when they are done).

Used by the payment's child-workflow part (workflows/payment_children.py); every call
here is a local activity of the payment.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError, WorkflowAlreadyStartedError

from workflows.common import alert_once_local, cause, notify_local

with workflow.unsafe.imports_passed_through():
    from activities.notify import NotificationActivities
    from paysentinel.models import IncidentInput, NotificationInput, NotifyKind, PaymentOrder, PaymentTiming

Note = Callable[[str, str], None]  # the payment's timeline: (event, detail)


def notification(
    payment_id: str, order: PaymentOrder, kind: NotifyKind, key: str, detail: str, amount_minor: int
) -> Optional[NotificationInput]:
    """The notification of one event (``key`` is unique per payment), or None when the
    order gave nobody to tell."""
    if not order.customer.email and not order.notify_url:
        return None
    return NotificationInput(
        key=f"{payment_id}:{key}",
        payment_id=payment_id,
        order_id=order.order_id,
        kind=kind,
        amount_minor=amount_minor,
        currency=order.currency,
        detail=detail,
        email=order.customer.email,
        webhook_url=order.notify_url,
    )


async def send(notification: NotificationInput, timing: PaymentTiming, note: Note) -> None:
    """Send it; the outcome goes on the timeline. A failure does not stop the payment."""
    try:
        await notify_local(NotificationActivities.notify, notification, timing, f"notify customer: {notification.kind.value}")
        note("notified", f"{notification.kind.value}: {notification.detail}")
    except ActivityError as err:
        note("notification failed", f"{notification.kind.value}: {cause(err)}")


async def alert_child(payment_id: str, breach: bool, detail: str) -> None:
    """Alert operators that a child workflow of the payment failed (breach), or that all
    of them have finished; one incident per payment."""
    digest = hashlib.sha256(payment_id.encode()).hexdigest()[:20]
    await alert_once_local(
        IncidentInput(
            monitor=f"payment:{digest}", kind="child_failed", breach=breach, rate=1, threshold=0, payments=1, detail=detail
        ),
        "alert: a child workflow failed" if breach else "all-clear: children finished",
    )


def failure(err: BaseException) -> str:
    """What happened to a child workflow, in words."""
    if isinstance(err, WorkflowAlreadyStartedError):
        return "its workflow id is already in use"
    inner = err.cause if isinstance(err, ChildWorkflowError) and err.cause is not None else err
    return f"{type(inner).__name__}: {inner}"
