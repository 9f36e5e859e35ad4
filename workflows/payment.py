"""PaymentWorkflow: one durable workflow per payment, from checkout to a final state.

risk rules (a flagged payment goes to review before any money moves) -> record the
payment -> create the trade at the provider -> wait for the callback (timeout) -> query
the provider with a bounded backoff -> at the end of the payment's time to live, close
the trade at the provider (a close that reveals a payment means it was paid) -> final
state -> keep listening for late callbacks for the provider's resend window -> a paid
payment continues as new into its refund phase (compact state, today's code) until the
refund window ends.

Money that moved but disagrees with the order branches into child workflows: a second
paid trade or a payment after close is refunded (RefundWorkflow); a wrong amount, a
provider risk hold, a status nobody could confirm or a refund that keeps failing goes to
a person (ManualReviewWorkflow). Every child's outcome is handled, failure included:
recorded on the timeline, alerted once, and routed (a refund child is started again
with the same provider refund id; a review is opened again; after that, a person).

Where things live. This module: ``PaymentWorkflow``, the registered type: its messages
(the signals ``callback`` and ``settlement``, the updates ``checkout`` and ``refund``, the
query ``view``) and which release's code runs a payment (the release that started it).
Today's code is ``Payment`` in workflows/payment_lifecycle.py, the 0.3.0 main line read
top to bottom: its messages, ``run``, creating the trade, awaiting the outcome and late
events. ``Payment`` inherits the parts kept apart:

- workflows/payment_state.py (``PaymentState``): the fields, the timeline, the status
  (transition, save, converge) and the provider calls (query, close);
- workflows/payment_expiry.py (``Expiry``): the deadline with no answer: close at the
  provider, a review when the provider cannot say;
- workflows/payment_results.py (``ProviderResults``): applying a provider's answer (a
  callback, a bill finding, a query, a close): paid, closed, unchanged, a claimed amount
  confirmed with the provider, a wrong amount to review, a second charge returned;
- workflows/payment_children.py (``ChildWorkflows``): refunds and manual reviews as child
  workflows, their failures, and the notifications and alerts run alongside the main line.

These modules are the orchestration only: which activity, child workflow or timer comes
next. What the payment knows and what a provider's answer means for it (the money
rules, refund ids, the words the customer gets) live in paysentinel/rules.py (and the
per-trade arithmetic in paysentinel/ledger.py); what others see of it (the view, the
database row, search attributes) in paysentinel/projection.py; notifications and alerts
in workflows/payment_notify.py. Amounts always come from what the provider says it took,
never from a callback's claim.

A payment's history stays short: the database writes, the provider calls and the
notifications are local activities (one marker event each, no workflow task of their
own), and the payment row is recorded and the risk rules checked in one call. A run
never completes or continues as new in a workflow task that ran a local activity (see
``workflows.common.before_run_ends``).

Versioning: payments live for days, so a change to the commands this workflow issues
is guarded by ``workflow.patched`` (see the README, "Changing a workflow"). Each run
carries the marker of the release that started it: ``payment-0.3.0`` runs this code,
``payment-0.2.0`` the frozen 0.2.0 code, neither the frozen 0.1.0 code (both in
workflows/releases/).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from temporalio import workflow

from workflows.payment_lifecycle import Payment

if TYPE_CHECKING:
    from workflows.releases.payment_0_1_0 import PaymentWorkflow_0_1_0
    from workflows.releases.payment_0_2_0 import Payment as Payment_0_2_0

with workflow.unsafe.imports_passed_through():
    import email_validator  # noqa: F401  (pydantic loads it lazily to validate EmailStr)
    import idna.uts46data  # noqa: F401

    from paysentinel.models import (
        PaymentInput,
        PaymentView,
        ProviderCallback,
        RefundCommand,
        RefundView,
        SettlementFinding,
    )

# The markers of the releases: each run records the one of the release that started it.
# Checked newest first: a history without a marker replays with patched() False, a new
# run records the first marker it is asked about (and only that one).
RELEASE_0_3_0 = "payment-0.3.0"
RELEASE_0_2_0 = "payment-0.2.0"


@workflow.defn
class PaymentWorkflow:
    """The registered workflow type: runs a payment on the code of the release that started it."""

    @workflow.init
    def __init__(self, input: PaymentInput) -> None:
        self._input = input
        self._impl: Union[Payment, Payment_0_2_0, PaymentWorkflow_0_1_0, None] = None

    def _current(self) -> Any:
        # The frozen releases are imported only by the payments that run on them: the sandbox
        # imports this module afresh for every payment it starts or replays, and their code
        # would cost each new payment time and memory for nothing.
        if self._impl is None:
            if workflow.patched(RELEASE_0_3_0):
                self._impl = Payment(self._input)
            elif workflow.patched(RELEASE_0_2_0):
                from workflows.releases.payment_0_2_0 import Payment as Payment_0_2_0

                self._impl = Payment_0_2_0(self._input)
            else:
                from workflows.releases.payment_0_1_0 import PaymentWorkflow_0_1_0

                self._impl = PaymentWorkflow_0_1_0(self._input)
        return self._impl

    @workflow.run
    async def run(self, input: PaymentInput) -> PaymentView:
        return await self._current().run(input)

    @workflow.signal
    def callback(self, event: ProviderCallback) -> None:
        """A verified provider callback, delivered by the webhook receiver."""
        self._current().callback(event)

    @workflow.signal
    def settlement(self, finding: SettlementFinding) -> None:
        """A difference the daily reconciliation found between the provider's bill and us."""
        self._current().settlement(finding)

    @workflow.update
    async def checkout(self) -> PaymentView:
        """Returns once the payer can pay (pay URL known) or the payment is final."""
        return await self._current().checkout()

    @workflow.update
    async def refund(self, command: RefundCommand) -> RefundView:
        """A merchant's refund of the paid amount; the same key again is the same refund."""
        return await self._current().refund(command)

    @refund.validator
    def _check_refund(self, command: RefundCommand) -> None:
        if self._impl is not None:
            self._impl._check_refund(command)

    @workflow.query
    def view(self) -> PaymentView:
        return (self._impl or Payment(self._input))._view()
