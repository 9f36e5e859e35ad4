"""Runs the parts of paysentinel until asked to stop: in one process (``run_parts``), or each
part in a process of its own (``run_processes``), so the worker does not share an event loop
with the HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from paysentinel.config import Settings

log = logging.getLogger("paysentinel")

PARTS = ("simulator", "worker", "api", "webhooks", "operator")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the runner."""

    @contextlib.contextmanager
    def capture_signals(self):
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
    tasks: set[asyncio.Future[None]] = set()
    for name in parts:
        task = asyncio.ensure_future(runners[name](stop))
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        tasks.add(task)
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                error = finished.exception()
                if error is not None and not stop.is_set():
                    name = finished.get_name() if isinstance(finished, asyncio.Task) else "a part"
                    log.error("%s stopped: %s; stopping everything", name, error)
                    stop.set()
                    raise error
    finally:
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=15)


# --- Each part in a process of its own ---------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_command(part: str, parts: list[str], verbose: bool = False) -> list[str]:
    return [sys.executable, "-m", "paysentinel.runner", part, "--of", ",".join(parts), *(["--verbose"] if verbose else [])]


# The k-th extra worker process (k = 1, 2, ...) serves its metrics on the configured ports + k * this.
WORKER_PORT_STEP = 100


def worker_env(settings: Settings, k: int) -> dict[str, str]:
    """The environment of the k-th extra worker process: the same settings, metrics ports of its own
    (a port of 0 stays 0)."""
    step = WORKER_PORT_STEP * k
    return {
        **os.environ,
        "PAYSENTINEL_METRICS_PORT": str(settings.metrics_port + step if settings.metrics_port else 0),
        "PAYSENTINEL_SDK_METRICS_PORT": str(settings.sdk_metrics_port + step if settings.sdk_metrics_port else 0),
    }


def process_plan(settings: Settings, parts: list[str], workers: int = 1) -> dict[str, tuple[str, dict[str, str] | None]]:
    """Each child process to start: its name -> (part, environment or None for ours). With
    ``workers`` > 1 the worker runs as that many processes on the task queue ("worker",
    "worker-2", ...): a worker is one Python process, so one core at most."""
    plan: dict[str, tuple[str, dict[str, str] | None]] = {}
    for part in parts:
        plan[part] = (part, None)
        if part == "worker":
            for k in range(1, workers):
                plan[f"worker-{k + 1}"] = ("worker", worker_env(settings, k))
    return plan


async def run_processes(
    settings: Settings,
    parts: list[str],
    stop: asyncio.Event | None = None,
    verbose: bool = False,
    stop_timeout: float = 15,
    workers: int = 1,
) -> None:
    """Run each named part as a child process (``python -m paysentinel.runner PART``), the worker
    as ``workers`` of them, until SIGINT/SIGTERM (or ``stop``). A child that exits stops the others
    and raises RuntimeError naming it; stopping sends each child SIGTERM by its pid, then SIGKILL
    after ``stop_timeout``. The children read the same environment (see ``process_plan``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    children: dict[str, asyncio.subprocess.Process] = {}
    failure: str | None = None
    try:
        for name, (part, env) in process_plan(settings, parts, workers).items():
            children[name] = await asyncio.create_subprocess_exec(
                *child_command(part, parts, verbose),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            log.info("%s runs as process %d", name, children[name].pid)
        exits = {asyncio.create_task(child.wait(), name=part): part for part, child in children.items()}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *exits}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not stop.is_set():
                part = exits[task]
                failure = f"{part} (pid {children[part].pid}) exited with status {task.result()}"
                log.error("%s; stopping everything", failure)
                break
    finally:
        stop.set()
        await _stop_children(children, stop_timeout)
    if failure is not None:
        raise RuntimeError(failure)


async def _stop_children(children: dict[str, asyncio.subprocess.Process], timeout: float) -> None:
    running = {part: child for part, child in children.items() if child.returncode is None}
    for child in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)
    for part, child in running.items():
        try:
            await asyncio.wait_for(child.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s (pid %d) did not stop within %gs; killing it", part, child.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            await child.wait()


def _child_main(argv: list[str]) -> int:
    """One part, started by ``run_processes``: the same environment and settings as its parent."""
    import argparse

    from paysentinel import logs
    from paysentinel.config import get_settings
    from paysentinel.profile import SecretsRefused, secured

    parser = argparse.ArgumentParser(prog="python -m paysentinel.runner")
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--of", default="", help="every part the parent runs (decides the settings profile)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    settings = get_settings()
    logs.configure(settings.log_format, args.verbose)
    try:
        settings = secured(settings, [p for p in args.of.split(",") if p] or [args.part], PARTS)
    except SecretsRefused as err:
        log.error("%s", err)
        return 1
    try:
        asyncio.run(run_parts(settings, [args.part]))
    except RuntimeError as err:
        log.error("%s stopped: %s", args.part, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
