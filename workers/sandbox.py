"""The workflow sandbox the worker runs workflows in: the Temporal SDK's, with one shortcut.

For every payload a workflow task encodes or decodes, the SDK (1.35) asks the sandboxed
workflow for the payload's serialization context and external-storage context, and it does
so by compiling and running a snippet of code inside the sandbox, under the sandbox's import
hooks. Under load that was about a quarter of the worker's CPU. Both answers are plain data
computed by the SDK's own in-sandbox object from the workflow's state; they need no import
and touch no workflow code, so ``ContextShortcutSandbox`` asks that object directly. Workflow
code itself still runs under the sandbox's restrictions, exactly as before.

This relies on internals of temporalio's sandbox runner (``_Instance`` and its
``__temporal_in_sandbox`` object); pyproject.toml pins the SDK's minor version, and
tests/test_worker_sandbox.py checks that both paths give the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from temporalio.converter import SerializationContext
from temporalio.converter._extstore import StorageDriverStoreContext
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails
from temporalio.worker._command_aware_visitor import CommandInfo
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox._runner import _Instance

IN_SANDBOX = "__temporal_in_sandbox"  # the SDK's name for its object inside the sandbox


class _ShortcutInstance(_Instance):
    def get_serialization_context(self, command_info: CommandInfo | None) -> SerializationContext | None:
        return self.globals_and_locals[IN_SANDBOX].get_serialization_context(command_info)  # type: ignore[attr-defined]

    def get_external_store_context(self, command_info: CommandInfo | None) -> StorageDriverStoreContext:
        return self.globals_and_locals[IN_SANDBOX].get_external_store_context(command_info)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ContextShortcutSandbox(SandboxedWorkflowRunner):
    """The SDK's sandbox, answering a payload's serialization context without entering it."""

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _ShortcutInstance(det, self.runner_class, self.restrictions)
