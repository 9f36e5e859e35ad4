"""paysentinel on a real Temporal cluster, with replicas, under faults.

One cluster per session (its own fixtures; the dev-server ``stack`` is not involved): the
Temporal server v1.29.1 as separate frontend, history, matching and worker processes on a
PostgreSQL instance of its own, frontend with mTLS (paysentinel/cluster/), and against it two
workers, two checkout APIs and two webhook receivers, each its own process, behind a round-robin
TCP balancer for the provider's callbacks, on a fresh application database. Every fault test
ends with the provider's ledger equal to our database and nothing left open.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import httpx
import pytest

from paysentinel.cluster import (
    PROCESSES,
    SERVICES,
    UI,
    ClusterError,
    ClusterPorts,
    LocalPostgres,
    ServerBinaries,
    TemporalCluster,
    ensure_server_binaries,
    make_certificates,
)
from paysentinel.config import DEFAULT_CACHE_DIR, Settings, token_digest
from paysentinel.devserver import free_port
from tests.conftest import OPERATORS, ROLES, TEST_PAYLOAD_KEYS, TEST_TIMINGS, new_order, stop_process
from tests.helpers import (
    MERCHANT_A,
    MERCHANT_SECRET,
    SIMULATOR_SECRET,
    assert_books_balance,
    payment_id_for,
    provider_order,
    script,
    start_payment,
    wait_status,
)

BOOKS_TIMEOUT = 90.0  # an activity on a killed worker is retried after its 15 s start-to-close timeout
# A provider call that hangs stays in flight this long before the worker gives up on it (under the
# provider calls' 15 s start-to-close timeout), and the simulator holds a hanging call longer: long
# enough to kill a worker in the middle of four such calls at once.
PROVIDER_TIMEOUT_SECONDS = 12.0
SIMULATOR_HANG_SECONDS = 30.0


# --- A round-robin TCP balancer (what a Kubernetes Service is to the replicas) ---------------------


class Balancer:
    """Accepts on a loopback port and pipes each connection to the next upstream that accepts it."""

    def __init__(self, upstreams: list[int]) -> None:
        self.upstreams = upstreams
        self.port = free_port()
        self._next = count()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="balancer")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = None
        for _ in range(len(self.upstreams)):
            port = self.upstreams[next(self._next) % len(self.upstreams)]
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                continue
        if upstream is None:
            client.close()
            return
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                for key, _ in sel.select(0.5):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            upstream.close()


# --- The cluster and the replicas -------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_binaries() -> ServerBinaries:
    cache = Path(os.environ.get("PAYSENTINEL_CACHE_DIR", DEFAULT_CACHE_DIR))
    try:
        return ensure_server_binaries(cache, log=lambda line: print(line, file=sys.stderr))
    except ClusterError as err:
        pytest.fail(f"the Temporal server is not available: {err}", pytrace=False)


@pytest.fixture(scope="session")
async def temporal_cluster(server_binaries: ServerBinaries, temporal_cli: Path) -> AsyncIterator[TemporalCluster]:
    # Under /tmp, reachable by the postgres user Temporal's PostgreSQL runs as when we are root.
    state = Path(tempfile.mkdtemp(prefix="paysentinel-cluster-"))
    state.chmod(0o755)
    cluster = TemporalCluster(
        server_binaries, temporal_cli, state, ports=ClusterPorts.free(), log=lambda line: print(line, file=sys.stderr)
    )
    started = time.monotonic()
    try:
        await cluster.up(timeout=180)
    except ClusterError as err:
        await asyncio.to_thread(cluster.down)
        logs = {process: cluster.log_tail(process, 5) for process in PROCESSES}
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(
            f"the Temporal cluster did not start: {err}\n" + "\n".join(f"{s}: {t}" for s, t in logs.items()), pytrace=False
        )
    print(f"\n[Temporal cluster up in {time.monotonic() - started:.1f}s: {state}]", file=sys.stderr)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.down)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def app_postgres() -> Iterator[LocalPostgres]:
    """The application's PostgreSQL for the cluster tier: an instance of its own (apart from the
    shared test server and from Temporal's), so a test can restart it as a real outage."""
    state = Path(tempfile.mkdtemp(prefix="paysentinel-app-pg-"))
    state.chmod(0o755)  # reachable by the postgres user the server runs as when we are root
    instance = LocalPostgres(state / "data", free_port(), log=lambda line: print(line, file=sys.stderr), user="paysentinel")
    try:
        instance.init()
        instance.start()
    except ClusterError as err:
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"the application's PostgreSQL for the cluster tier did not start: {err}", pytrace=False)
    try:
        yield instance
    finally:
        instance.stop(mode="immediate")
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
async def cluster_database_url(app_postgres: LocalPostgres) -> str:
    """The application database of the cluster tier, migrated with Alembic."""
    import asyncpg

    from paysentinel import db

    admin = await asyncpg.connect(f"postgresql://paysentinel@127.0.0.1:{app_postgres.port}/postgres", timeout=10)
    try:
        await admin.execute('CREATE DATABASE "paysentinel"')
    finally:
        await admin.close()
    url = f"postgresql+asyncpg://paysentinel@127.0.0.1:{app_postgres.port}/paysentinel"
    await asyncio.to_thread(db.upgrade, url)
    return url


@dataclass
class Replica:
    part: str
    index: int
    env: dict[str, str]
    url: str | None  # its HTTP listener (None: the worker)
    log_file: Path
    process: subprocess.Popen | None = None
    log_offset: int = 0  # where this start's lines begin in log_file

    @property
    def name(self) -> str:
        return f"{self.part}-{self.index}"

    def start(self) -> None:
        self.log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            # `paysentinel worker|api|webhooks`: one part, as in docker-compose.yml and deploy/k8s/
            self.process = subprocess.Popen(
                [sys.executable, "-m", "paysentinel.cli", self.part],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def stop_all(replicas: list[Replica]) -> None:
    """SIGTERM them all at once, then wait for each (SIGKILL after 20 s)."""
    for replica in replicas:
        if replica.process is not None and replica.process.poll() is None:
            replica.process.terminate()
    for replica in replicas:
        replica.stop()


@dataclass
class ClusterStack:
    cluster: TemporalCluster
    database_url: str
    simulator_url: str
    webhook_balancer: Balancer
    task_queue: str
    replicas: dict[str, Replica] = field(default_factory=dict)
    simulator: subprocess.Popen | None = None

    def of(self, part: str) -> list[Replica]:
        return [r for name, r in sorted(self.replicas.items()) if r.part == part]

    @property
    def api_urls(self) -> list[str]:
        return [r.url for r in self.of("api") if r.url]


def _wait_healthy(replicas: list[Replica], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    pending = [r for r in replicas if r.url]
    while pending:
        replica = pending[0]
        assert replica.process is not None
        if replica.process.poll() is not None:
            raise RuntimeError(
                f"{replica.name} exited with {replica.process.returncode}:\n{replica.log_file.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{replica.url}/health", timeout=1).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{replica.name} not healthy after {timeout}s:\n{replica.log_file.read_text()[-3000:]}")
        time.sleep(0.2)


def _wait_polling(stack: ClusterStack, replicas: list[Replica], timeout: float = 240) -> None:
    """Until each worker replica has logged that it polls the task queue."""
    deadline = time.monotonic() + timeout
    for replica in replicas:
        while "worker polling task queue" not in replica.log_file.read_bytes()[replica.log_offset :].decode(errors="replace"):
            assert replica.process is not None
            if replica.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{replica.name} is not polling:\n{replica.log_file.read_text()[-3000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def cluster_stack(temporal_cluster: TemporalCluster, cluster_database_url: str, tmp_path_factory) -> Iterator[ClusterStack]:
    logs = tmp_path_factory.mktemp("cluster-stack")
    webhook_ports = [free_port(), free_port()]
    balancer = Balancer(webhook_ports)
    simulator_port = free_port()
    task_queue = f"payments-cluster-{uuid.uuid4().hex[:8]}"
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")},
        **TEST_TIMINGS,
        "PAYSENTINEL_PROVIDER_TIMEOUT_SECONDS": str(PROVIDER_TIMEOUT_SECONDS),
        "PAYSENTINEL_SIMULATOR_HANG_SECONDS": str(SIMULATOR_HANG_SECONDS),
        **temporal_cluster.client_env(),  # address, namespace, mTLS files: the SDK's environment configuration
        "PAYSENTINEL_DATABASE_URL": cluster_database_url,
        "PAYSENTINEL_TASK_QUEUE": task_queue,
        "PAYSENTINEL_SIMULATOR_PORT": str(simulator_port),
        "PAYSENTINEL_SIMULATOR_URL": f"http://127.0.0.1:{simulator_port}",
        "PAYSENTINEL_PUBLIC_WEBHOOK_BASE_URL": f"http://127.0.0.1:{balancer.port}",
        "PAYSENTINEL_PROVIDERS": "simulator",
        "PAYSENTINEL_DATA_DIR": str(tmp_path_factory.mktemp("cluster-data")),
        "PAYSENTINEL_OPERATOR_TOKENS": ",".join(
            f"{name}:{ROLES[name]}:{token_digest(token)}" for name, token in OPERATORS.items()
        ),
        "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET": SIMULATOR_SECRET,
        "PAYSENTINEL_MERCHANT_WEBHOOK_SECRET": MERCHANT_SECRET,
        "PAYSENTINEL_PAYLOAD_KEYS": TEST_PAYLOAD_KEYS,
        "PAYSENTINEL_RECONCILE_ENABLED": "false",
        "PAYSENTINEL_SMTP_HOST": "",
    }
    stack = ClusterStack(temporal_cluster, cluster_database_url, f"http://127.0.0.1:{simulator_port}", balancer, task_queue)
    for index in range(2):
        ports = {"worker": free_port(), "api": free_port(), "webhooks": webhook_ports[index]}
        for part, port in ports.items():
            env = {
                **base,
                "PAYSENTINEL_SDK_METRICS_PORT": str(free_port()),
                "PAYSENTINEL_METRICS_PORT": str(free_port()),
                "PAYSENTINEL_API_PORT": str(ports["api"]),
                "PAYSENTINEL_WEBHOOK_PORT": str(ports["webhooks"]),
                "PAYSENTINEL_OPERATOR_PORT": str(free_port()),
            }
            url = None if part == "worker" else f"http://127.0.0.1:{port}"
            replica = Replica(part, index, env, url, logs / f"{part}-{index}.log")
            stack.replicas[replica.name] = replica
    sim_log = logs / "simulator.log"
    with open(sim_log, "ab") as log:
        stack.simulator = subprocess.Popen(
            [sys.executable, "-m", "paysentinel.cli", "simulator"],
            env=base,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    balancer.start()
    try:
        for replica in stack.replicas.values():
            replica.start()
        _wait_healthy([*stack.replicas.values()])
        _wait_polling(stack, stack.of("worker"))
        yield stack
    finally:
        stop_all(list(stack.replicas.values()))
        stop_process(stack.simulator)
        balancer.stop()
        print(f"\n[cluster tier logs: {logs}; Temporal logs: {temporal_cluster.state_dir / 'logs'}]", file=sys.stderr)


@dataclass
class Apis:
    """The checkout API replicas, used in turn (as a load balancer would)."""

    clients: list[httpx.AsyncClient]
    _turn: count = field(default_factory=count)

    def next(self) -> httpx.AsyncClient:
        return self.clients[next(self._turn) % len(self.clients)]


@pytest.fixture(scope="session")
async def cluster_merchant_key(cluster_database_url: str) -> str:
    from paysentinel import db
    from paysentinel.merchants import API_SCOPES, create_key, create_merchant

    engine = db.make_engine(cluster_database_url)
    try:
        sessions = db.make_sessionmaker(engine)
        await create_merchant(sessions, MERCHANT_A, "Cluster test merchant")
        return (await create_key(sessions, MERCHANT_A, list(API_SCOPES)))[1]
    finally:
        await engine.dispose()


@pytest.fixture
async def apis(cluster_stack: ClusterStack, cluster_merchant_key: str) -> AsyncIterator[Apis]:
    headers = {"Authorization": f"Bearer {cluster_merchant_key}"}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, timeout=30) for url in cluster_stack.api_urls]
    try:
        yield Apis(clients)
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
async def csim(cluster_stack: ClusterStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster_stack.simulator_url, timeout=30) as http:
        yield http


@pytest.fixture
async def csessions(cluster_database_url: str):
    from paysentinel import db

    engine = db.make_engine(cluster_database_url)
    yield db.make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
async def cclient(temporal_cluster: TemporalCluster):
    from paysentinel.temporal import connect

    return await connect(Settings(payload_keys=TEST_PAYLOAD_KEYS), environ=temporal_cluster.client_env())


async def start_payments(apis: Apis, sim: httpx.AsyncClient, n: int, prefix: str, **behaviour) -> list[str]:
    """``n`` orders scripted with ``behaviour``, started through the API replicas in turn."""
    orders = [new_order(prefix) for _ in range(n)]
    for order in orders:
        await script(sim, order, **behaviour)

    async def one(order: str) -> None:
        response = await start_payment(apis.next(), order)
        assert response.status_code in (200, 201, 202), response.text
        # The trade exists at the provider (its pay URL is known): the scripted payer's clock runs.
        assert response.json().get("pay_url"), response.text

    await asyncio.gather(*(one(order) for order in orders))
    return orders


async def books_balance(
    sim, sessions, orders: list[str], *, trades_per_order: int = 1, refunds_per_order: int = 0
) -> dict[str, dict]:
    """The provider's ledger equals our database for every order, none is open, and no trade was
    created (nor refund made) twice."""
    ledgers = await assert_books_balance(sim, sessions, [provider_order(o) for o in orders], timeout=BOOKS_TIMEOUT)
    for order, ledger in ledgers.items():
        assert len(ledger["trades"]) == trades_per_order, (order, ledger)
        assert len(ledger["refunds"]) == refunds_per_order, (order, ledger)
    return ledgers


async def assert_all_succeeded(apis: Apis, orders: list[str]) -> None:
    views = {order: (await apis.next().get(f"/payments/{payment_id_for(order)}")).json() for order in orders}
    wrong = {order: view for order, view in views.items() if view.get("status") != "SUCCEEDED"}
    assert not wrong, "\n".join(f"{order}: {view.get('status')}: {view.get('timeline')}" for order, view in wrong.items())


async def statuses(apis: Apis, orders: list[str]) -> dict[str, str]:
    found = {}
    for order in orders:
        found[order] = (await apis.next().get(f"/payments/{payment_id_for(order)}")).json().get("status")
    return found


# --- The cluster itself -------------------------------------------------------------------------


def test_each_temporal_service_is_its_own_process(temporal_cluster: TemporalCluster):
    pids = {service: process.pid for service, process in temporal_cluster.processes.items()}
    assert set(pids) == set(PROCESSES) and len(set(pids.values())) == 5  # the four services and the Web UI server
    assert all(process.poll() is None for process in temporal_cluster.processes.values())
    for service in SERVICES:
        command = Path(f"/proc/{pids[service]}/cmdline").read_bytes().split(b"\0")
        assert command[-2:] == [b"--service", service.encode()] or command[-3:-1] == [b"--service", service.encode()]
    ui_command = Path(f"/proc/{pids[UI]}/cmdline").read_bytes().split(b"\0")
    assert ui_command[0] == str(temporal_cluster.binaries.ui_server).encode() and b"start" in ui_command
    assert temporal_cluster.postgres.running


async def test_frontend_requires_a_client_certificate(temporal_cluster: TemporalCluster, tmp_path: Path):
    from paysentinel.temporal import connect

    env = temporal_cluster.client_env()
    # Without a client certificate (server CA only): refused.
    no_cert = {k: v for k, v in env.items() if "CLIENT" not in k}
    with pytest.raises(RuntimeError, match="TEMPORAL_TLS_CLIENT_CERT_PATH"):
        await asyncio.wait_for(connect(Settings(payload_keys=TEST_PAYLOAD_KEYS), environ=no_cert), 30)
    # A client certificate from another CA: refused, saying what to fix.
    other = make_certificates(tmp_path / "other")
    wrong = {
        **env,
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(other.client_cert),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(other.client_key),
    }
    with pytest.raises(RuntimeError) as refused:
        await asyncio.wait_for(connect(Settings(payload_keys=TEST_PAYLOAD_KEYS), environ=wrong), 30)
    message = str(refused.value)
    assert "TLS handshake failed" in message and "TEMPORAL_TLS_CLIENT_CERT_PATH" in message, message
    # The right one works.
    client = await connect(Settings(payload_keys=TEST_PAYLOAD_KEYS), environ=env)
    assert client.namespace == temporal_cluster.namespace


def test_a_worker_with_a_wrong_certificate_stops_at_start_up_saying_what_to_fix(cluster_stack: ClusterStack, tmp_path: Path):
    other = make_certificates(tmp_path / "other")
    env = {
        **cluster_stack.of("worker")[0].env,
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(other.ca),
        "PAYSENTINEL_SDK_METRICS_PORT": "0",
        "PAYSENTINEL_METRICS_PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "paysentinel.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cannot connect to Temporal at" in output and "TEMPORAL_TLS_SERVER_CA_CERT_PATH" in output, output


async def test_payments_through_both_api_replicas(cluster_stack, apis, csim, csessions, cclient):
    orders = await start_payments(apis, csim, 4, "cl-ok", pay="immediately")
    for order in orders:
        await wait_status(apis.next(), payment_id_for(order), "SUCCEEDED", timeout=60)
    await books_balance(csim, csessions, orders)
    # Custom search attributes on SQL visibility.
    query = " OR ".join(f"OrderId = '{provider_order(o)}'" for o in orders)
    deadline = time.monotonic() + 30
    while (found := (await cclient.count_workflows(f"PaymentStatus = 'SUCCEEDED' AND ({query})")).count) < 4:
        assert time.monotonic() < deadline, f"visibility shows {found} of 4"
        await asyncio.sleep(0.5)


async def test_the_web_ui_shows_a_payment_run_on_the_cluster(cluster_stack, apis, csim):
    """The Web UI server serves the UI and, through its HTTP API, lists the payment's workflow:
    it reached the frontend over mTLS with the cluster's client certificate."""
    cluster = cluster_stack.cluster
    [order] = await start_payments(apis, csim, 1, "cl-ui", pay="immediately")
    workflow_id = payment_id_for(order)
    await wait_status(apis.next(), workflow_id, "SUCCEEDED", timeout=60)
    async with httpx.AsyncClient(base_url=cluster.ui_url, timeout=15) as ui:
        page = await ui.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:500]
        assert '<div id="svelte">' in page.text and "/_app/immutable/" in page.text, page.text[:500]
        settings = (await ui.get("/api/v1/settings")).json()
        assert settings["DefaultNamespace"] == cluster.namespace, settings
        listed: list[str] = []
        deadline = time.monotonic() + 30  # visibility is written after the run, within a second or two
        while workflow_id not in listed:
            assert time.monotonic() < deadline, f"the Web UI does not list {workflow_id}; it lists {listed}"
            response = await ui.get(
                f"/api/v1/namespaces/{cluster.namespace}/workflows", params={"query": f"WorkflowId = '{workflow_id}'"}
            )
            assert response.status_code == 200, response.text
            listed = [run["execution"]["workflowId"] for run in response.json().get("executions", [])]
            if workflow_id not in listed:
                await asyncio.sleep(0.5)
        described = await ui.get(f"/api/v1/namespaces/{cluster.namespace}/workflows/{workflow_id}")
        assert described.status_code == 200, described.text
        assert described.json()["workflowExecutionInfo"]["type"]["name"], described.text


# --- Faults -----------------------------------------------------------------------------------------


async def _history_identities(client, order: str) -> dict[str, int]:
    """How many workflow tasks (which run the payment's local activities) and activity tasks each
    worker identity started or completed for this payment: every run of its workflow (a paid
    payment continues as new after the resend window) and its child workflows (refunds, reviews)."""
    seen: dict[str, int] = {}
    runs = [(run.id, run.run_id) async for run in client.list_workflows(f"WorkflowId = '{payment_id_for(order)}'")]
    kinds = (
        "workflow_task_started_event_attributes",
        "workflow_task_completed_event_attributes",
        "activity_task_started_event_attributes",
    )
    while runs:
        workflow_id, run_id = runs.pop()
        async for event in client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history_events():
            for kind in kinds:
                if event.HasField(kind):
                    identity = getattr(event, kind).identity
                    seen[identity] = seen.get(identity, 0) + 1
            if event.HasField("start_child_workflow_execution_initiated_event_attributes"):
                runs.append((event.start_child_workflow_execution_initiated_event_attributes.workflow_id, None))
    return seen


async def _calls(sim: httpx.AsyncClient, order: str) -> dict[str, int]:
    """The provider calls the simulator received for the order, per operation."""
    return (await sim.get(f"/control/trades/{provider_order(order)}")).json()["calls"]


async def test_worker_killed_with_sigkill_in_the_middle_of_create_query_close_and_refund(
    cluster_stack, apis, csim, csessions, cclient
):
    """kill -9 the worker while it is in the middle of a create, a query, a close and a refund at
    the provider: the other worker was stopped, so the victim held four payments, each scripted to
    hang once on one of those calls; the kill comes once the simulator has received all four and
    before any was answered or given up on. The other worker, started just before the kill, makes
    each call again: no trade created twice, no refund made twice, the paid payments SUCCEEDED and
    the unpaid one CLOSED."""
    victim, survivor = cluster_stack.of("worker")
    victim_pid = victim.process.pid if victim.process else 0
    await asyncio.to_thread(survivor.stop)
    hung: dict[str, str] = {}  # order -> the provider call that hangs once
    sent: dict[str, float] = {}  # order -> when its payment was started (its call cannot arrive before)
    checkouts: list[asyncio.Task] = []
    try:

        async def begin(prefix: str, operation: str, expires_in_seconds: float | None = None, **behaviour) -> str:
            order = new_order(prefix)
            await script(csim, order, **behaviour, faults={operation: {"mode": "hang", "times": 1}})
            hung[order], sent[order] = operation, time.monotonic()
            extra = {"expires_in_seconds": expires_in_seconds} if expires_in_seconds else {}
            # Not awaited here: the checkout of the order whose create hangs answers after its wait.
            checkouts.append(asyncio.create_task(start_payment(apis.next(), order, **extra)))
            return order

        # (c) The payer never pays: the trade is closed at the end of the time to live (5 s, the
        # least the API takes). Started first, so that the four hanging calls arrive close together.
        closing = await begin("cl-kc", "close", pay="never", expires_in_seconds=5)
        await asyncio.sleep(3.0)
        # (a) The create hangs. A long time to live: the payer pays once the trade exists.
        creating = await begin("cl-ka", "create", pay="immediately", expires_in_seconds=120)
        # (b) The payer pays, the callback is lost: the payment queries, and the query hangs. A long
        # time to live: after the kill the payment queries again (rather than closing the trade).
        querying = await begin("cl-kq", "query", pay="immediately", callback="drop", expires_in_seconds=120)
        # (d) The payer pays twice: the payment refunds the second charge, and the refund hangs.
        refunding = await begin("cl-kr", "refund", pay="immediately", second_charge=True, second_charge_delay_seconds=0.5)

        # Until the simulator has received every hanging call; ``not_before`` is the last moment
        # each one had not arrived yet.
        not_before = dict(sent)
        waiting = dict(hung)
        deadline = time.monotonic() + 30
        while waiting:
            for order, operation in list(waiting.items()):
                asked = time.monotonic()
                if (await _calls(csim, order))[operation] >= 1:
                    del waiting[order]
                else:
                    not_before[order] = asked
            assert time.monotonic() < deadline, f"the hanging calls did not all arrive: still waiting for {waiting}"
            if waiting:
                await asyncio.sleep(0.1)

        survivor.start()
        at_kill = {order: await _calls(csim, order) for order in hung}
        killed = time.monotonic()
        victim.kill()
        # Each call was still in the middle at the kill: the simulator holds it SIMULATOR_HANG_SECONDS
        # and had received it once only (no retry yet), and the victim gives up on a call only
        # PROVIDER_TIMEOUT_SECONDS after sending it, which it did after ``not_before`` (1 s margin).
        in_flight = {order: killed - not_before[order] for order in hung}
        for order, operation in hung.items():
            assert at_kill[order][operation] == 1, f"{operation} of {order} was retried before the kill: {at_kill[order]}"
            assert in_flight[order] < PROVIDER_TIMEOUT_SECONDS - 1, (
                f"the {operation} of {order} may have been given up on before the kill ({in_flight[order]:.1f}s in flight)"
            )
        await asyncio.to_thread(_wait_polling, cluster_stack, [survivor])
        polling = time.monotonic() - killed

        await books_balance(csim, csessions, [creating, querying, closing])
        await books_balance(csim, csessions, [refunding], trades_per_order=2, refunds_per_order=1)
        settled = time.monotonic() - killed
        await assert_all_succeeded(apis, [creating, querying, refunding])
        assert (await statuses(apis, [closing])) == {closing: "CLOSED"}
        for checkout in await asyncio.gather(*checkouts):
            assert checkout.status_code in (200, 201, 202), checkout.text
        # The survivor made each hanging call again (the victim's was never answered).
        again = {order: (await _calls(csim, order))[operation] for order, operation in hung.items()}
        assert all(calls >= 2 for calls in again.values()), again
        # The victim ran each payment up to the kill, the survivor the rest.
        assert survivor.process is not None
        by_worker = {order: await _history_identities(cclient, order) for order in hung}
        for order, identities in by_worker.items():
            assert any(i.startswith(f"{victim_pid}@") for i in identities), (order, "the victim ran none", identities)
            assert any(i.startswith(f"{survivor.process.pid}@") for i in identities), (order, "the survivor ran none", identities)
        tasks: dict[str, int] = {}
        for identities in by_worker.values():
            for identity, number in identities.items():
                name = "victim" if identity.startswith(f"{victim_pid}@") else "survivor"
                tasks[name] = tasks.get(name, 0) + number
        flight = ", ".join(f"{hung[o]} {in_flight[o]:.1f}s" for o in hung)
        made = ", ".join(f"{hung[o]} {again[o]}" for o in hung)
        print(
            f"\n[worker kill -9 mid-call: the hanging calls in flight at the kill (for at most): {flight}; survivor polling {polling:.1f}s after the kill; "
            f"books balanced {settled:.1f}s after it; calls received: {made}; tasks by worker: {tasks}]",
            file=sys.stderr,
        )
    finally:
        for checkout in checkouts:
            if not checkout.done():
                checkout.cancel()
        for worker in (survivor, victim):
            if worker.process is None or worker.process.poll() is not None:
                worker.start()
        await asyncio.to_thread(_wait_polling, cluster_stack, [survivor, victim])


async def test_both_workers_down_for_a_while_then_back(cluster_stack, apis, csim, csessions):
    workers = cluster_stack.of("worker")
    orders = await start_payments(apis, csim, 4, "cl-down", pay="after_delay", pay_delay_seconds=2.0)
    began = time.monotonic()
    await asyncio.to_thread(stop_all, workers)
    stopped = time.monotonic() - began
    await asyncio.sleep(6)  # the payers pay, the callbacks arrive, the payments' timers fire: nobody works
    assert "SUCCEEDED" not in (await statuses(apis, orders)).values()
    began = time.monotonic()
    for worker in workers:
        worker.start()
    await asyncio.to_thread(_wait_polling, cluster_stack, workers)
    polling = time.monotonic() - began
    await books_balance(csim, csessions, orders)
    await assert_all_succeeded(apis, orders)
    print(
        f"\n[both workers down: stopped in {stopped:.1f}s, down 6s, polling again {polling:.1f}s after the start, "
        f"books balanced {time.monotonic() - began - polling:.1f}s later]",
        file=sys.stderr,
    )


async def test_history_service_restarted_while_payments_wait_for_callbacks(cluster_stack, apis, csim, csessions):
    cluster = cluster_stack.cluster
    # The payers pay 1.5 s after their trades were made: while history restarts or just after.
    orders = await start_payments(apis, csim, 4, "cl-history", pay="after_delay", pay_delay_seconds=1.5)
    started = time.monotonic()
    await asyncio.to_thread(cluster.restart_service, "history")
    restarted = time.monotonic() - started
    await books_balance(csim, csessions, orders)
    await assert_all_succeeded(apis, orders)
    print(
        f"\n[history restart: {restarted:.1f}s; books balanced {time.monotonic() - started:.1f}s after it began]", file=sys.stderr
    )


async def test_history_service_restarted_while_a_refund_is_processing(cluster_stack, apis, csim, csessions):
    """A merchant refunds a paid payment; the provider keeps the refund processing for 4 s, and the
    history service restarts meanwhile: the refund is made once and recorded as succeeded."""
    from sqlalchemy import select

    from paysentinel import db

    cluster = cluster_stack.cluster
    [order] = await start_payments(apis, csim, 1, "cl-hist-refund", pay="immediately", refund_delay_seconds=4.0)
    payment_id = payment_id_for(order)
    await wait_status(apis.next(), payment_id, "SUCCEEDED", timeout=60)
    asked = time.monotonic()
    response = await apis.next().post(
        f"/payments/{payment_id}/refunds",
        json={"amount_minor": 9990, "reason": "customer returned the goods"},
        headers={"Idempotency-Key": "return-1"},
    )
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 30
    while (await _calls(csim, order))["refund"] < 1:
        assert time.monotonic() < deadline, "the refund did not reach the provider"
        await asyncio.sleep(0.1)
    arrived = time.monotonic() - asked
    ledger = (await csim.get(f"/control/ledger/{provider_order(order)}")).json()
    assert [r["refund_status"] for r in ledger["refunds"]] == ["REFUND_PROCESSING"], ledger
    started = time.monotonic()
    await asyncio.to_thread(cluster.restart_service, "history")
    restarted = time.monotonic() - started
    ledgers = await books_balance(csim, csessions, [order], refunds_per_order=1)
    ledger = ledgers[provider_order(order)]
    [made] = ledger["refunds"]
    assert (made["refund_status"], made["refund_amount"], made["submissions"]) == ("REFUND_SUCCESS", "99.90", 1), made
    assert (ledger["captured_minor"], ledger["refunded_minor"]) == (9990, 9990), ledger
    deadline = time.monotonic() + 30
    while True:
        async with csessions() as session:
            rows = (await session.scalars(select(db.Refund).where(db.Refund.payment_id == payment_id))).all()
        if [row.status for row in rows] == ["SUCCEEDED"]:
            break
        assert time.monotonic() < deadline, [(row.refund_id, row.status, row.detail) for row in rows]
        await asyncio.sleep(0.2)
    [row] = rows
    assert (row.refund_id, row.amount_minor) == (made["out_request_no"], 9990), (row.refund_id, row.amount_minor, made)
    view = (await apis.next().get(f"/payments/{payment_id}")).json()
    assert [r["status"] for r in view["refunds"]] == ["SUCCEEDED"], view
    print(
        f"\n[history restart during a refund: the refund reached the provider {arrived:.1f}s after it was asked for; "
        f"history restarted in {restarted:.1f}s; refunded once, recorded SUCCEEDED {time.monotonic() - started:.1f}s "
        f"after the restart began; payment {view['status']}; refund calls received {(await _calls(csim, order))['refund']}]",
        file=sys.stderr,
    )


async def test_temporal_postgres_restarted(cluster_stack, apis, csim, csessions):
    """Temporal's own PostgreSQL (a separate instance) is restarted while payments are in flight."""
    cluster = cluster_stack.cluster
    orders = await start_payments(apis, csim, 4, "cl-pg", pay="after_delay", pay_delay_seconds=2.0)
    started = time.monotonic()
    await asyncio.to_thread(cluster.postgres.restart)
    restarted = time.monotonic() - started
    await books_balance(csim, csessions, orders)
    await assert_all_succeeded(apis, orders)
    print(
        f"\n[Temporal PostgreSQL restart: {restarted:.1f}s; books balanced {time.monotonic() - started:.1f}s after]",
        file=sys.stderr,
    )


async def _deliveries(sim: httpx.AsyncClient, order: str) -> list[dict]:
    return (await sim.get(f"/control/trades/{provider_order(order)}")).json()["deliveries"]


async def _a_delivery_accepted(sim: httpx.AsyncClient, order: str, after: Callable[[list], int] = lambda codes: 0) -> None:
    """Wait until a delivery of the order's callback (from the index ``after`` gives) was answered
    200. The payment may have settled through a query first; the provider keeps resending (1, 2,
    4, 8, 16 s apart) until one is accepted."""
    deadline = time.monotonic() + 40
    while True:
        codes = [d["status_code"] for d in await _deliveries(sim, order)]
        if 200 in codes[after(codes) :]:
            return
        assert time.monotonic() < deadline, f"no delivery accepted: {order} {codes}"
        await asyncio.sleep(0.5)


async def test_app_postgres_restarted_while_callbacks_arrive(cluster_stack, app_postgres, apis, csim, csessions):
    """The application's PostgreSQL goes down (``pg_ctl stop``) while the payers pay and is started
    again: the webhook receivers answer 503 meanwhile, the provider's resends are accepted after."""
    # The payers pay 3 s after their trades were made: after the database has gone down.
    orders = await start_payments(apis, csim, 3, "cl-appdb", pay="after_delay", pay_delay_seconds=3.0)
    began = time.monotonic()
    await asyncio.to_thread(app_postgres.stop)
    try:
        deadline = time.monotonic() + 20
        while True:
            seen = {o: [d["status_code"] for d in await _deliveries(csim, o)] for o in orders}
            if all(503 in codes for codes in seen.values()):
                break
            assert time.monotonic() < deadline, f"not every callback was answered 503: {seen}"
            await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(app_postgres.start)
    down = time.monotonic() - began
    await books_balance(csim, csessions, orders)
    await assert_all_succeeded(apis, orders)
    for order in orders:  # a resend after the outage was accepted
        await _a_delivery_accepted(csim, order, after=lambda codes: codes.index(503))
    print(
        f"\n[application PostgreSQL down {down:.1f}s; books balanced and resends accepted "
        f"{time.monotonic() - began - down:.1f}s after its start]",
        file=sys.stderr,
    )


async def test_webhook_receiver_replica_killed_mid_request(cluster_stack, apis, csim, csessions):
    """kill -9 one receiver while callbacks are being delivered (each sent twice): the provider's
    resends reach the other one through the balancer; every payment settles."""
    victim = cluster_stack.of("webhooks")[0]
    orders = await start_payments(apis, csim, 6, "cl-hook", pay="after_delay", pay_delay_seconds=0.3, callback="duplicate")
    await asyncio.sleep(0.4)
    victim.kill()
    try:
        await books_balance(csim, csessions, orders)
        await assert_all_succeeded(apis, orders)
        for order in orders:
            await _a_delivery_accepted(csim, order)
    finally:
        victim.start()
        await asyncio.to_thread(_wait_healthy, [victim])
