"""Operator commands: ``paysentinel review ...``, ``payment show``, ``reconcile ...``,
``audit list`` and ``operator new``.

They talk to the operator API (its own listener, PAYSENTINEL_OPERATOR_URL or
http://<host>:<PAYSENTINEL_OPERATOR_PORT>) with PAYSENTINEL_OPERATOR_TOKEN, so every action
is authenticated, allowed by the operator's role, and audited under the operator's name.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from paysentinel.config import OPERATOR_ROLES, get_settings, token_digest
from paysentinel.models import to_major

review_app = typer.Typer(help="Manual reviews: list, show and decide.", no_args_is_help=True)
payment_app = typer.Typer(help="Look up payments.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit of operator actions.", no_args_is_help=True)
operator_app = typer.Typer(help="Operators and their tokens.", no_args_is_help=True)
console = Console()
if not console.is_terminal:
    console.width = 140

API_OPTION = typer.Option(
    None,
    "--api",
    help="Operator API base URL (default: PAYSENTINEL_OPERATOR_URL, else http://<host>:<PAYSENTINEL_OPERATOR_PORT>)",
)
REASON_OPTION = typer.Option(..., "--reason", "-r", help="Why: recorded with the decision")


def _client(api: Optional[str]) -> httpx.Client:
    settings = get_settings()
    return httpx.Client(
        base_url=api or settings.effective_operator_url,
        headers={"Authorization": f"Bearer {settings.effective_operator_token}"},
        timeout=30,
    )


def _call(api: Optional[str], method: str, path: str, **kwargs) -> Any:
    try:
        with _client(api) as http:
            response = http.request(method, path, **kwargs)
    except httpx.HTTPError as err:
        console.print(f"[red]cannot reach the operator API ({err}).[/red] Is it running? (paysentinel up)")
        raise typer.Exit(2) from err
    if response.status_code >= 400:
        try:
            message = response.json().get("error") or response.json()
        except ValueError:
            message = response.text
        console.print(f"[red]refused ({response.status_code}):[/red] {message}")
        raise typer.Exit(1)
    return response.json()


@review_app.command("list")
def review_list(
    status: str = typer.Option("open", help="open, decided or all"),
    order_id: Optional[str] = typer.Option(None, "--order"),
    api: Optional[str] = API_OPTION,
) -> None:
    """Reviews waiting for a decision (or all of them)."""
    reviews = _call(api, "GET", "/operator/reviews", params={"status": status, **({"order_id": order_id} if order_id else {})})
    table = Table(title=f"reviews ({status})")
    table.add_column("review id (payment-<order>-review-<n>)", no_wrap=True)  # never shortened: operators copy it
    for column in ("reason", "status", "default", "deadline", "decision"):
        table.add_column(column, overflow="fold")
    for r in reviews:
        decision, pending = r["decision"], r.get("pending_decision")
        shown = f"{decision['action']} by {decision['operator']}" if decision else ""
        if pending and not decision:
            shown = f"{pending['action']} by {pending['operator']}, pending a second approval"
        table.add_row(r["review_id"], r["reason"], r["status"], r["default_action"], (r["deadline_at"] or "")[:19], shown)
    console.print(table)


@review_app.command("show")
def review_show(review_id: str, api: Optional[str] = API_OPTION) -> None:
    """One review: reason, evidence, what may be done, and the payment's timeline."""
    r = _call(api, "GET", f"/operator/reviews/{review_id}")
    console.print(f"[bold]{r['review_id']}[/bold]  {r['reason']}  {r['status']}")
    console.print(f"evidence: {r['evidence']}")
    console.print(
        f"possible: {', '.join(r['allowed_actions'])}; at the deadline {(r['deadline_at'] or '')[:19]}: {r['default_action']}"
    )
    if r["decision"]:
        d = r["decision"]
        console.print(f"decided: {d['action']} by {d['operator']}: {d['reason']}")
    elif r.get("pending_decision"):
        pd = r["pending_decision"]
        console.print(
            f"[yellow]pending a second approval by an approver:[/yellow] {pd['action']} by {pd['operator']}: {pd['reason']}"
        )
    _print_payment(_call(api, "GET", f"/operator/payments/{r['payment_id']}"))


def _decide(action: str):
    def command(review_id: str, reason: str = REASON_OPTION, api: Optional[str] = API_OPTION) -> None:
        outcome = _call(api, "POST", f"/operator/reviews/{review_id}/decision", json={"action": action, "reason": reason})
        if outcome.get("status") == "pending":
            console.print(f"[yellow]recorded:[/yellow] {outcome['message']}")
            return
        console.print(f"[green]{outcome['action']}[/green] by {outcome['operator']}: {outcome['reason']}")

    command.__doc__ = {
        "approve": "Let the payment go on as it is (risk holds, an accepted amount).",
        "reject": "Stop the payment; money already taken is refunded.",
        "refund": "Refund what was taken, or retry a failed refund.",
        "mark_paid": "The provider confirmed the payment by other means: mark it paid.",
    }[action]
    return command


for _action in ("approve", "reject", "refund", "mark_paid"):
    review_app.command(_action.replace("_", "-"))(_decide(_action))


@payment_app.command("show")
def payment_show(order_id: str, api: Optional[str] = API_OPTION) -> None:
    """A payment by its order id: status, money, refunds and timeline."""
    _print_payment(_call(api, "GET", f"/operator/payments/payment-{order_id}"))


def _print_payment(p) -> None:
    currency = p["currency"]
    console.print(
        f"[bold]{p['payment_id']}[/bold]  {p['status']}  {to_major(p['amount_minor'], currency)} {currency}  "
        f"taken {to_major(p['captured_minor'], currency)}, refunded {to_major(p['refunded_minor'], currency)}"
        + (f"  review: {p['review_reason']}" if p.get("review_reason") else "")
    )
    if p["refunds"]:
        refunds = Table(title="refunds")
        for column in ("refund id", "trade", "amount", "status", "by", "reason"):
            refunds.add_column(column)
        for r in p["refunds"]:
            refunds.add_row(
                r["refund_id"], r["trade_no"], to_major(r["amount_minor"], currency), r["status"], r["requested_by"], r["reason"]
            )
        console.print(refunds)
    timeline = Table(title="timeline")
    for column in ("at", "event", "detail"):
        timeline.add_column(column)
    for entry in p["timeline"]:
        timeline.add_row(entry["at"][11:23], entry["event"], entry["detail"])
    console.print(timeline)


reconcile_app = typer.Typer(help="Daily reconciliation with the provider's settlement bill.")
DATE_OPTION = typer.Option(..., "--date", "-d", help="The bill's day, YYYY-MM-DD (provider's time zone)")
PROVIDER_OPTION = typer.Option("simulator", "--provider")


@reconcile_app.callback(invoke_without_command=True)
def reconcile_default(
    ctx: typer.Context,
    day: Optional[str] = typer.Option(None, "--date", "-d", help="Reconcile this day now (same as `run --date`)"),
    provider: str = PROVIDER_OPTION,
    api: Optional[str] = API_OPTION,
) -> None:
    """`paysentinel reconcile --date D` reconciles a day; the subcommands below do more."""
    if ctx.invoked_subcommand is not None:
        return
    if day is None:
        console.print(ctx.get_help())
        raise typer.Exit(0)
    reconcile_run(day=day, provider=provider, api=api, wait=True)


@reconcile_app.command("run")
def reconcile_run(
    day: str = DATE_OPTION,
    provider: str = PROVIDER_OPTION,
    api: Optional[str] = API_OPTION,
    wait: bool = typer.Option(True, help="Wait for the report, showing progress"),
) -> None:
    """Reconcile a day now: load the bill, match it, repair what differs, report.
    Running a day again repairs nothing twice."""
    asked = datetime.now(timezone.utc)
    started = _call(api, "POST", f"/operator/reconciliations/{day}", params={"provider": provider})
    console.print(f"started {started['workflow_id']} (follow it in the Temporal Web UI)")
    if not wait:
        return
    with console.status("reconciling") as status:
        while True:
            view = _get_run(api, day, provider)
            report = view["report"] if view else None
            finished = report and report["status"] in ("DONE", "PROVISIONAL")  # PROVISIONAL: a day not yet over
            if finished and report and datetime.fromisoformat(report["finished_at"]) > asked:
                break
            if view:
                status.update(
                    f"reconciling {day}: {view['bill_rows_loaded']} bill rows loaded, "
                    f"{len(view['discrepancies'])} differences found"
                )
            time.sleep(1)
    _print_reconciliation(view)


@reconcile_app.command("show")
def reconcile_show(day: str = DATE_OPTION, provider: str = PROVIDER_OPTION, api: Optional[str] = API_OPTION) -> None:
    """A day's report: counts and amounts per class, each difference and what was done."""
    _print_reconciliation(_call(api, "GET", f"/operator/reconciliations/{day}", params={"provider": provider}))


@reconcile_app.command("list")
def reconcile_list(api: Optional[str] = API_OPTION) -> None:
    """Reconciled days, newest first."""
    table = Table(title="reconciliations")
    for column in ("day", "provider", "status", "rows", "matched", "day boundary", "differences", "unresolved", "passes"):
        table.add_column(column)
    for r in _call(api, "GET", "/operator/reconciliations"):
        differences = sum(c["count"] for k, c in r["classes"].items() if k != "day_boundary")
        table.add_row(
            r["day"],
            r["provider"],
            r["status"],
            str(r["rows"]),
            str(r["matched"]),
            str(r["day_boundary"]),
            str(differences),
            str(r["unresolved"]),
            str(r["passes"]),
        )
    console.print(table)


def _get_run(api: Optional[str], day: str, provider: str):
    with _client(api) as http:
        response = http.get(f"/operator/reconciliations/{day}", params={"provider": provider})
    return response.json() if response.status_code == 200 else None


def _print_reconciliation(view) -> None:
    r = view["report"]
    console.print(
        f"[bold]reconciliation {r['day']} ({r['provider']})[/bold]  {r['status']}  "
        f"{r['rows']} bill rows, {r['matched']} matched ({r['day_boundary']} across the day boundary), "
        f"{r['unresolved']} unresolved; reconciled {r['passes']} time(s)"
    )
    if not r["classes"]:
        console.print("[green]no differences: every bill row matched, and the bill has every payment we recorded[/green]")
        return
    classes = Table(title="differences by class")
    for column in ("class", "count", "amount", "unresolved"):
        classes.add_column(column)
    for kind, c in sorted(r["classes"].items()):
        classes.add_row(kind, str(c["count"]), to_major(c["amount_minor"], "CNY"), str(c["unresolved"]))
    console.print(classes)
    if view["discrepancies"]:
        items = Table(title="each difference")
        for column in ("class", "order", "provider", "ours", "detail", "resolution"):
            items.add_column(column, overflow="fold")
        for d in view["discrepancies"]:

            def money(v, currency=d["currency"]):
                return "" if v is None else to_major(v, currency)

            items.add_row(
                d["kind"],
                d["order_id"],
                money(d["provider_amount_minor"]),
                money(d["our_amount_minor"]),
                d["detail"],
                ("" if d["resolved"] else "[red]open[/red] ") + (d["resolution"] or "pending"),
            )
        console.print(items)


# --- Audit and operators -------------------------------------------------------------------


def _since(value: str) -> str:
    """ "2h", "30m", "7d" (ago) or an ISO date/time -> an ISO timestamp in UTC."""
    match = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat()
    try:
        at = datetime.fromisoformat(value)
    except ValueError as err:
        raise typer.BadParameter(f"{value!r}: give a time ago (30m, 2h, 7d) or a date/time (2026-11-23T08:00)") from err
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).isoformat()


@audit_app.command("list")
def audit_list(
    operator: Optional[str] = typer.Option(None, "--operator", help="Only this operator's actions"),
    since: Optional[str] = typer.Option(None, "--since", help="From this time on: 30m, 2h, 7d, or 2026-11-23T08:00"),
    limit: int = typer.Option(200, "--limit"),
    api: Optional[str] = API_OPTION,
) -> None:
    """Operator actions, newest first: who (and as which role), when, from where, what, why, result."""
    params: dict[str, object] = {"limit": limit}
    if operator:
        params["operator"] = operator
    if since:
        params["since"] = _since(since)
    rows = _call(api, "GET", "/operator/audit", params=params)
    table = Table(title="audit (newest first)")
    for column in ("at (UTC)", "operator", "role", "address", "action", "target", "result"):
        table.add_column(column, no_wrap=True)  # never shortened: operators copy them
    for column in ("reason", "detail"):
        table.add_column(column, overflow="fold", ratio=1)
    colour = {"done": "green", "pending": "yellow", "refused": "red"}
    for r in rows:
        table.add_row(
            r["at"][:19],
            r["operator"],
            r["role"],
            r["address"],
            r["action"],
            r["target"],
            f"[{colour[r['result']]}]{r['result']}[/{colour[r['result']]}]",
            r["reason"],
            r["detail"],
        )
    console.print(table)


@operator_app.command("new")
def operator_new(
    name: str = typer.Argument(..., help="The operator's name (letters, digits, _ . @ -; up to 32)"),
    role: str = typer.Option(..., "--role", help="viewer, operator or approver"),
) -> None:
    """Make a token for an operator: prints the token once (give it to the operator) and the
    entry to add to PAYSENTINEL_OPERATOR_TOKENS (only the token's SHA-256 is configured)."""
    if role not in OPERATOR_ROLES:
        raise typer.BadParameter(f"unknown role {role!r}; choose from {', '.join(OPERATOR_ROLES)}")
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,32}", name):
        raise typer.BadParameter("names are 1-32 letters, digits, '_', '.', '@' or '-'")
    token = secrets.token_urlsafe(32)
    console.print(f"token for {name} (shown once; the operator sets PAYSENTINEL_OPERATOR_TOKEN to it):")
    print(token)
    console.print("add this entry to PAYSENTINEL_OPERATOR_TOKENS (comma-separated) and restart the operator API:")
    print(f"{name}:{role}:{token_digest(token)}")
