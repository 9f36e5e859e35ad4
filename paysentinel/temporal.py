"""One way to reach Temporal: the same address, namespace and data converter everywhere."""

from __future__ import annotations

from typing import Optional

from temporalio.client import Client, Schedule, ScheduleAlreadyRunningError, ScheduleUpdate, ScheduleUpdateInput
from temporalio.runtime import Runtime

from paysentinel import tracing
from paysentinel.codec import data_converter_for
from paysentinel.config import Settings


async def connect(settings: Settings, runtime: Optional[Runtime] = None) -> Client:
    """The one way every process (worker, starters, CLI, tests, benchmarks) connects: the pydantic
    data converter with the payload encryption codec, so no customer data reaches the history."""
    converter = data_converter_for(settings)
    try:
        return await Client.connect(
            settings.effective_temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=converter,
            runtime=runtime,
            interceptors=tracing.interceptors(settings),
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot reach Temporal at {settings.effective_temporal_address} ({err}). "
            "Start the local stack with `paysentinel up`, or set TEMPORAL_ADDRESS to your cluster."
        ) from err


async def ensure_schedule(client: Client, schedule_id: str, schedule: Schedule) -> None:
    """Create the schedule, or bring an existing one to ``schedule`` (settings may have changed)."""
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        async def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)


async def remove_schedule(client: Client, schedule_id: str) -> bool:
    """Delete the schedule if there is one; True when one was deleted."""
    try:
        await client.get_schedule_handle(schedule_id).delete()
        return True
    except Exception:  # noqa: BLE001 - RPCError NOT_FOUND: there was none
        return False
