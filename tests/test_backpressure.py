"""Back-pressure: an overloaded checkout answers 429 or 503 with Retry-After, never a 500;
every payment it accepted still finishes. And `paysentinel up --processes`: each part in its
own process, stopped together, a part that dies reported."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from paysentinel.devserver import free_port
from starters.backpressure import Admission, Overloaded, is_busy
from tests.conftest import Stack, _wait_healthy, new_order, start_parts, stop_process
from tests.helpers import script, start_payment, wait_status


async def test_admission_lets_limit_in_and_refuses_one_more_after_its_wait():
    admission = Admission(limit=2, wait_seconds=0.05)
    release = asyncio.Event()

    async def hold():
        async with admission.slot():
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert admission.in_flight == 2
    with pytest.raises(Overloaded) as refused:
        async with admission.slot():
            pass
    assert refused.value.retry_after == 1 and "2 checkouts are in progress" in str(refused.value)
    release.set()
    await asyncio.gather(*holders)
    async with admission.slot():  # free again
        assert admission.in_flight == 1


async def test_a_checkout_whose_update_is_cut_short_answers_from_the_database(client, merchants, sessions):
    """A real Temporal server with nobody polling the task queue: the checkout's update-with-start
    waits its whole time, is cut short (WorkflowUpdateRPCTimeoutOrCancelledError), and the checkout
    answers from the database: the payment recorded, its workflow started and waiting for a worker."""
    from paysentinel.config import Settings
    from paysentinel.models import CheckoutRequest
    from starters.checkout_api import start_payment as checkout
    from starters.common import Resources
    from tests.helpers import MERCHANT_A

    settings = Settings(task_queue=f"nobody-polls-{new_order('q')}", checkout_wait_seconds=1)
    order = f"{MERCHANT_A}-{new_order('slow')}"
    started = time.monotonic()
    view, created = await checkout(
        Resources(settings, client, sessions, {}), CheckoutRequest(order_id=order, amount_minor=100), MERCHANT_A
    )
    assert time.monotonic() - started < 10
    assert created and (view.order_id, view.status.value) == (order, "CREATED")  # recorded; its workflow goes on
    handle = client.get_workflow_handle(view.payment_id)
    assert (await handle.describe()).status is not None  # started, waiting for a worker
    await handle.terminate("test done: no worker polls this task queue")


def test_busy_means_temporal_or_the_database_could_not_take_it():
    assert is_busy(WorkflowUpdateRPCTimeoutOrCancelledError())
    assert is_busy(RPCError("busy", RPCStatusCode.RESOURCE_EXHAUSTED, b""))
    assert not is_busy(RPCError("no such workflow", RPCStatusCode.NOT_FOUND, b""))
    assert not is_busy(ValueError("a bug"))


async def test_many_concurrent_checkouts_get_201_429_or_503_and_accepted_ones_finish(
    stack: Stack, merchants, api, sim, tmp_path: Path
):
    """A second checkout API on the same system, allowed two checkouts at once."""
    port = free_port()
    env = {
        **stack.env,
        "PAYSENTINEL_API_PORT": str(port),
        "PAYSENTINEL_CHECKOUT_CONCURRENCY": "2",
        "PAYSENTINEL_CHECKOUT_QUEUE_SECONDS": "0.05",
        "PAYSENTINEL_RATE_LIMIT_PAYMENTS_BURST": "30",
    }
    log_file = tmp_path / "tight-api.log"
    tight = start_parts(env, "api", log_file)
    try:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(_wait_healthy, [url], tight, log_file)
        orders = [new_order("crowd") for _ in range(40)]
        await asyncio.gather(*(script(sim, order, pay="immediately") for order in orders))
        async with httpx.AsyncClient(base_url=url, headers=merchants.headers(), timeout=30) as crowd:
            answers = await asyncio.gather(*(start_payment(crowd, order) for order in orders))
    finally:
        stop_process(tight)
    codes = [a.status_code for a in answers]
    assert set(codes) <= {201, 429, 503}, [(a.status_code, a.text) for a in answers if a.status_code >= 500]
    for refused in (a for a in answers if a.status_code in (429, 503)):
        assert int(refused.headers["Retry-After"]) >= 1 and "retry" in refused.json()["error"]
    assert 201 in codes and (503 in codes or 429 in codes), codes
    accepted = [a.json()["payment_id"] for a in answers if a.status_code == 201]
    await asyncio.gather(*(wait_status(api, payment_id, "SUCCEEDED", timeout=60) for payment_id in accepted))


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), pids


def test_up_with_processes_stops_its_children_and_reports_one_that_dies(stack: Stack, tmp_path: Path):
    ports = {
        "PAYSENTINEL_SIMULATOR_PORT": str(free_port()),
        "PAYSENTINEL_WEBHOOK_PORT": str(free_port()),
        "PAYSENTINEL_SDK_METRICS_PORT": "0",
        "PAYSENTINEL_METRICS_PORT": str(free_port()),
    }
    env = {**stack.env, **ports}
    urls = [f"http://127.0.0.1:{ports['PAYSENTINEL_SIMULATOR_PORT']}", f"http://127.0.0.1:{ports['PAYSENTINEL_WEBHOOK_PORT']}"]
    log_file = tmp_path / "up.log"

    def start():
        import subprocess
        import sys

        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "paysentinel.cli", "up", "--processes", "--parts", "simulator,webhooks"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _wait_healthy(urls, process, log_file)
        children = _children(process.pid)
        assert len(children) == 2, children
        return process, children

    up, children = start()
    up.send_signal(signal.SIGTERM)  # as a service manager stops it
    assert up.wait(30) == 0
    _wait_gone(children)

    up, children = start()
    try:
        os.kill(children[0], signal.SIGKILL)
        assert up.wait(30) == 1
        _wait_gone(children)
        log = log_file.read_text()
        assert f"(pid {children[0]}) exited with status -9" in log, log[-2000:]
    finally:
        stop_process(up)


async def test_up_runs_the_worker_as_several_processes_on_one_task_queue(stack: Stack, client, tmp_path: Path):
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    task_queue = f"workers-{new_order('q')}"
    simulator_port = free_port()
    env = {
        **stack.env,
        "PAYSENTINEL_TASK_QUEUE": task_queue,
        "PAYSENTINEL_SIMULATOR_PORT": str(simulator_port),
        "PAYSENTINEL_SDK_METRICS_PORT": "0",
        "PAYSENTINEL_METRICS_PORT": "0",
        "PAYSENTINEL_MONITOR_INTERVAL_SECONDS": "0",
        "PAYSENTINEL_RECONCILE_ENABLED": "false",
    }
    log_file = tmp_path / "up.log"
    import subprocess
    import sys

    with open(log_file, "ab") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "paysentinel.cli", "up", "--processes", "--workers", "2", "--parts", "simulator,worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_healthy([f"http://127.0.0.1:{simulator_port}"], up, log_file)
        children = _children(up.pid)
        assert len(children) == 3, children  # the simulator and two workers
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        pollers: set[str] = set()
        deadline = time.monotonic() + 60
        while len(pollers) < 2 and time.monotonic() < deadline:
            described = await client.workflow_service.describe_task_queue(request)
            pollers = {poller.identity for poller in described.pollers}
            await asyncio.sleep(0.5)
        worker_pids = {str(pid) for pid in children}
        assert len(pollers) == 2 and {identity.split("@")[0] for identity in pollers} <= worker_pids, (
            pollers,
            log_file.read_text()[-2000:],
        )
        assert "worker processes" in log_file.read_text()
    finally:
        stop_process(up)
    assert up.returncode == 0
    _wait_gone(children)


def test_workers_need_processes(tmp_path: Path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "paysentinel.cli", "up", "--workers", "2", "--parts", "worker"],
        capture_output=True,
        text=True,
        env={**os.environ, "PAYSENTINEL_DATA_DIR": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--workers needs --processes" in result.stdout + result.stderr


def test_extra_workers_get_metrics_ports_of_their_own():
    from paysentinel.config import Settings
    from paysentinel.runner import process_plan

    plan = process_plan(Settings(sdk_metrics_port=8003, metrics_port=8005), ["simulator", "worker", "api"], workers=3)
    assert list(plan) == ["simulator", "worker", "worker-2", "worker-3", "api"]
    assert plan["worker"][1] is None and plan["api"] == ("api", None)
    assert plan["worker-3"][0] == "worker"
    extra = plan["worker-3"][1]
    assert extra is not None
    assert (extra["PAYSENTINEL_SDK_METRICS_PORT"], extra["PAYSENTINEL_METRICS_PORT"]) == ("8203", "8205")
    none = process_plan(Settings(sdk_metrics_port=0, metrics_port=0), ["worker"], workers=2)["worker-2"][1]
    assert none is not None and (none["PAYSENTINEL_SDK_METRICS_PORT"], none["PAYSENTINEL_METRICS_PORT"]) == ("0", "0")
