"""The payment's child workflows, run alongside its main line: refunds (RefundWorkflow)
and manual reviews (ManualReviewWorkflow), what happens when one fails (recorded, alerted
once, started again; then a person or a review's safe default), and the notifications
and alerts sent on the way.

``ChildWorkflows`` is a part of ``Payment``, the 0.3.0 main line in
workflows/payment_lifecycle.py (start there): Payment inherits it, and the main line calls
``_review`` (risk rules, provider risk hold, status unknown), ``_start_refund`` (a
merchant's refund, money the order does not account for), ``_tell``, ``_spawn`` and
``_alert_child``. What a provider's answer means for the payment is applied in
workflows/payment_results.py, which opens the reviews and refunds it calls for through
these methods.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Optional

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

from workflows.payment_notify import alert_child, failure, notification, send
from workflows.payment_state import PaymentState

with workflow.unsafe.imports_passed_through():
    # The children are started by their type names, so the sandbox does not import the refund
    # and review workflow modules into every payment it starts or replays.
    from paysentinel.names import (
        REFUND_WORKFLOW,
        REVIEW_SETTLE_SIGNAL,
        REVIEW_WORKFLOW,
        refund_workflow_id,
        review_workflow_id,
    )
    from paysentinel.models import (
        REVIEW_ACTIONS,
        NotifyKind,
        RefundInput,
        RefundStatus,
        RefundView,
        ReviewAction,
        ReviewInput,
        ReviewOutcome,
        ReviewReason,
    )
    from paysentinel.rules import (
        IN_REVIEW_WORDS,
        child_suffix,
        customer_reason,
        refund_id_for,
        review_number,
    )

# A failed refund is retried by a review's deadline default this many times; after that
# its review has no deadline: a person must decide.
AUTOMATIC_REFUND_ROUNDS = 2
NO_DEADLINE_SECONDS = 10 * 365 * 86400.0
# A child workflow that fails (terminated, timed out, id clash) is started again this
# many times in all; then a refund goes to a person, a review applies its safe default.
CHILD_ATTEMPTS = 3


async def _result(handle: workflow.ChildWorkflowHandle) -> Any:
    return await handle


class ChildWorkflows(PaymentState):
    """Refunds and reviews of a payment (child workflows), and what runs alongside its main line."""

    # --- Refunds --------------------------------------------------------------------------

    def _start_refund(self, trade_no: str, amount: int, key: str, reason: str, requested_by: str) -> RefundView:
        view = RefundView(
            refund_id=refund_id_for(self._request.order_id, key),
            trade_no=trade_no,
            amount_minor=amount,
            status=RefundStatus.PROCESSING,
            reason=reason,
            requested_by=requested_by,
        )
        self._book.refunds[key] = view
        self._spawn(self._run_refund(key, view, round=0), f"refund {view.refund_id}")
        return view

    async def _run_refund(self, key: str, view: RefundView, round: int) -> None:
        request, timing = self._request, self._input.timing
        await self._settle("refund started", f"{self._money(view.amount_minor)} of trade {view.trade_no}: {view.reason}")
        self._tell(NotifyKind.REFUND_STARTED, f"refund-{key}-{round}", customer_reason(view), view.amount_minor)
        result: Optional[RefundView] = None
        for attempt in range(CHILD_ATTEMPTS):
            suffix = child_suffix(key) + (f"-again{round}" if round else "") + (f"-retry{attempt}" if attempt else "")
            child_id = refund_workflow_id(self._input.payment_id, suffix)
            try:
                result = await workflow.execute_child_workflow(
                    REFUND_WORKFLOW,
                    RefundInput(
                        payment_id=self._input.payment_id,
                        provider=request.provider,
                        order_id=request.order_id,
                        trade_no=view.trade_no,
                        refund_id=view.refund_id,
                        amount_minor=view.amount_minor,
                        currency=request.currency,
                        reason=view.reason,
                        requested_by=view.requested_by,
                        timing=timing,
                    ),
                    id=child_id,
                    result_type=RefundView,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    static_summary=f"Refund {self._money(view.amount_minor)} of order {request.order_id}",
                )
                break
            except (ChildWorkflowError, WorkflowAlreadyStartedError) as err:
                await self._child_failed(f"refund workflow {child_id}", err)
                if attempt + 1 < CHILD_ATTEMPTS:
                    self._note("refund again", f"a new refund workflow with the same provider refund id {view.refund_id}")
        if result is None:
            result = view.model_copy(
                update={
                    "status": RefundStatus.FAILED,
                    "detail": f"its refund workflow failed {CHILD_ATTEMPTS} times; the provider may have refunded it "
                    f"(refund id {view.refund_id}): a person must check",
                }
            )
        self._book.refunds[key] = result
        if result.status is RefundStatus.SUCCEEDED:
            self._book.refunded[view.trade_no] = self._book.refunded.get(view.trade_no, 0) + view.amount_minor
            await self._settle("refunded", f"{self._money(view.amount_minor)} of trade {view.trade_no}")
            self._tell(
                NotifyKind.REFUNDED,
                f"refund-{key}-done",
                f"the refund of {self._money(view.amount_minor)} was completed",
                view.amount_minor,
            )
            return
        self._note("refund failed", result.detail or "")
        outcome = await self._review(
            ReviewReason.REFUND_FAILED,
            f"refund {view.refund_id} of {self._money(view.amount_minor)} (round {round + 1}): {result.detail}",
            deadline_seconds=None if round < AUTOMATIC_REFUND_ROUNDS else NO_DEADLINE_SECONDS,
        )
        if outcome.action is ReviewAction.REFUND:
            retry = view.model_copy(update={"status": RefundStatus.PROCESSING, "detail": None})
            self._book.refunds[key] = retry
            await self._run_refund(key, retry, round + 1)
        else:
            # A person decided the money stays: recorded, so the books balance on purpose.
            self._book.kept[view.trade_no] = self._book.kept.get(view.trade_no, 0) + view.amount_minor
            await self._settle(
                "refund abandoned",
                f"by {outcome.operator}: {outcome.reason}; "
                f"{self._money(view.amount_minor)} of trade {view.trade_no} stays with the merchant",
            )

    # --- Reviews --------------------------------------------------------------------------

    async def _review(
        self,
        reason: ReviewReason,
        evidence: str,
        deadline_seconds: Optional[float] = None,
        watch: Optional[Callable[[int], Awaitable[Optional[ReviewOutcome]]]] = None,
    ) -> ReviewOutcome:
        """Open a manual review (a child workflow) and wait for its decision. A review
        workflow that fails is opened again; after CHILD_ATTEMPTS the safe default applies.
        With ``watch``, the provider is looked at on the backoff meanwhile; an outcome it
        returns settles the review."""
        timing = self._input.timing
        for _ in range(CHILD_ATTEMPTS):
            self._book.reviews += 1
            review_id = review_workflow_id(self._input.payment_id, self._book.reviews)
            self._book.open_reviews[review_id] = reason.value
            self._book.review_reason = reason.value
            await self._settle("review opened", f"{reason.value}: {evidence}", review_reason=reason.value)
            self._tell(
                NotifyKind.IN_REVIEW,
                f"review-{self._book.reviews}",
                IN_REVIEW_WORDS,
                sum(self._book.captured.values()) or self._request.amount_minor,
            )
            try:
                handle = await workflow.start_child_workflow(
                    REVIEW_WORKFLOW,
                    ReviewInput(
                        review_id=review_id,
                        payment_id=self._input.payment_id,
                        order_id=self._request.order_id,
                        reason=reason,
                        evidence=evidence,
                        amount_minor=self._request.amount_minor,
                        currency=self._request.currency,
                        captured_minor=sum(self._book.captured.values()),
                        escalate_after_seconds=timing.review_escalate_seconds,
                        deadline_seconds=deadline_seconds or timing.review_deadline_seconds,
                    ),
                    id=review_id,
                    result_type=ReviewOutcome,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    static_summary=f"Review of order {self._request.order_id}: {reason.value}",
                )
                self._review_handles[review_id] = handle
                decided = asyncio.create_task(_result(handle))
                if watch is not None:
                    await self._watch_review(handle, decided, watch)
                outcome: ReviewOutcome = await decided
            except (ChildWorkflowError, WorkflowAlreadyStartedError) as err:
                del self._book.open_reviews[review_id]
                await self._child_failed(f"review workflow {review_id}", err)
                evidence = f"{evidence} (review {review_id} failed: {failure(err)}; opened again)"
                continue
            finally:
                self._review_handles.pop(review_id, None)
            del self._book.open_reviews[review_id]
            self._note("review decided", f"{outcome.action.value} by {outcome.operator}: {outcome.reason}")
            return outcome
        default = REVIEW_ACTIONS[reason][1]
        self._note("review default", f"{CHILD_ATTEMPTS} review workflows failed; the safe default '{default.value}' applies")
        return ReviewOutcome(
            review_id=review_workflow_id(self._input.payment_id, self._book.reviews),
            action=default,
            operator="system",
            reason=f"{CHILD_ATTEMPTS} review workflows failed: safe default applied",
            by_deadline=True,
        )

    async def _watch_review(
        self,
        handle: workflow.ChildWorkflowHandle,
        decided: asyncio.Task,
        watch: Callable[[int], Awaitable[Optional[ReviewOutcome]]],
    ) -> None:
        attempt = 0
        while not decided.done():
            delay = self._backoff(attempt)
            try:
                await workflow.wait_condition(
                    lambda: decided.done() or bool(self._inbox),
                    timeout=delay,
                    timeout_summary=f"look at the provider again in {delay:g}s",
                )
            except asyncio.TimeoutError:
                attempt += 1
            if decided.done():
                return
            outcome = await watch(attempt)
            if outcome is not None and not decided.done():
                await handle.signal(REVIEW_SETTLE_SIGNAL, outcome.model_copy(update={"review_id": handle.id}))
                return

    async def _settlement_review(self, trade_no: str, evidence: str) -> None:
        outcome = await self._review(ReviewReason.SETTLEMENT_MISMATCH, evidence)
        if outcome.action is ReviewAction.REFUND and (amount := self._book.settlement_refund(trade_no)) > 0:
            self._start_refund(
                trade_no,
                amount,
                f"review-{review_number(outcome.review_id)}",
                f"settlement mismatch, refund by {outcome.operator}: {outcome.reason}",
                outcome.operator,
            )
            return
        await self._settle("settlement checked", f"{outcome.action.value} by {outcome.operator}: {outcome.reason}")

    # --- Failures, alerts and work alongside the main line --------------------------------

    async def _child_failed(self, what: str, err: BaseException) -> None:
        """A child workflow failed: on the timeline, and operators are alerted once per payment."""
        detail = f"{what} {failure(err)}"
        self._note("child workflow failed", detail)
        self._book.alerted = True
        await self._alert_child(
            breach=True, detail=f"payment {self._input.payment_id} (order {self._request.order_id}): {detail}"
        )

    async def _alert_child(self, breach: bool, detail: str) -> None:
        await alert_child(self._input.payment_id, breach, detail)

    def _tell(self, kind: NotifyKind, key: str, detail: str, amount_minor: int) -> None:
        """Tell the customer and the merchant, alongside the main line; once per ``key``."""
        told = notification(self._input.payment_id, self._request, kind, key, detail, amount_minor)
        if told is not None:
            self._spawn(send(told, self._input.timing, self._note), f"notify {kind.value}")

    def _spawn(self, work: Awaitable[None], what: str) -> None:
        """Run a refund, review or notification alongside the main line; the workflow
        waits for it before ending. Whatever it raises is recorded and alerted."""
        self._busy += 1

        async def run() -> None:
            try:
                await work
            except (ActivityError, ChildWorkflowError) as err:
                self._note(f"{what} failed", failure(err))
                self._book.alerted = True
                await self._alert_child(breach=True, detail=f"payment {self._input.payment_id}: {what} failed: {failure(err)}")
            finally:
                self._busy -= 1

        asyncio.create_task(run())
