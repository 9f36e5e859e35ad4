"""Real parts for the tests: a Temporal dev server, PostgreSQL, and the running system.

Nothing here skips: when a part is missing the session fails and says what to do.
Timings are seconds, set through the same environment variables users set.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from paysentinel.config import DEFAULT_CACHE_DIR, token_digest
from paysentinel.devserver import DevServer, ensure_temporal_cli, free_port
from tests.helpers import (
    MERCHANT_A,
    MERCHANT_B,
    MERCHANT_PREVIOUS_SECRET,
    MERCHANT_SECRET,
    SIMULATOR_SECRET,
    Books,
    assert_books_balance,
    set_provider_urls,
    track_books,
)
from tests.fakes import FAKES

DEFAULT_TEST_DATABASE = "postgresql+asyncpg://paysentinel:paysentinel@127.0.0.1:5432/paysentinel_test"

# Fast timings for the running system under test (seconds).
TEST_TIMINGS = {
    "PAYSENTINEL_CALLBACK_TIMEOUT_SECONDS": "1.5",
    "PAYSENTINEL_QUERY_BACKOFF_SECONDS": "0.5,1,1",
    "PAYSENTINEL_PAYMENT_TTL_SECONDS": "8",
    "PAYSENTINEL_RESEND_WINDOW_SECONDS": "6",
    "PAYSENTINEL_CLOSE_ATTEMPTS": "2",
    "PAYSENTINEL_PROVIDER_TIMEOUT_SECONDS": "1",
    "PAYSENTINEL_PROVIDER_RETRY_INITIAL_SECONDS": "0.2",
    "PAYSENTINEL_PROVIDER_MAX_ATTEMPTS": "3",
    "PAYSENTINEL_CHECKOUT_WAIT_SECONDS": "8",
    "PAYSENTINEL_SIMULATOR_RESEND_SECONDS": "0.5,1,2,4",
    "PAYSENTINEL_SIMULATOR_HANG_SECONDS": "3",
    "PAYSENTINEL_REFUND_WINDOW_SECONDS": "120",
    "PAYSENTINEL_REFUND_SUBMISSIONS": "2",
    "PAYSENTINEL_REVIEW_ESCALATE_SECONDS": "4",
    "PAYSENTINEL_REVIEW_DEADLINE_SECONDS": "20",  # long enough for an operator CLI on a loaded machine
    "PAYSENTINEL_NOTIFY_RETRY_INITIAL_SECONDS": "0.3",
    "PAYSENTINEL_NOTIFY_MAX_ATTEMPTS": "4",
    "PAYSENTINEL_NOTIFY_ALLOWED_HOSTS": "localhost",  # the tests' merchant endpoint
    "PAYSENTINEL_MONITOR_INTERVAL_SECONDS": "3600",  # tests run the monitor themselves
    "PAYSENTINEL_ALERT_EMAIL": "ops@paysentinel.test",
    "PAYSENTINEL_LOG_FORMAT": "json",
    "PAYSENTINEL_RECONCILE_CATCHUP_DAYS": "2",  # the schedule catches up yesterday and the two days before
    "PAYSENTINEL_RECONCILE_ALERT_THRESHOLD": "0",
    "PAYSENTINEL_RECONCILE_BATCH_ROWS": "25",  # several batches even for a small day
    "PAYSENTINEL_RECONCILE_VERIFY_WAIT_SECONDS": "20",  # a run waits this long for its repairs to show
}
OPERATORS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789",
    "carol": "carol-token-0123456789",
    "vera": "vera-token-0123456789",
}
ROLES = {"alice": "operator", "bob": "approver", "carol": "approver", "vera": "viewer"}
OPERATOR_HEADERS = {"Authorization": f"Bearer {OPERATORS['alice']}"}
# The tests' payload keys (fixed, so histories recorded by a test run replay in later ones):
# "test-2" encrypts, "test-1" still decrypts (a rotation in progress).
TEST_PAYLOAD_KEYS = "test-2:cGF5c2VudGluZWwtdGVzdC1wYXlsb2FkLWtleS0wMDI=,test-1:cGF5c2VudGluZWwtdGVzdC1wYXlsb2FkLWtleS0wMDE="
FOUR_EYES_MINOR = 50_000  # decisions moving more than 500.00 need a second approver


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATORS[name]}"}


@pytest.fixture(scope="session")
def temporal_cli() -> Path:
    cache = Path(os.environ.get("PAYSENTINEL_CACHE_DIR", DEFAULT_CACHE_DIR))
    return ensure_temporal_cli(cache, log=lambda line: print(line, file=sys.stderr))


@pytest.fixture(scope="session")
def time_skipping_server() -> str:
    """Temporal's time-skipping test server (scripts/ensure-test-server.sh obtains it)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "ensure-test-server.sh"
    found = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"the time-skipping test server is missing and could not be obtained:\n{found.stderr}", pytrace=False)
    return found.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
async def temporal_server(temporal_cli: Path, tmp_path_factory) -> AsyncIterator[DevServer]:
    server = DevServer(
        temporal_cli,
        log_file=tmp_path_factory.mktemp("temporal") / "temporal.log",
        port=free_port(),
        ui_port=free_port(),  # the Web UI test browses it
    )
    async with server:
        yield server


@pytest.fixture(scope="session")
async def client(temporal_server: DevServer) -> Client:
    from paysentinel.config import Settings
    from paysentinel.temporal import connect

    return await connect(Settings(TEMPORAL_ADDRESS=temporal_server.address, payload_keys=TEST_PAYLOAD_KEYS))


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this session, migrated with Alembic."""
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(os.environ.get("PAYSENTINEL_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE))
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as err:
        pytest.fail(
            f"PostgreSQL is not reachable at {base.render_as_string()} ({err}). "
            "Run `bash scripts/ensure-postgres.sh` (installs and starts it on loopback), "
            "or set PAYSENTINEL_TEST_DATABASE_URL.",
            pytrace=False,
        )
    name = f"paysentinel_t{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = base.set(database=name).render_as_string(hide_password=False)
    from paysentinel import db

    await asyncio.to_thread(db.upgrade, url)
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass(frozen=True)
class Merchants:
    """The session's two merchants' full keys (every scope), made through the db functions."""

    a_key: str
    b_key: str

    def headers(self, merchant: str = MERCHANT_A) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.a_key if merchant == MERCHANT_A else self.b_key}"}


@pytest.fixture(scope="session")
async def merchants(database_url: str) -> Merchants:
    from paysentinel import db
    from paysentinel.merchants import API_SCOPES, create_key, create_merchant

    engine = db.make_engine(database_url)
    try:
        sessions = db.make_sessionmaker(engine)
        keys = []
        for merchant in (MERCHANT_A, MERCHANT_B):
            await create_merchant(sessions, merchant, f"Test merchant {merchant}")
            keys.append((await create_key(sessions, merchant, list(API_SCOPES)))[1])
    finally:
        await engine.dispose()
    return Merchants(*keys)


@dataclass
class Stack:
    api_url: str
    operator_url: str  # the operator API: its own listener
    webhook_url: str
    simulator_url: str
    task_queue: str
    sdk_metrics_url: str
    spans_file: Path  # OpenTelemetry spans (PAYSENTINEL_TRACING=file)
    env: dict[str, str]
    log_file: Path
    app: subprocess.Popen | None = None  # worker, APIs and webhook receiver (the simulator runs apart)
    provider_urls: dict[str, str] = field(default_factory=dict)  # each provider's fake (tests/fakes), by name

    def start_app(self) -> None:
        self.app = start_parts(self.env, "worker,api,webhooks,operator", self.log_file)
        _wait_healthy([self.api_url, self.webhook_url, self.operator_url], self.app, self.log_file)

    def restart_app(self) -> None:
        """Stop the worker, APIs and webhook receiver (SIGTERM) and start them again."""
        assert self.app is not None
        stop_process(self.app)
        self.start_app()


def _wait_healthy(urls: list[str], process: subprocess.Popen, log_file: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"paysentinel up exited with {process.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            if httpx.get(pending[0] + "/health", timeout=1).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if pending:
        raise RuntimeError(f"{pending} not healthy after {timeout}s:\n{log_file.read_text()[-4000:]}")


def start_parts(env: dict[str, str], parts: str, log_file: Path) -> subprocess.Popen:
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "paysentinel.cli", "up", "--parts", parts],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def start_fake(name: str, env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """A provider's fake (tests/fakes/<name>.py) as its own process."""
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"tests.fakes.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Mailbox:
    """A real SMTP server (aiosmtpd) on loopback; ``messages`` holds what arrived."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        import email
        from email import policy

        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list:
        return [m for m in self.messages if m["To"] == address]

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


@pytest.fixture(scope="session")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    box.start()
    yield box
    box.stop()


@pytest.fixture(scope="session")
def stack(temporal_server: DevServer, database_url: str, mailbox: Mailbox, tmp_path_factory) -> Iterator[Stack]:
    """The system as users run it (`paysentinel up`), on the test's Temporal and PostgreSQL."""
    ports = {name: free_port() for name in ("api", "webhook", "simulator", "sdk_metrics", "operator")}
    task_queue = f"payments-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        **TEST_TIMINGS,
        "TEMPORAL_ADDRESS": temporal_server.address,
        "PAYSENTINEL_DATABASE_URL": database_url,
        "PAYSENTINEL_TASK_QUEUE": task_queue,
        "PAYSENTINEL_API_PORT": str(ports["api"]),
        "PAYSENTINEL_OPERATOR_PORT": str(ports["operator"]),
        "PAYSENTINEL_WEBHOOK_PORT": str(ports["webhook"]),
        "PAYSENTINEL_SIMULATOR_PORT": str(ports["simulator"]),
        "PAYSENTINEL_SDK_METRICS_PORT": str(ports["sdk_metrics"]),
        "PAYSENTINEL_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "PAYSENTINEL_OPERATOR_TOKENS": ",".join(
            f"{name}:{ROLES[name]}:{token_digest(token)}" for name, token in OPERATORS.items()
        ),
        "PAYSENTINEL_FOUR_EYES_MINOR": str(FOUR_EYES_MINOR),
        "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET": SIMULATOR_SECRET,  # not the development profile: secrets of its own
        "PAYSENTINEL_MERCHANT_WEBHOOK_SECRET": MERCHANT_SECRET,
        "PAYSENTINEL_MERCHANT_WEBHOOK_SECRET_PREVIOUS": MERCHANT_PREVIOUS_SECRET,
        "PAYSENTINEL_SMTP_HOST": "127.0.0.1",
        "PAYSENTINEL_SMTP_PORT": str(mailbox.port),
        "PAYSENTINEL_PAYLOAD_KEYS": TEST_PAYLOAD_KEYS,
        "PAYSENTINEL_CODEC_CORS_ORIGINS": temporal_server.ui_url or "",  # the Web UI test decodes through /codec
    }
    log_file = tmp_path_factory.mktemp("stack") / "paysentinel.log"
    spans_file = log_file.with_name("spans.jsonl")
    env.update({"PAYSENTINEL_TRACING": "file", "PAYSENTINEL_TRACING_FILE": str(spans_file)})
    stack = Stack(
        api_url=f"http://127.0.0.1:{ports['api']}",
        operator_url=f"http://127.0.0.1:{ports['operator']}",
        webhook_url=f"http://127.0.0.1:{ports['webhook']}",
        simulator_url=f"http://127.0.0.1:{ports['simulator']}",
        task_queue=task_queue,
        sdk_metrics_url=f"http://127.0.0.1:{ports['sdk_metrics']}/metrics",
        spans_file=spans_file,
        env=env,
        log_file=log_file,
    )
    fakes: list[tuple[str, str, dict[str, str]]] = []  # (provider, url, its environment)
    for name in FAKES:
        if importlib.util.find_spec(f"tests.fakes.{name}") is None:
            continue
        port = free_port()
        setup = importlib.import_module(f"tests.fakes.{name}").prepare(
            tmp_path_factory.mktemp(f"fake-{name}"), port, f"{stack.webhook_url}/webhooks/{name}"
        )
        env.update(setup.app_env)
        fakes.append((name, f"http://127.0.0.1:{port}", {**os.environ, **setup.fake_env}))
    env["PAYSENTINEL_PROVIDERS"] = ",".join(["simulator", *(name for name, _, _ in fakes)])
    stack.provider_urls = {"simulator": stack.simulator_url, **{name: url for name, url, _ in fakes}}
    set_provider_urls(stack.provider_urls)
    simulator = start_parts(env, "simulator", log_file)
    fake_processes: list[subprocess.Popen] = []
    try:
        _wait_healthy([stack.simulator_url], simulator, log_file)
        for name, url, fake_env in fakes:
            fake_processes.append(start_fake(name, fake_env, log_file))
            _wait_healthy([url], fake_processes[-1], log_file)
        stack.start_app()
        yield stack
    finally:
        if stack.app is not None:
            stop_process(stack.app)
        for process in fake_processes:
            stop_process(process)
        stop_process(simulator)
        print(f"\n[paysentinel log: {log_file}]", file=sys.stderr)


@pytest.fixture
async def api(stack: Stack, merchants: Merchants) -> AsyncIterator[httpx.AsyncClient]:
    """The checkout API as merchant A (its key with every scope) sees it."""
    async with httpx.AsyncClient(base_url=stack.api_url, headers=merchants.headers(MERCHANT_A), timeout=30) as http:
        yield http


@pytest.fixture
async def finance(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The operator API as an operator (reconciliation runs and reports)."""
    async with httpx.AsyncClient(base_url=stack.operator_url, headers=OPERATOR_HEADERS, timeout=60) as http:
        yield http


@pytest.fixture
async def operator(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The operator API as alice (role operator) sees it."""
    async with httpx.AsyncClient(base_url=stack.operator_url, headers=OPERATOR_HEADERS, timeout=30) as http:
        yield http


@pytest.fixture
async def sim(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.simulator_url, timeout=30) as http:
        yield http


@pytest.fixture
async def sessions(database_url: str):
    from paysentinel import db

    engine = db.make_engine(database_url)
    yield db.make_sessionmaker(engine)
    await engine.dispose()


# --- Order: the longest test files first, so parallel workers (scripts/test.sh) end together ---

LONGEST_FIRST = (
    "test_cluster.py",
    "test_reconciliation.py",
    "test_demo_providers.py",
    "test_replay.py",
    "test_provider_wechatpay.py",
    "test_provider_alipay.py",
    "test_provider_stripe.py",
    "test_refunds_reviews_e2e.py",
    "test_money_safety.py",
    "test_workflow_branches.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


# --- The books check after every scenario on the running stack ----------------------------

_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def books() -> Iterator[Books]:
    """The orders this test starts (``start_payment`` records them); ``books.exempt(order, reason)``
    leaves one out of the check, ``books.allow_review(order, reason)`` lets it end IN_REVIEW apart
    from the provider's amounts."""
    registry = Books()
    track_books(registry)
    try:
        yield registry
    finally:
        track_books(None)


@pytest.fixture(autouse=True)
def _books_balance(request: pytest.FixtureRequest) -> None:
    """After each test that runs on the stack: the provider's ledger equals our database."""
    if "stack" in request.fixturenames:  # pure unit tests are left alone
        request.getfixturevalue("_books_balance_check")


@pytest.fixture
async def _books_balance_check(
    request: pytest.FixtureRequest, books: Books, stack: Stack, database_url: str
) -> AsyncIterator[None]:
    yield
    call = request.node.stash.get(_REPORTS, {}).get("call")
    if call is None or not call.passed or not books.to_check():
        return  # a failed test already says what went wrong
    from paysentinel import db

    engine = db.make_engine(database_url)
    failure = None
    try:
        async with httpx.AsyncClient(base_url=stack.simulator_url, timeout=30) as sim:
            await assert_books_balance(sim, db.make_sessionmaker(engine), allow_review=books.review_allowed)
    except AssertionError as err:
        failure = str(err)
    finally:
        await engine.dispose()
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def new_order(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
