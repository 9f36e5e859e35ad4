"""One way to reach Temporal: the same address, namespace and data converter everywhere."""

from __future__ import annotations

from typing import Optional

from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.contrib.pydantic import pydantic_data_converter

from paysentinel import tracing
from paysentinel.config import Settings


async def connect(settings: Settings, runtime: Optional[Runtime] = None) -> Client:
    try:
        return await Client.connect(
            settings.effective_temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
            runtime=runtime,
            interceptors=tracing.interceptors(settings),
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot reach Temporal at {settings.effective_temporal_address} ({err}). "
            "Start the local stack with `paysentinel up`, or set TEMPORAL_ADDRESS to your cluster."
        ) from err
