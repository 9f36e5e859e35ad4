"""``paysentinel demo``: one payment per scenario through the running system.

Each scenario scripts the provider simulator for a fresh order, starts the payment
through the checkout API, and waits for the outcome the product promises.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass
class Scenario:
    name: str
    story: str
    expected: str
    script: dict = field(default_factory=dict)
    expires_in_seconds: float = 60
    expected_review: Optional[str] = None
    actual: str = "…"
    actual_review: Optional[str] = None
    seconds: float = 0.0
    order_id: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.actual == self.expected and self.actual_review == self.expected_review


def scenarios() -> list[Scenario]:
    return [
        Scenario("paid", "payer pays at once, callback arrives", "SUCCEEDED", {"pay": "immediately"}),
        Scenario("paid later", "payer pays after 3 s", "SUCCEEDED", {"pay": "after_delay", "pay_delay_seconds": 3}),
        Scenario(
            "callback lost", "paid, callback never sent: found by query", "SUCCEEDED", {"pay": "immediately", "callback": "drop"}
        ),
        Scenario(
            "callback twice",
            "paid, callback delivered twice: one transition",
            "SUCCEEDED",
            {"pay": "immediately", "callback": "duplicate"},
        ),
        Scenario(
            "callback late",
            "paid, callback 25 s late: query settles it first",
            "SUCCEEDED",
            {"pay": "immediately", "callback": "delay", "callback_delay_seconds": 25},
        ),
        Scenario("never pays", "payer walks away: closed at the provider", "CLOSED", {"pay": "never"}, expires_in_seconds=15),
        Scenario(
            "flaky create",
            "provider answers 5xx twice on create, then works",
            "SUCCEEDED",
            {"pay": "immediately", "faults": {"create": {"mode": "error", "times": 2}}},
        ),
        Scenario(
            "provider down",
            "create always 5xx: bounded retries, clear failure",
            "FAILED",
            {"faults": {"create": {"mode": "error", "times": -1}}},
        ),
        Scenario(
            "paid after close",
            "money taken after we closed: refunded",
            "REFUNDED",
            {"pay": "never", "after_close": "pay"},
            expires_in_seconds=15,
        ),
        Scenario(
            "wrong amount",
            "the provider took another amount than the order: a person decides",
            "IN_REVIEW",
            {"pay": "immediately", "paid_amount": "0.01"},
            expected_review="amount_mismatch",
        ),
        Scenario(
            "refund fails",
            "paid after close, the refund keeps failing: a person decides",
            "IN_REVIEW",
            {"pay": "never", "after_close": "pay", "refund": "fail"},
            expires_in_seconds=15,
            expected_review="refund_failed",
        ),
    ]


async def _drive(api: httpx.AsyncClient, sim: httpx.AsyncClient, s: Scenario, run_id: str, timeout: float, merchant: str) -> None:
    s.order_id = f"demo-{run_id}-{s.name.replace(' ', '-')}"
    started = time.monotonic()
    try:
        # The provider knows the internal order number: <merchant>-<order>.
        (await sim.put(f"/control/scripts/{merchant}-{s.order_id}", json=s.script)).raise_for_status()
        response = await api.post(
            "/payments",
            json={
                "order_id": s.order_id,
                "amount_minor": 9990,
                "currency": "CNY",
                "subject": f"demo: {s.name}",
                "customer": {"email": f"{s.order_id}@example.com"},
                "expires_in_seconds": s.expires_in_seconds,
            },
        )
        response.raise_for_status()
        payment_id = response.json()["payment_id"]
        while time.monotonic() - started < timeout:
            view = (await api.get(f"/payments/{payment_id}")).json()
            s.actual, s.actual_review = view["status"], view.get("review_reason")
            if s.ok:
                break
            await asyncio.sleep(0.5)
    except httpx.HTTPError as err:
        s.actual, s.error = "ERROR", str(err) or type(err).__name__
    s.seconds = time.monotonic() - started


def _table(items: list[Scenario]) -> Table:
    table = Table(title="paysentinel demo: expected vs actual")
    table.add_column("scenario", ratio=3)
    table.add_column("order id", no_wrap=True)
    for column in ("expected", "actual"):
        table.add_column(column, ratio=2)
    table.add_column("seconds", justify="right")
    table.add_column("")
    for s in items:
        expected = s.expected + (f" ({s.expected_review})" if s.expected_review else "")
        actual = s.actual + (f" ({s.actual_review})" if s.actual_review else "")
        mark = "[green]ok[/green]" if s.ok else ("[red]DIFFERS[/red]" if s.seconds else "")
        story = f"[bold]{s.name}[/bold]\n[dim]{s.story}[/dim]" + (f"\n[red]{s.error}[/red]" if s.error else "")
        table.add_row(story, s.order_id, expected, actual, f"{s.seconds:.1f}" if s.seconds else "", mark)
    return table


async def _reconcile_today(
    operator_url: str, sim: httpx.AsyncClient, run_id: str, token: str, day: str, console: Console, timeout: float
) -> bool:
    """An order paid at the provider that we never had: only reconciliation finds it, and refunds it."""
    order = f"demo-{run_id}-paid-elsewhere"
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    api = httpx.AsyncClient(base_url=operator_url, timeout=30)  # the operator API: its own listener
    try:
        (await sim.post("/control/orphans", json={"out_trade_no": order, "total_amount": "66.60"})).raise_for_status()
        before = await api.get(f"/operator/reconciliations/{day}", headers=headers)
        passes = before.json()["report"]["passes"] if before.status_code == 200 else 0
        (await api.post(f"/operator/reconciliations/{day}", headers=headers)).raise_for_status()
        with console.status(f"reconciling {day} with the provider's settlement bill"):
            while time.monotonic() - started < timeout:
                view = (await api.get(f"/operator/reconciliations/{day}", headers=headers)).json()
                books = (await sim.get(f"/control/ledger/{order}")).json()
                report = view.get("report") or {}
                finished = report.get("status") in ("DONE", "PROVISIONAL")  # today's run is provisional
                if finished and report["passes"] > passes and books["refunded_minor"] == 6660:
                    break
                await asyncio.sleep(0.5)
    except httpx.HTTPError as err:
        console.print(f"[red]reconciliation could not run: {err}[/red]")
        return False
    finally:
        await api.aclose()
    found = [d for d in view.get("discrepancies", []) if d["order_id"] == order]
    ok = bool(found) and found[0]["kind"] == "unknown_order" and books["refunded_minor"] == 6660
    others = sum(c["count"] for k, c in report.get("classes", {}).items() if k != "day_boundary") - len(found)
    console.print(
        f"reconciliation {day}: {report.get('rows')} bill rows, {report.get('matched')} matched, {others} other "
        f"difference(s); {order}: paid at the provider, unknown to us -> "
        + (
            f"[green]{found[0]['kind']}, {found[0]['resolution']}; refunded 66.60 CNY[/green]"
            if ok
            else "[red]not repaired[/red]"
        )
        + f" ({time.monotonic() - started:.1f}s)"
    )
    return ok


async def run_demo(
    api_url: str,
    simulator_url: str,
    ui_url: Optional[str],
    console: Console,
    timeout: float = 120.0,
    operator_token: str = "",
    settlement_day: str = "",
    operator_url: str = "",
    merchant_key: str = "",
    merchant: str = "demo",
) -> bool:
    items = scenarios()
    run_id = time.strftime("%m%d%H%M%S")
    headers = {"Authorization": f"Bearer {merchant_key}"} if merchant_key else {}
    async with (
        httpx.AsyncClient(base_url=api_url, timeout=30, headers=headers) as api,
        httpx.AsyncClient(base_url=simulator_url, timeout=10) as sim,
    ):
        try:
            (await api.get("/health")).raise_for_status()
            (await sim.get("/health")).raise_for_status()
        except httpx.HTTPError as err:
            console.print(f"[red]the system is not reachable ({err}).[/red] Start it first: paysentinel up")
            return False
        probe = await api.get("/callbacks", params={"limit": 1})
        if probe.status_code in (401, 403):
            console.print(
                f"[red]the checkout API refused the merchant key ({probe.status_code}):[/red] {probe.json().get('error')}",
                soft_wrap=True,
            )
            return False
        with Live(_table(items), console=console, refresh_per_second=2) as live:
            work = asyncio.gather(*(_drive(api, sim, s, run_id, timeout, merchant) for s in items))
            while not work.done():
                live.update(_table(items))
                await asyncio.sleep(0.5)
            await work
            live.update(_table(items))
        console.print()
        reconciled = True
        if operator_token and settlement_day and operator_url:
            reconciled = await _reconcile_today(operator_url, sim, run_id, operator_token, settlement_day, console, timeout)
    passed = sum(s.ok for s in items)
    console.print(
        f"{passed} of {len(items)} scenarios as expected"
        + (
            "; reconciliation found and refunded the unknown payment."
            if reconciled
            else "; [red]reconciliation did not repair the unknown payment[/red]."
        )
    )
    if ui_url:
        query = urllib.parse.quote(f'OrderId STARTS_WITH "{merchant}-demo-{run_id}"')
        console.print(f"See them in the Temporal Web UI: {ui_url}/namespaces/default/workflows?query={query}", soft_wrap=True)
    return passed == len(items) and reconciled
