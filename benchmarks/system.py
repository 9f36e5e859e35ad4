"""What the benchmarks share: the system on free loopback ports, and how figures are printed.

``Infrastructure`` is a Temporal server (a dev server we start, or ``--temporal-address``) and
an application database (a fresh PostgreSQL database on PAYSENTINEL_BENCH_DATABASE_URL's
server, ``--database-url``, or SQLite with ``--sqlite``) with a merchant and its key.
``System`` is `paysentinel up --parts simulator,worker,api,webhooks` on them, in one process
or with ``--processes``, each start on its own task queue.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from paysentinel import db  # noqa: E402
from paysentinel.codec import format_keys  # noqa: E402
from paysentinel.config import DEFAULT_CACHE_DIR, Settings, new_webhook_secret  # noqa: E402
from paysentinel.devserver import DevServer, ensure_temporal_cli, free_port  # noqa: E402

PG = "postgresql+asyncpg://paysentinel:paysentinel@127.0.0.1:5432/paysentinel_test"
MERCHANT = "bench"
LAYOUTS = ("one-process", "processes")


def machine() -> str:
    u = os.uname()
    return f"{u.nodename}: {u.sysname} {u.release} {u.machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def header(title: str, env: dict[str, str] | None = None) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print("one run on a machine possibly shared with other work: medians and ratios of this run only")
    if env:
        print("settings: " + ", ".join(f"{name}={value}" for name, value in env.items()))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--database-url", help="an existing, migrated application database (else a fresh one)")
    parser.add_argument("--temporal-address", help="an existing Temporal server (else a dev server is started)")
    parser.add_argument(
        "--layout",
        choices=(*LAYOUTS, "both"),
        default="one-process",
        help="`paysentinel up` in one process, each part in its own (--processes), or both",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="with the processes layout: worker processes (`paysentinel up --workers`)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the system, e.g. PAYSENTINEL_WORKER_SANDBOX=shared (repeatable)",
    )


def settings_env(args: argparse.Namespace) -> dict[str, str]:
    """The --env settings (``header`` prints them, so the figures say what they ran with)."""
    return dict(item.split("=", 1) for item in args.env)


def layouts(choice: str) -> tuple[str, ...]:
    return LAYOUTS if choice == "both" else (choice,)


@dataclass
class Infrastructure:
    temporal_address: str
    database_url: str
    key: str  # merchant bench's API key (every scope)
    workdir: Path
    payload_keys: str
    sessions: object = None  # async_sessionmaker on database_url
    server_pid: int | None = None  # the dev server we started, if any

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds of the Temporal dev server we started and of this benchmark process."""
        used = {"benchmark": process_cpu_seconds(os.getpid())}
        if self.server_pid is not None:
            used["temporal"] = process_cpu_seconds(self.server_pid)
        if not self.database_url.startswith("sqlite") and (postgres := postgres_cpu_seconds()) is not None:
            used["postgresql"] = postgres
        return used

    async def client(self):
        from paysentinel.temporal import connect

        return await connect(Settings(TEMPORAL_ADDRESS=self.temporal_address, payload_keys=self.payload_keys))


@asynccontextmanager
async def infrastructure(args: argparse.Namespace):
    workdir = Path(tempfile.mkdtemp(prefix="paysentinel-bench-"))
    server = None
    if not args.temporal_address:
        cli = ensure_temporal_cli(Path(os.environ.get("PAYSENTINEL_CACHE_DIR", DEFAULT_CACHE_DIR)))
        server = DevServer(cli, log_file=workdir / "temporal.log", port=free_port())
    dropper = None
    if args.database_url:
        url = args.database_url
    elif args.sqlite:
        url = f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    else:
        import asyncpg
        from sqlalchemy.engine import make_url

        base = make_url(os.environ.get("PAYSENTINEL_BENCH_DATABASE_URL", PG))
        admin = await asyncpg.connect(base.set(drivername="postgresql").render_as_string(hide_password=False))
        name = f"paysentinel_bench_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = base.set(database=name).render_as_string(hide_password=False)
        dropper = (admin, name)
    engine = None
    try:
        await asyncio.to_thread(db.upgrade, url)
        engine = db.make_engine(url)
        sessions = db.make_sessionmaker(engine)
        from paysentinel.merchants import API_SCOPES, create_key, create_merchant, get_merchant

        if await get_merchant(sessions, MERCHANT) is None:
            await create_merchant(sessions, MERCHANT, "Benchmark merchant")
        key = (await create_key(sessions, MERCHANT, list(API_SCOPES)))[1]
        keys = format_keys([("bench", os.urandom(32))])
        if server is not None:
            async with server:
                yield Infrastructure(server.address, url, key, workdir, keys, sessions, server.pid)
        else:
            yield Infrastructure(args.temporal_address, url, key, workdir, keys, sessions)
    finally:
        if engine is not None:
            await engine.dispose()
        if dropper is not None:
            admin, name = dropper
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


@dataclass
class System:
    layout: str
    api_url: str
    webhook_url: str
    simulator_url: str
    sdk_metrics_url: str  # the first worker's; the k-th extra one's port is WORKER_PORT_STEP * k higher
    task_queue: str
    process: subprocess.Popen
    log_file: Path
    headers: dict[str, str] = field(default_factory=dict)
    workers: int = 1

    def worker_pids(self) -> list[int]:
        """The processes the worker runs in (its children with --processes, --workers of them)."""
        if self.layout == "one-process":
            return [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        pids = [int(child) for child in children if b"\0worker\0" in Path(f"/proc/{child}/cmdline").read_bytes()]
        if not pids:
            raise RuntimeError("no worker process found")
        return pids

    def worker_rss_mib(self) -> list[tuple[float, float]]:
        """(current, peak) resident memory of each worker process, MiB."""
        sizes = []
        for pid in self.worker_pids():
            found = {}
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    found[name] = int(value.split()[0]) / 1024
            sizes.append((found["VmRSS"], found["VmHWM"]))
        return sizes

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each part: the worker, api, webhooks and
        simulator with --processes (``up`` is the parent), or ``up`` alone in one process."""
        used = {"up": process_cpu_seconds(self.process.pid)}
        if self.layout == "processes":
            for child in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split():
                args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                part = args[3].decode() if len(args) > 3 else child  # --workers N: their sum
                used[part] = used.get(part, 0.0) + process_cpu_seconds(int(child))
        return used

    def sdk_metric(self, name: str) -> float:
        """The sum of a Temporal SDK worker metric over its labels (this task queue's, where
        labelled) and over the worker processes."""
        from paysentinel.runner import WORKER_PORT_STEP

        base = httpx.URL(self.sdk_metrics_url)
        total = 0.0
        for k in range(self.workers):
            url = base.copy_with(port=(base.port or 0) + WORKER_PORT_STEP * k)
            for line in httpx.get(url, timeout=5).text.splitlines():
                if line.startswith(name) and (f'task_queue="{self.task_queue}' in line or "task_queue=" not in line):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def process_cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of one process so far (all its threads; ``children``: and
    of its children that have exited)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float | None:
    """CPU seconds of the PostgreSQL server on this machine (every ``postgres`` process, and the
    backends that have exited), or None when none runs here. Other databases' work counts too."""
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "postgres":
                total += process_cpu_seconds(int(stat.parent.name), children=True)
                found = True
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return total if found else None


def operator_entry(token: str) -> str:
    return f"bench:operator:{hashlib.sha256(token.encode()).hexdigest()}"


@asynccontextmanager
async def system(
    infra: Infrastructure,
    layout: str,
    extra_env: dict[str, str] | None = None,
    parts: str = "simulator,worker,api,webhooks",
    workers: int = 1,
):
    ports = {name: free_port() for name in ("api", "webhook", "simulator", "sdk", "metrics", "operator")}
    task_queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": infra.temporal_address,
        "PAYSENTINEL_DATABASE_URL": infra.database_url,
        "PAYSENTINEL_TASK_QUEUE": task_queue,
        "PAYSENTINEL_API_PORT": str(ports["api"]),
        "PAYSENTINEL_WEBHOOK_PORT": str(ports["webhook"]),
        "PAYSENTINEL_SIMULATOR_PORT": str(ports["simulator"]),
        "PAYSENTINEL_OPERATOR_PORT": str(ports["operator"]),
        "PAYSENTINEL_SDK_METRICS_PORT": str(ports["sdk"]),
        "PAYSENTINEL_METRICS_PORT": str(ports["metrics"]),
        "PAYSENTINEL_DATA_DIR": str(infra.workdir / task_queue),
        "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET": new_webhook_secret(),
        "PAYSENTINEL_MERCHANT_WEBHOOK_SECRET": new_webhook_secret(),
        "PAYSENTINEL_OPERATOR_TOKENS": operator_entry(secrets.token_hex(16)),
        "PAYSENTINEL_PAYLOAD_KEYS": infra.payload_keys,
        "PAYSENTINEL_MONITOR_INTERVAL_SECONDS": "0",
        "PAYSENTINEL_RECONCILE_ENABLED": "false",
        "PAYSENTINEL_LOG_FORMAT": "json",
        # The benchmarks measure capacity, not the abuse limits (which would answer 429 first).
        "PAYSENTINEL_RATE_LIMIT_PAYMENTS_PER_SECOND": "0",
        "PAYSENTINEL_RATE_LIMIT_PAYMENTS_ADDRESS_PER_SECOND": "0",
        "PAYSENTINEL_RATE_LIMIT_WEBHOOKS_PER_SECOND": "0",
        "PAYSENTINEL_RATE_LIMIT_WEBHOOKS_ADDRESS_PER_SECOND": "0",
        **(extra_env or {}),
    }
    log_file = infra.workdir / f"paysentinel-{task_queue}.log"
    command = [sys.executable, "-m", "paysentinel.cli", "up", "--parts", parts]
    if layout == "processes":
        command.append("--processes")
        if workers > 1:
            command += ["--workers", str(workers)]
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    sys_ = System(
        layout,
        f"http://127.0.0.1:{ports['api']}",
        f"http://127.0.0.1:{ports['webhook']}",
        f"http://127.0.0.1:{ports['simulator']}",
        f"http://127.0.0.1:{ports['sdk']}/metrics",
        task_queue,
        process,
        log_file,
        {"Authorization": f"Bearer {infra.key}"},
        workers if layout == "processes" else 1,
    )
    try:
        await asyncio.to_thread(_wait_healthy, [sys_.api_url, sys_.webhook_url, sys_.simulator_url], process, log_file)
        await asyncio.sleep(1)  # the worker polls
        yield sys_
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(urls: list[str], process: subprocess.Popen, log_file: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"paysentinel up exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            if httpx.get(pending[0] + "/health", timeout=1).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if pending:
        raise RuntimeError(f"{pending} not healthy after {timeout}s:\n{log_file.read_text()[-3000:]}")


def new_order(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def checkout_body(order: str, **extra) -> dict:
    return {
        "order_id": order,
        "amount_minor": 9990,
        "currency": "CNY",
        "subject": "benchmark order",
        "customer": {"email": f"{order}@example.com"},
        **extra,
    }


async def script(sim: httpx.AsyncClient, order: str, **behaviour) -> None:
    """Script the simulator for our order (the provider knows it as <merchant>-<order>)."""
    (await sim.put(f"/control/scripts/{MERCHANT}-{order}", json=behaviour)).raise_for_status()


async def post_payment(api: httpx.AsyncClient, order: str, retries: int = 0, **extra) -> tuple[httpx.Response, int]:
    """POST /payments; on 429/503 wait Retry-After and try again up to ``retries`` times.
    Returns (last response, how many refusals came before it)."""
    refusals = 0
    while True:
        response = await api.post("/payments", json=checkout_body(order, **extra))
        if response.status_code not in (429, 503) or refusals >= retries:
            return response, refusals
        refusals += 1
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


class StatusWatch:
    """Polls the payments table for the ids it is asked about, every ``interval`` seconds;
    ``until(payment_id, statuses)`` returns when the row has one of them."""

    def __init__(self, sessions, interval: float = 0.02):
        self.sessions, self.interval = sessions, interval
        self.waiting: dict[str, tuple[frozenset[str], asyncio.Future]] = {}
        self._task: asyncio.Task | None = None

    async def until(self, payment_id: str, statuses: frozenset[str] | set[str], timeout: float = 120) -> float:
        """Seconds (perf_counter) at which the row was first seen in ``statuses``."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[payment_id] = (frozenset(statuses), future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll())
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(payment_id, None)

    async def _poll(self) -> None:
        from sqlalchemy import select

        while self.waiting:
            ids = list(self.waiting)
            async with self.sessions() as session:
                rows = (
                    await session.execute(select(db.Payment.payment_id, db.Payment.status).where(db.Payment.payment_id.in_(ids)))
                ).all()
            now = time.perf_counter()
            for payment_id, status in rows:
                entry = self.waiting.get(payment_id)
                if entry and status in entry[0] and not entry[1].done():
                    entry[1].set_result(now)
            await asyncio.sleep(self.interval)
