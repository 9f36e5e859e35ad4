"""The baselines the benchmarks compare with: a no-op workflow with one no-op activity, and a
workflow that waits for one signal. Run by a worker in the benchmark's own process (with the
default workflow sandbox) on a task queue of its own, against the same Temporal server."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn
async def noop_activity() -> None:
    return None


@workflow.defn
class NoopWorkflow:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(noop_activity, start_to_close_timeout=timedelta(seconds=30))


@workflow.defn
class SignalWaitWorkflow:
    def __init__(self) -> None:
        self.signals = 0

    @workflow.signal
    def poke(self) -> None:
        self.signals += 1

    @workflow.run
    async def run(self, count: int) -> None:
        await workflow.wait_condition(lambda: self.signals >= count)
