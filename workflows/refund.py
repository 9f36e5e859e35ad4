"""RefundWorkflow: one refund of one paid trade, a child of the payment's workflow.

submit the refund (the refund id is the provider's out_request_no, so a retried
submission is the same refund) -> query its status on the backoff schedule until it is
final -> a failed refund is resubmitted with the same id, a bounded number of times ->
SUCCEEDED or FAILED (the parent opens a manual review for a failed refund).
"""

from __future__ import annotations

from typing import Optional

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.common import cause, db_call, provider_call, rejection_code

with workflow.unsafe.imports_passed_through():
    from paysentinel.names import refund_workflow_id as refund_workflow_id  # the child's id, defined with the other names
    from activities.payment import PaymentActivities
    from paysentinel.models import ProviderRefund, RefundInput, RefundRecord, RefundStatus, RefundView

# How many status queries one submission gets before it is submitted again.
QUERIES_PER_SUBMISSION = 8


@workflow.defn
class RefundWorkflow:
    @workflow.init
    def __init__(self, input: RefundInput) -> None:
        self._input = input
        self._status = RefundStatus.PROCESSING
        self._submissions = 0
        self._detail: Optional[str] = None

    @workflow.query
    def view(self) -> RefundView:
        i = self._input
        return RefundView(
            refund_id=i.refund_id,
            trade_no=i.trade_no,
            amount_minor=i.amount_minor,
            status=self._status,
            reason=i.reason,
            requested_by=i.requested_by,
            detail=self._detail,
        )

    @workflow.run
    async def run(self, input: RefundInput) -> RefundView:
        await self._save()
        backoff = input.timing.query_backoff_seconds
        for submission in range(1, input.timing.refund_submissions + 1):
            self._submissions = submission
            result = await self._submit(submission)
            if result is None and self._detail and self._detail.startswith("rejected"):
                break  # a definitive no from the provider: resubmitting changes nothing
            for number in range(QUERIES_PER_SUBMISSION):
                if result is None or result.status is not RefundStatus.PROCESSING:
                    break
                delay = backoff[min(number, len(backoff) - 1)]
                await workflow.sleep(delay, summary=f"refund processing; query in {delay:g}s")
                result = await self._query(result)
            if result is not None and result.status is RefundStatus.SUCCEEDED:
                self._status, self._detail = RefundStatus.SUCCEEDED, "refunded at the provider"
                break
            if result is not None and result.status is RefundStatus.FAILED:
                self._detail = f"provider: {result.fail_reason or 'refund failed'}"
            if submission < input.timing.refund_submissions:
                delay = backoff[min(submission - 1, len(backoff) - 1)]
                await workflow.sleep(delay, summary=f"submit refund again in {delay:g}s ({self._detail})")
        if self._status is not RefundStatus.SUCCEEDED:
            self._status = RefundStatus.FAILED
            self._detail = f"{self._detail or 'no answer'} after {self._submissions} submission(s)"
        await self._save()
        return self.view()

    async def _submit(self, submission: int) -> Optional[ProviderRefund]:
        try:
            return await provider_call(
                PaymentActivities.refund_trade,
                self._input,
                self._input.timing,
                f"submit refund {self._input.refund_id} #{submission}",
            )
        except ActivityError as err:
            code = rejection_code(err)
            self._detail = f"rejected: {cause(err)}" if code else f"provider unavailable: {cause(err)}"
            return None

    async def _query(self, last: ProviderRefund) -> ProviderRefund:
        try:
            found = await provider_call(
                PaymentActivities.query_refund, self._input, self._input.timing, f"query refund {last.refund_id}"
            )
        except ActivityError as err:
            self._detail = f"query failed: {cause(err)}"
            return last  # still processing as far as we know
        return found if found is not None else last

    async def _save(self) -> None:
        i = self._input
        await db_call(
            PaymentActivities.save_refund,
            RefundRecord(
                refund_id=i.refund_id,
                payment_id=i.payment_id,
                order_id=i.order_id,
                trade_no=i.trade_no,
                amount_minor=i.amount_minor,
                currency=i.currency,
                status=self._status,
                reason=i.reason,
                requested_by=i.requested_by,
                submissions=self._submissions,
                detail=self._detail,
            ),
            f"save refund {self._status.value}",
        )
