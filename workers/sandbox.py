"""The workflow sandbox the worker runs workflows in: the Temporal SDK's, with two savings.

For every payload a workflow task encodes or decodes, the SDK (1.35) asks the sandboxed
workflow for the payload's serialization context and external-storage context, and it does
so by compiling and running a snippet of code inside the sandbox, under the sandbox's import
hooks. Under load that was about a quarter of the worker's CPU. Both answers are plain data
computed by the SDK's own in-sandbox object from the workflow's state; they need no import
and touch no workflow code, so ``ContextShortcutSandbox`` asks that object directly. Workflow
code itself still runs under the sandbox's restrictions, exactly as before.

The sandbox imports the workflow modules afresh for every payment it starts or replays, so that
each runs with its own module globals under the sandbox's import restrictions. Each import also
read and unmarshalled the modules' compiled code again: about 130 KiB of identical code
objects per cached payment, and a good part of the time to create one. Code objects are
immutable, so ``share_workflow_code`` gives every import of a workflow module the code the
first one loaded; the module body still runs afresh in each sandbox, with its own globals and
under the same restrictions.

The shortcut relies on internals of temporalio's sandbox runner (``_Instance`` and its
``__temporal_in_sandbox`` object); pyproject.toml pins the SDK's minor version, and
tests/test_worker_sandbox.py checks that both paths give the same answers.
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import CodeType, ModuleType

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


class _SharedCodeLoader(importlib.machinery.SourceFileLoader):
    """A module's source file loader that loads its code once per process (per path and mtime)."""

    _codes: dict[tuple[str, float], CodeType] = {}
    _lock = threading.Lock()

    def get_code(self, fullname: str) -> CodeType:
        key = (self.path, self.path_stats(self.path)["mtime"])
        code = self._codes.get(key)
        if code is None:
            loaded = super().get_code(fullname)
            assert loaded is not None  # a source file always has code
            with self._lock:
                code = self._codes.setdefault(key, loaded)
        return code


class SharedCodeFinder:
    """Finds the modules of ``packages`` as the path finder does, with ``_SharedCodeLoader``."""

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = frozenset(packages)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in self.packages:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _SharedCodeLoader(spec.loader.name, spec.loader.path)
        return spec


def share_workflow_code(packages: Sequence[str] = ("workflows",)) -> None:
    """Load the code of ``packages``' modules once for the process (see the module docstring)."""
    if not any(isinstance(finder, SharedCodeFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SharedCodeFinder(packages))
