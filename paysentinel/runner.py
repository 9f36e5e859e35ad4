"""Runs the parts of paysentinel in one process until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from paysentinel.config import Settings

log = logging.getLogger("paysentinel")

PARTS = ("simulator", "worker", "api", "webhooks", "operator")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the runner."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


async def serve_app(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopper.cancel()
    await task
    if not server.started and not stop.is_set():
        raise RuntimeError(f"could not serve on {host}:{port} (port in use?)")


async def run_worker_until(settings: Settings, stop: asyncio.Event, serve_metrics: bool) -> None:
    from workers.main import run_worker

    await run_worker(settings, stop, serve_metrics=serve_metrics)


def part_runners(settings: Settings, parts: list[str]) -> dict[str, Callable[[asyncio.Event], Awaitable[None]]]:
    def app_runner(factory: Callable[[Settings], FastAPI], port: int):
        return lambda stop: serve_app(factory(settings), settings.host, port, stop)

    from paysentinel.simulator.app import create_app as simulator_app
    from starters.checkout_api import create_app as api_app
    from starters.operator_api import create_app as operator_app
    from starters.webhook_receiver import create_app as webhook_app

    return {
        "simulator": app_runner(simulator_app, settings.simulator_port),
        # Alone, the worker serves its own /metrics; with the API, receiver or operator API they serve it.
        "worker": lambda stop: run_worker_until(settings, stop, not {"api", "webhooks", "operator"} & set(parts)),
        "api": app_runner(api_app, settings.api_port),
        "webhooks": app_runner(webhook_app, settings.webhook_port),
        "operator": app_runner(operator_app, settings.operator_port),
    }


async def run_parts(settings: Settings, parts: list[str], stop: asyncio.Event | None = None) -> None:
    """Run the named parts until SIGINT/SIGTERM (or ``stop``); a part that fails stops all."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runners = part_runners(settings, parts)
    tasks = {asyncio.create_task(runners[name](stop), name=name) for name in parts}
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None and not stop.is_set():
                    log.error("%s stopped: %s; stopping everything", task.get_name(), task.exception())
                    stop.set()
                    raise task.exception()
    finally:
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=15)
