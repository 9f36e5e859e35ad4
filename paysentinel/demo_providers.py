"""``paysentinel demo --provider``: the demo against a provider's fake, on a system of its own.

For ``alipay``, ``wechatpay`` and ``stripe`` the demo starts that provider's protocol-faithful
fake (``tests/fakes``, so it runs from a checkout of the repository) and ``paysentinel up`` on
embedded defaults pointed at it: a temporary data dir, the SQLite database, the Temporal dev
server as ``paysentinel up`` starts it, free loopback ports and short timings. It then drives
one payment per scenario, compares our database with the provider's ledger for each order
(captured − refunded against paid − refunded), and stops every process it started.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import httpx
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

FAKE_PROVIDERS = ("alipay", "wechatpay", "stripe")
PROVIDERS = ("simulator", *FAKE_PROVIDERS)
MERCHANT = "demo"  # the development profile's merchant
AMOUNT_MINOR = 9990

# Short timings for a system started by the demo (seconds), so a run takes about a minute.
DEMO_TIMINGS = {
    "PAYSENTINEL_CALLBACK_TIMEOUT_SECONDS": "1.5",
    "PAYSENTINEL_QUERY_BACKOFF_SECONDS": "0.5,1,1",
    "PAYSENTINEL_RESEND_WINDOW_SECONDS": "6",
    "PAYSENTINEL_CLOSE_ATTEMPTS": "2",
    "PAYSENTINEL_PROVIDER_TIMEOUT_SECONDS": "2",
    "PAYSENTINEL_PROVIDER_RETRY_INITIAL_SECONDS": "0.2",
    "PAYSENTINEL_PROVIDER_MAX_ATTEMPTS": "3",
    "PAYSENTINEL_CHECKOUT_WAIT_SECONDS": "20",  # a busy machine: the create's retries may outlast 8 s
    "PAYSENTINEL_REFUND_SUBMISSIONS": "2",
    "PAYSENTINEL_NOTIFY_RETRY_INITIAL_SECONDS": "0.3",
    "PAYSENTINEL_NOTIFY_MAX_ATTEMPTS": "4",
    "PAYSENTINEL_RECONCILE_VERIFY_WAIT_SECONDS": "20",
}
PORTS = ("temporal", "temporal_ui", "api", "operator", "webhook", "simulator", "sdk_metrics", "metrics")


class DemoUnavailable(RuntimeError):
    """The demo cannot run here (the fakes are missing, or the system did not start)."""


# --- The fakes -----------------------------------------------------------------------------------


def load_fake(provider: str) -> ModuleType:
    """``tests.fakes.<provider>``: importable from the repository root (the current directory)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(f"tests.fakes.{provider}")
    except ImportError as err:
        raise DemoUnavailable(
            f"the {provider} fake (tests/fakes/{provider}.py) cannot be imported ({err}): "
            "`paysentinel demo --provider` runs from a checkout of the repository; run it from the "
            "repository root"
        ) from err


def _fake_root(module: ModuleType) -> Path:
    """The directory that holds the ``tests`` package the fake came from."""
    return Path(module.__file__ or ".").resolve().parents[2]


# --- The system ----------------------------------------------------------------------------------


def _clean_environment() -> dict[str, str]:
    """This process's environment without paysentinel's and Temporal's settings (the Temporal
    CLI's cache stays, so a started system finds the CLI it found before)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYSENTINEL_", "TEMPORAL_"))}
    if "PAYSENTINEL_CACHE_DIR" in os.environ:
        env["PAYSENTINEL_CACHE_DIR"] = os.environ["PAYSENTINEL_CACHE_DIR"]
    return env


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; elsewhere none are found)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class System:
    """``paysentinel up`` (and a provider's fake) started for the demo."""

    provider: str
    workdir: Path
    ports: dict[str, int]
    env: dict[str, str]
    fake_url: str = ""
    fake_env: dict[str, str] = field(default_factory=dict)
    fake_root: Optional[Path] = None
    up: Optional[subprocess.Popen] = None
    fake: Optional[subprocess.Popen] = None
    helpers: list[tuple[int, str]] = field(default_factory=list)  # up's children: (pid, command line)
    merchant_key: str = ""

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        return self.workdir / "paysentinel.log"

    def url(self, part: str) -> str:
        return f"http://127.0.0.1:{self.ports[part]}"

    @property
    def api_url(self) -> str:
        return self.url("api")

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.data_dir / 'paysentinel.db'}"

    @classmethod
    def prepare(cls, provider: str) -> "System":
        fake = load_fake(provider) if provider != "simulator" else None
        from paysentinel.devserver import free_port

        workdir = Path(tempfile.mkdtemp(prefix=f"paysentinel-demo-{provider}-"))
        ports = {name: free_port() for name in PORTS}
        env = {
            **_clean_environment(),
            **DEMO_TIMINGS,
            **{f"PAYSENTINEL_{name.upper()}_PORT": str(port) for name, port in ports.items()},
            "PAYSENTINEL_DATA_DIR": str(workdir / "data"),
        }
        system = cls(provider, workdir, ports, env)
        if fake is not None:
            port = free_port()
            setup = fake.prepare(workdir / "fake", port, f"{system.url('webhook')}/webhooks/{provider}")
            env.update(setup.app_env)
            env["PAYSENTINEL_PROVIDERS"] = f"simulator,{provider}"
            system.fake_url = f"http://127.0.0.1:{port}"
            system.fake_root = _fake_root(fake)
            python_path = os.pathsep.join(filter(None, [str(system.fake_root), os.environ.get("PYTHONPATH", "")]))
            system.fake_env = {**_clean_environment(), **setup.fake_env, "PYTHONPATH": python_path}
        return system

    def start(self, console: Console, timeout: float = 120) -> None:
        with open(self.log_file, "ab") as log:
            if self.fake_url:
                self.fake = subprocess.Popen(
                    [sys.executable, "-m", f"tests.fakes.{self.provider}"],
                    env=self.fake_env,
                    cwd=self.fake_root,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self.up = subprocess.Popen(
                [sys.executable, "-m", "paysentinel.cli", "up"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        urls = [self.url(p) for p in ("api", "operator", "webhook", "simulator")] + ([self.fake_url] if self.fake_url else [])
        started = time.monotonic()
        with console.status(
            f"starting paysentinel up{' and the ' + self.provider + ' fake' if self.fake_url else ''} ({self.workdir})"
        ):
            pending = list(urls)
            while pending:
                for name, process in (("paysentinel up", self.up), (f"the {self.provider} fake", self.fake)):
                    if process is not None and process.poll() is not None:
                        raise DemoUnavailable(f"{name} exited with {process.returncode}:\n{self.log_tail()}")
                if time.monotonic() - started > timeout:
                    raise DemoUnavailable(f"{pending} not healthy after {timeout:g}s:\n{self.log_tail()}")
                try:
                    if httpx.get(pending[0] + "/health", timeout=2).status_code == 200:
                        pending.pop(0)
                        continue
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
        assert self.up is not None
        # The Temporal dev server (its own session): remembered so it is stopped even if up is not.
        self.helpers = [(pid, self._cmdline(pid)) for pid in _children(self.up.pid)]
        key_file = self.data_dir / "merchant-key"
        self.merchant_key = key_file.read_text().strip() if key_file.exists() else ""
        if not self.merchant_key:
            raise DemoUnavailable(f"paysentinel up wrote no merchant key to {key_file}")
        console.print(
            f"[dim]{self.provider}: paysentinel up (pid {self.up.pid})"
            + (f", the fake (pid {self.fake.pid}) at {self.fake_url}" if self.fake else "")
            + f", ready in {time.monotonic() - started:.1f}s; logs: {self.log_file}[/dim]",
            soft_wrap=True,
        )

    @staticmethod
    def _cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> list[str]:
        """Stop what was started, by pid: up (which stops its dev server), then anything of up's
        still running, then the fake. Returns what had to be stopped by force."""
        forced = []
        if self.up is not None:
            if self.up.poll() is None:
                self.up.send_signal(signal.SIGTERM)
                try:
                    self.up.wait(45)
                except subprocess.TimeoutExpired:
                    self.up.kill()
                    self.up.wait()
                    forced.append(f"paysentinel up (pid {self.up.pid})")
        for pid, cmdline in self.helpers:
            if _alive(pid) and self._cmdline(pid) == cmdline:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _alive(pid) and self._cmdline(pid) == cmdline and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _alive(pid) and self._cmdline(pid) == cmdline:
                    os.kill(pid, signal.SIGKILL)
                forced.append(f"{cmdline.split(' ')[0]} (pid {pid})")
        if self.fake is not None:
            _stop(self.fake)
        return forced

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"


# --- Scenarios -----------------------------------------------------------------------------------

Check = Callable[["ProviderScenario"], Optional[str]]


@dataclass
class ProviderScenario:
    name: str
    story: str
    expected: str  # our status at the end
    captured: int  # the provider's ledger at the end (minor units)
    refunded: int
    script: Optional[dict] = None  # PUT /control/scripts/<order> before the checkout
    pay: Optional[dict] = None  # POST /control/pay/<order> once the trade exists (the payer pays)
    refunds: list[tuple[str, int]] = field(default_factory=list)  # (Idempotency-Key, amount) once SUCCEEDED
    expires_in_seconds: float = 60
    check: Optional[Check] = None  # a further promise: None when kept, else what differs
    order_id: str = ""
    actual: str = "…"
    actual_review: Optional[str] = None
    ledger: Optional[dict] = None
    row: Optional[tuple[int, int]] = None  # ours: (paid, refunded)
    view: dict = field(default_factory=dict)
    refund_ids: list[str] = field(default_factory=list)
    problem: str = ""
    seconds: float = 0.0
    error: str = ""

    @property
    def provider_net(self) -> Optional[int]:
        return None if self.ledger is None else self.ledger["net_minor"]

    @property
    def our_net(self) -> Optional[int]:
        return None if self.row is None else self.row[0] - self.row[1]

    @property
    def books_agree(self) -> bool:
        return self.ledger is not None and self.row is not None and self.provider_net == self.our_net

    @property
    def ok(self) -> bool:
        return (
            self.actual == self.expected
            and self.books_agree
            and self.ledger is not None
            and (self.ledger["captured_minor"], self.ledger["refunded_minor"]) == (self.captured, self.refunded)
            and not self.problem
            and not self.error
        )


def _paid_detail(s: ProviderScenario) -> str:
    return " ".join(e.get("detail") or "" for e in s.view.get("timeline", []) if e.get("event") == "paid")


def _confirmed_by(how: str) -> Check:
    def check(s: ProviderScenario) -> Optional[str]:
        detail = _paid_detail(s)
        return None if f"confirmed by {how}" in detail else f"paid event says {detail or 'nothing'!r}"

    return check


def _never_closed(s: ProviderScenario) -> Optional[str]:
    return "closed as unpaid" if any(e.get("event") == "closed" for e in s.view.get("timeline", [])) else None


def _one_refund(submissions: Optional[int] = None) -> Check:
    def check(s: ProviderScenario) -> Optional[str]:
        if len(set(s.refund_ids)) != 1:
            return f"refund ids {s.refund_ids}"
        made = (s.ledger or {}).get("refunds", [])
        if len(made) != 1:
            return f"{len(made)} refunds at the provider"
        if submissions is not None and made[0].get("submissions") != submissions:
            return f"submitted {made[0].get('submissions')} time(s), expected {submissions}"
        return None

    return check


def _both(*checks: Check) -> Check:
    def check(s: ProviderScenario) -> Optional[str]:
        return next((p for p in (c(s) for c in checks) if p), None)

    return check


def provider_scenarios(provider: str) -> list[ProviderScenario]:
    """The scenarios ``provider``'s fake supports (its own script keys: tests/fakes/<provider>.py)."""
    paid: dict[str, Any] | None
    lost: dict[str, Any]
    never: dict[str, Any] | None
    pay: dict[str, Any] | None
    at_close: dict[str, Any]
    retried: dict[str, Any]
    if provider == "alipay":
        paid, lost, never = None, {"notify": "drop"}, None
        pay = {}  # the buyer scans and pays through the fake's control route
        at_close = {"notify": "drop", "pay_on_close": True}
        retried = {
            "failures": [
                {"method": "alipay.trade.refund", "code": "40004", "sub_code": "ACQ.SYSTEM_ERROR", "times": 1, "after": True}
            ]
        }
    elif provider == "wechatpay":
        paid, lost, never = {"pay": "immediately"}, {"pay": "immediately", "notify": "drop"}, {"pay": "never"}
        pay = None
        at_close = {"pay": "never", "pay_while_closing": True, "notify": "drop"}
        retried = {"pay": "immediately", "errors": {"refund": {"code": "SYSTEM_ERROR", "times": 1, "after": True}}}
    elif provider == "stripe":
        paid, never = {"pay": "immediately"}, None
        lost = {"pay": "immediately", "lose_events": ["payment_intent.succeeded"]}
        pay = None
        at_close = {"pay_on_cancel": True, "lose_events": ["payment_intent.succeeded"]}
        retried = {"pay": "immediately", "refund_error_after_create": 1}
    else:
        raise ValueError(f"no fake for {provider}")
    word = {"alipay": "notification", "wechatpay": "notification", "stripe": "webhook event"}[provider]
    items = [
        ProviderScenario(
            "paid", f"payer pays, the {word} arrives", "SUCCEEDED", AMOUNT_MINOR, 0, paid, pay, check=_confirmed_by("callback")
        ),
        ProviderScenario(
            f"{word} lost",
            f"paid, the {word} never arrives: found by query",
            "SUCCEEDED",
            AMOUNT_MINOR,
            0,
            lost,
            pay,
            check=_confirmed_by("query"),
        ),
        ProviderScenario(
            "never pays", "payer walks away: closed at the time to live", "CLOSED", 0, 0, never, expires_in_seconds=5
        ),
        ProviderScenario(
            "paid at close",
            "payer pays the moment we close: kept as paid",
            "SUCCEEDED",
            AMOUNT_MINOR,
            0,
            at_close,
            expires_in_seconds=5,
            check=_confirmed_by("close"),
        ),
        ProviderScenario(
            "refund twice",
            "paid, 30.00 refunded, the same refund request sent twice: refunds once",
            "PARTIALLY_REFUNDED",
            AMOUNT_MINOR,
            3000,
            paid,
            pay,
            refunds=[("r1", 3000), ("r1", 3000)],
            check=_one_refund(),
        ),
        ProviderScenario(
            "refund answer lost",
            "paid, the refund is made but its answer lost: the retry with the same refund number refunds nothing twice",
            "PARTIALLY_REFUNDED",
            AMOUNT_MINOR,
            3000,
            retried,
            pay,
            refunds=[("r1", 3000)],
            check=_one_refund(2 if provider == "alipay" else None),
        ),
    ]
    if provider == "alipay":
        items[-1].name, items[-1].story = (
            "refund retried",
            "paid, Alipay makes the refund but its answer is lost: resubmitted with the same out_request_no, refunded once",
        )
    if provider == "wechatpay":
        items.append(
            ProviderScenario(
                "USERPAYING at close",
                "payer still entering the password at the time to live: not closed as unpaid, paid a moment later",
                "SUCCEEDED",
                AMOUNT_MINOR,
                0,
                {"pay": "immediately", "userpaying": True, "userpaying_then": "pay", "userpaying_seconds": 9},
                expires_in_seconds=5,
                check=_never_closed,
            )
        )
    if provider == "stripe":
        items.append(
            ProviderScenario(
                "processing at close",
                "the payment is still processing at the time to live: not cancelled, succeeds",
                "SUCCEEDED",
                AMOUNT_MINOR,
                0,
                {"pay": "immediately", "processing_seconds": 9, "processing_outcome": "succeeded"},
                expires_in_seconds=5,
                check=_never_closed,
            )
        )
    return items


# --- Driving them --------------------------------------------------------------------------------


async def _our_row(sessions, order: str) -> Optional[tuple[str, Optional[str], int, int]]:
    from sqlalchemy import select

    from paysentinel import db

    from sqlalchemy.exc import OperationalError

    try:
        async with sessions() as session:
            row = (await session.scalars(select(db.Payment).where(db.Payment.order_id == order))).first()
    except OperationalError:  # SQLite busy while the system writes: read again at the next poll
        return None
    if row is None:
        return None
    return row.status, row.review_reason, row.paid_amount_minor or 0, row.refunded_minor or 0


async def _drive(
    api: httpx.AsyncClient, fake: httpx.AsyncClient, sessions, provider: str, s: ProviderScenario, timeout: float
) -> None:
    internal = f"{MERCHANT}-{s.order_id}"  # the provider knows <merchant>-<order>
    started = time.monotonic()
    try:
        if s.script is not None:
            (await fake.put(f"/control/scripts/{internal}", json=s.script)).raise_for_status()
        response = await api.post(
            "/payments",
            json={
                "order_id": s.order_id,
                "amount_minor": AMOUNT_MINOR,
                "currency": "CNY",
                "provider": provider,
                "subject": f"demo: {s.name}",
                "customer": {"email": f"{s.order_id}@example.com"},
                "expires_in_seconds": s.expires_in_seconds,
            },
        )
        if response.status_code not in (200, 201):
            raise RuntimeError(f"checkout answered {response.status_code}: {response.text[:200]}")
        payment_id = response.json()["payment_id"]
        if s.pay is not None:
            while True:  # the trade exists at the provider once the create went through
                paid = await fake.post(f"/control/pay/{internal}", json=s.pay)
                if paid.status_code == 200:
                    break
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"the payer could not pay: {paid.status_code} {paid.text[:200]}")
                await asyncio.sleep(0.3)
        refunded = not s.refunds
        while time.monotonic() - started < timeout:
            s.view = (await api.get(f"/payments/{payment_id}")).json()
            if not refunded and s.view["status"] == "SUCCEEDED":
                for key, amount in s.refunds:
                    asked = await api.post(
                        f"/payments/{payment_id}/refunds",
                        headers={"Idempotency-Key": key},
                        json={"amount_minor": amount, "reason": "demo refund"},
                    )
                    if asked.status_code not in (200, 201, 202):
                        raise RuntimeError(f"refund {key} answered {asked.status_code}: {asked.text[:200]}")
                    s.refund_ids.append(asked.json()["refund_id"])
                refunded = True
            s.ledger = (await fake.get(f"/control/ledger/{internal}")).json()
            row = await _our_row(sessions, internal)
            if row is not None:
                s.actual, s.actual_review, paid_minor, refunded_minor = row
                s.row = (paid_minor, refunded_minor)
            s.problem = (s.check(s) or "") if s.check is not None and s.actual == s.expected else ""
            if refunded and s.ok:
                break
            await asyncio.sleep(0.5)
    except Exception as err:  # shown in the scenario's row; the other scenarios go on
        s.error = f"{type(err).__name__}: {err}"
    s.seconds = time.monotonic() - started


def _money(minor: Optional[int]) -> str:
    return "-" if minor is None else f"{minor / 100:.2f}"


def _table(provider: str, items: list[ProviderScenario]) -> Table:
    table = Table(title=f"paysentinel demo on the {provider} fake: expected vs actual, {provider}'s books vs ours")
    table.add_column("scenario (order id)", ratio=1, min_width=20)
    table.add_column("expected", no_wrap=True)
    table.add_column("our database", no_wrap=True)
    table.add_column(f"{provider}:\ncaptured\n− refunded", justify="right", no_wrap=True)
    table.add_column("ours:\npaid\n− refunded", justify="right", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for s in items:
        expected = f"{s.expected}\n{_money(s.captured)} − {_money(s.refunded)}"
        actual = s.actual + (f"\n({s.actual_review})" if s.actual_review else "")
        theirs = "-" if s.ledger is None else (f"{_money(s.ledger['captured_minor'])} − {_money(s.ledger['refunded_minor'])}")
        ours = "-" if s.row is None else f"{_money(s.row[0])} − {_money(s.row[1])}"
        mark = "[green]ok[/green]" if s.ok else ("[red]DIFFERS[/red]" if s.seconds else "")
        notes = [s.problem, s.error]
        if s.seconds and not s.books_agree:
            notes.insert(0, "the books differ")
        story = f"[bold]{s.name}[/bold] [dim]({s.order_id})[/dim]\n[dim]{s.story}[/dim]" + "".join(
            f"\n[red]{escape(text)}[/red]" for text in notes if text and s.seconds
        )
        table.add_row(story, expected, actual, theirs, ours, f"{s.seconds:.1f}" if s.seconds else "", mark)
    return table


async def run_fake_demo(system: System, console: Console, timeout: float = 60.0) -> bool:
    """Every scenario of ``system.provider``'s fake, at once; True when all are as expected."""
    from paysentinel import db

    items = provider_scenarios(system.provider)
    run_id = time.strftime("%H%M%S")
    for number, s in enumerate(items, 1):
        s.order_id = f"d{run_id}-{number}"  # short: WeChat Pay takes 32 characters with the merchant's prefix
    engine = db.make_engine(system.database_url)
    try:
        async with (
            httpx.AsyncClient(
                base_url=system.api_url, timeout=30, headers={"Authorization": f"Bearer {system.merchant_key}"}
            ) as api,
            httpx.AsyncClient(base_url=system.fake_url, timeout=10) as fake,
        ):
            sessions = db.make_sessionmaker(engine)
            with Live(_table(system.provider, items), console=console, refresh_per_second=2) as live:
                work = asyncio.gather(*(_drive(api, fake, sessions, system.provider, s, timeout) for s in items))
                while not work.done():
                    live.update(_table(system.provider, items))
                    await asyncio.sleep(0.5)
                await work
                live.update(_table(system.provider, items))
            console.print()
    finally:
        await engine.dispose()
    passed = sum(s.ok for s in items)
    agree = sum(s.books_agree for s in items)
    console.print(
        f"{passed} of {len(items)} scenarios as expected on the {system.provider} fake; "
        f"its ledger agrees with our database for {agree} of {len(items)} orders."
    )
    return passed == len(items)


async def _simulator_demo(system: System, console: Console) -> bool:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from paysentinel.config import DEV_OPERATOR_TOKEN, Settings
    from paysentinel.demo import run_demo

    day = datetime.now(ZoneInfo(Settings.model_fields["settlement_timezone"].default)).date().isoformat()
    return await run_demo(
        system.api_url,
        system.url("simulator"),
        ui_url=None,
        console=console,  # stopped after
        operator_token=DEV_OPERATOR_TOKEN,
        settlement_day=day,
        operator_url=system.url("operator"),
        merchant_key=system.merchant_key,
        merchant=MERCHANT,
    )


def run_on_own_system(provider: str, console: Console) -> bool:
    """Start a system (and the provider's fake) for ``provider``, run its scenarios, stop it all."""
    system = System.prepare(provider)
    ok = False
    started = time.monotonic()
    try:
        system.start(console)
        if provider == "simulator":
            ok = asyncio.run(_simulator_demo(system, console))
        else:
            ok = asyncio.run(run_fake_demo(system, console))
    finally:
        forced = system.stop()
        if forced:
            console.print(f"[yellow]stopped by force: {', '.join(forced)}[/yellow]")
    console.print(f"[dim]{provider}: {time.monotonic() - started:.1f}s in all; every process started for it is stopped[/dim]")
    if ok:
        shutil.rmtree(system.workdir, ignore_errors=True)
    else:
        console.print(f"logs and data kept in {system.workdir}", soft_wrap=True)
    return ok


def run_providers(providers: list[str], console: Console) -> bool:
    """Each provider in turn, on a system of its own; True when every one's scenarios are as expected."""
    results: dict[str, bool] = {}
    for provider in providers:
        console.rule(f"paysentinel demo: {provider}")
        try:
            results[provider] = run_on_own_system(provider, console)
        except DemoUnavailable as err:
            console.print(f"[red]{provider}:[/red] {escape(str(err))}", soft_wrap=True)
            results[provider] = False
            if "repository root" in str(err):
                break
    if len(providers) > 1:
        console.print(
            "providers: "
            + ", ".join(f"{p} {'ok' if ok else 'DIFFERS'}" for p, ok in results.items())
            + (f" (not run: {', '.join(p for p in providers if p not in results)})" if len(results) < len(providers) else "")
        )
    return len(results) == len(providers) and all(results.values())
