"""The worker's sandbox (workers/sandbox.py) answers a payload's contexts as the SDK's does."""

from __future__ import annotations

import datetime

from temporalio import converter, workflow
from temporalio.api.common.v1.message_pb2 import Payloads
from temporalio.api.failure.v1.message_pb2 import Failure
from temporalio.worker import WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from temporalio.worker.workflow_sandbox._runner import _fake_info, _Instance

from workers.main import PASSTHROUGH_MODULES, workflow_runner
from workers.sandbox import IN_SANDBOX, ContextShortcutSandbox, _ShortcutInstance
from workflows.payment import PaymentWorkflow


def details() -> WorkflowInstanceDetails:
    return WorkflowInstanceDetails(
        payload_converter_factory=converter.DataConverter.default._new_payload_converter,
        failure_converter_class=converter.DataConverter.default.failure_converter_class,
        interceptor_classes=[],
        defn=workflow._Definition.must_from_class(PaymentWorkflow),
        info=_fake_info,
        randomness_seed=-1,
        extern_functions={},
        disable_eager_activity_execution=False,
        worker_level_failure_exception_types=[],
        patch_activation_callback=None,
        last_completion_result=Payloads(),
        last_failure=Failure(),
    )


async def test_the_worker_runs_workflows_in_the_shortcut_sandbox_with_the_sdk_restrictions():
    runner = workflow_runner("isolated")
    assert isinstance(runner, ContextShortcutSandbox)
    assert runner.restrictions == SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    instance = runner.create_instance(details())
    assert isinstance(instance, _ShortcutInstance)
    assert IN_SANDBOX in instance.globals_and_locals, "the SDK no longer names its in-sandbox object so"


async def test_the_shortcut_gives_the_sdk_answers():
    restrictions = SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    ours = ContextShortcutSandbox(restrictions=restrictions).create_instance(details())
    sdk = SandboxedWorkflowRunner(restrictions=restrictions).create_instance(details())
    assert type(sdk) is _Instance
    for method in ("get_serialization_context", "get_external_store_context"):
        assert method in vars(_Instance), f"the SDK's sandbox no longer defines {method}"
        assert getattr(ours, method)(None) == getattr(sdk, method)(None)
    assert ours.get_serialization_context(None) == converter.WorkflowSerializationContext(
        namespace=_fake_info.namespace, workflow_id=_fake_info.workflow_id
    )


async def test_sandboxes_share_the_workflow_code_but_not_its_modules_or_restrictions():
    runner = workflow_runner("isolated")
    first, second = runner.create_instance(details()), runner.create_instance(details())
    one, other = (i.globals_and_locals["__temporal_workflow_class"] for i in (first, second))
    assert one is not other and one is not PaymentWorkflow, "each sandbox imports the workflow modules afresh"
    payment, payment_too = one.run.__globals__["Payment"], other.run.__globals__["Payment"]
    assert payment is not payment_too
    assert payment.run.__globals__ is not payment_too.run.__globals__  # module globals of their own
    assert payment.run.__code__ is payment_too.run.__code__  # the same compiled code, loaded once
    # Under the sandbox's restrictions as before: the module sees the restricted datetime.
    assert payment.run.__globals__["datetime"] is not datetime.datetime
    assert type(payment.run.__globals__["datetime"]).__name__ == "_RestrictedProxy"
