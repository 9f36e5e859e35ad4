"""Driving the demo: one payment per scenario against the system, our database compared
with the provider's ledger, a live table of the results."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Optional

import httpx
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from paysentinel.demo_providers.scenarios import ProviderScenario, provider_scenarios
from paysentinel.demo_providers.system import AMOUNT_MINOR, MERCHANT, DemoUnavailable, System


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
