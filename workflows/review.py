"""ManualReviewWorkflow: a person decides, within a deadline; a child of the payment's workflow.

store the review with its reason and evidence -> wait for an operator's decision (the
``decide`` update; its validator refuses actions that make no sense for this review) ->
when nobody decides within the escalation time, escalate -> at the deadline apply the
safe default for the reason (money captured: refund) -> record who decided what and why.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Optional

from temporalio import workflow

from workflows.common import db_call

with workflow.unsafe.imports_passed_through():
    from paysentinel.names import review_workflow_id as review_workflow_id  # the child's id, defined with the other names
    from activities.payment import PaymentActivities
    from paysentinel.models import (
        REVIEW_ACTIONS,
        ReviewAction,
        ReviewDecision,
        ReviewInput,
        ReviewOutcome,
        ReviewView,
    )


@workflow.defn
class ManualReviewWorkflow:
    @workflow.init
    def __init__(self, input: ReviewInput) -> None:
        self._input = input
        self._allowed, self._default = REVIEW_ACTIONS[input.reason]
        self._status = "OPEN"
        self._outcome: Optional[ReviewOutcome] = None
        self._deadline_at = workflow.now() + timedelta(seconds=input.deadline_seconds)

    @workflow.update
    async def decide(self, decision: ReviewDecision) -> ReviewOutcome:
        """An operator's decision; the validator below has already checked it makes sense."""
        self._outcome = ReviewOutcome(
            review_id=self._input.review_id, action=decision.action, operator=decision.operator, reason=decision.reason
        )
        return self._outcome

    @workflow.signal
    def settle(self, outcome: ReviewOutcome) -> None:
        """The payment settled the question itself (the provider answered): no decision is needed."""
        if self._outcome is None:
            self._outcome = outcome

    @decide.validator
    def _check(self, decision: ReviewDecision) -> None:
        if self._outcome is not None:
            raise ValueError(
                f"review {self._input.review_id} is already decided: {self._outcome.action.value} by {self._outcome.operator}"
            )
        if decision.action not in self._allowed:
            allowed = ", ".join(a.value for a in self._allowed)
            raise ValueError(
                f"'{decision.action.value}' is not possible for a {self._input.reason.value} review; possible: {allowed}"
            )
        if decision.action is ReviewAction.REFUND and self._input.captured_minor == 0:
            raise ValueError("nothing was captured for this payment; there is nothing to refund")

    @workflow.query
    def view(self) -> ReviewView:
        i = self._input
        return ReviewView(
            review_id=i.review_id,
            payment_id=i.payment_id,
            order_id=i.order_id,
            reason=i.reason,
            evidence=i.evidence,
            status="DECIDED" if self._outcome else self._status,
            allowed_actions=self._allowed,
            default_action=self._default,
            deadline_at=self._deadline_at,
            decision=self._outcome,
        )

    @workflow.run
    async def run(self, input: ReviewInput) -> ReviewOutcome:
        await db_call(PaymentActivities.open_review, input, f"open review: {input.reason.value}")
        escalate = min(input.escalate_after_seconds, input.deadline_seconds)
        if not await self._wait(escalate, f"escalate after {escalate:g}s"):
            self._status = "ESCALATED"
            await db_call(PaymentActivities.escalate_review, input, "escalate: waiting too long")
            rest = input.deadline_seconds - escalate
            if not await self._wait(rest, f"default '{self._default.value}' at the deadline"):
                self._outcome = ReviewOutcome(
                    review_id=input.review_id,
                    action=self._default,
                    operator="system",
                    reason=f"no decision by the deadline ({input.deadline_seconds:g}s): safe default applied",
                    by_deadline=True,
                )
        assert self._outcome is not None
        await db_call(PaymentActivities.close_review, self._outcome, f"decided: {self._outcome.action.value}")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._outcome

    async def _wait(self, seconds: float, summary: str) -> bool:
        """True once decided, False when ``seconds`` pass first."""
        if self._outcome is not None:
            return True
        if seconds <= 0:
            return False
        try:
            await workflow.wait_condition(lambda: self._outcome is not None, timeout=seconds, timeout_summary=summary)
            return True
        except asyncio.TimeoutError:
            return False
