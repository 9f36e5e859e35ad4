"""Merchant commands: ``paysentinel merchant create|list`` and ``paysentinel key create|revoke|list``.

They talk to the application database (PAYSENTINEL_DATABASE_URL, else the data dir's SQLite
file), like ``paysentinel db upgrade``; run that first on a new database.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from paysentinel.config import get_settings

# paysentinel.merchants (and the database code) is imported by the commands only, so every
# other `paysentinel` command starts as fast as before.
SCOPES = "payments, refunds, read"  # paysentinel.merchants.API_SCOPES

merchant_app = typer.Typer(help="Merchants: who may use the checkout API.", no_args_is_help=True)
key_app = typer.Typer(help="Merchants' API keys for the checkout API.", no_args_is_help=True)
console = Console()
if not console.is_terminal:
    console.width = 140


def _run(work):
    """Run ``work(sessions)`` against the configured database; a MerchantError is a refusal."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from paysentinel import db
    from paysentinel.merchants import MerchantError

    settings = get_settings()

    async def main():
        engine = db.make_engine(settings.effective_database_url)
        try:
            return await work(db.make_sessionmaker(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except MerchantError as err:
        console.print("[red]refused:[/red]", escape(str(err)), soft_wrap=True)
        raise typer.Exit(1) from err
    except (OperationalError, ProgrammingError) as err:
        console.print(
            f"[red]the database at {escape(settings.effective_database_url)} is not ready[/red] "
            f"({escape(str(err.orig))}); run `paysentinel db upgrade`",
            soft_wrap=True,
        )
        raise typer.Exit(1) from err


@merchant_app.command("create")
def merchant_create(
    merchant_id: str = typer.Argument(..., metavar="ID", help="1 to 16 lower-case letters or digits"),
    name: str = typer.Option(..., "--name", help="The merchant's name"),
) -> None:
    """Add a merchant; then give it a key with `paysentinel key create --merchant ID`."""
    from paysentinel.merchants import create_merchant

    _run(lambda sessions: create_merchant(sessions, merchant_id, name))
    console.print(
        f"merchant {merchant_id} created; give it a key: "
        f"paysentinel key create --merchant {merchant_id} --scope payments --scope refunds --scope read",
        soft_wrap=True,
    )


@merchant_app.command("list")
def merchant_list() -> None:
    """Every merchant."""
    from paysentinel.merchants import list_merchants, when

    rows = _run(list_merchants)
    table = Table(title=f"{len(rows)} merchant(s)")
    for column in ("merchant", "name", "created"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.merchant_id, escape(row.name), when(row.created_at))
    console.print(table)


@key_app.command("create")
def key_create(
    merchant: str = typer.Option(..., "--merchant", help="The merchant the key belongs to"),
    scope: list[str] = typer.Option(..., "--scope", help=f"Repeat for each: {SCOPES}"),
) -> None:
    """Make an API key; the full key is printed once and stored only as a hash."""
    from paysentinel.merchants import create_key

    row, key = _run(lambda sessions: create_key(sessions, merchant, scope))
    console.print(f"key {row.key_id} for merchant {row.merchant_id}, scopes {row.scopes} (shown once; only its hash is stored):")
    print(key)


@key_app.command("revoke")
def key_revoke(key_id: str = typer.Argument(..., metavar="KEYID")) -> None:
    """Revoke a key: the checkout API refuses it from now on (401)."""
    from paysentinel.merchants import revoke_key, when

    row = _run(lambda sessions: revoke_key(sessions, key_id))
    console.print(f"key {row.key_id} of merchant {row.merchant_id} revoked at {when(row.revoked_at)}")


@key_app.command("list")
def key_list(merchant: Optional[str] = typer.Option(None, "--merchant", help="Only this merchant's keys")) -> None:
    """Keys (never their secrets): id, merchant, scopes, created, revoked."""
    from paysentinel.merchants import list_keys, when

    rows = _run(lambda sessions: list_keys(sessions, merchant))
    table = Table(title=f"{len(rows)} key(s)")
    for column in ("key id", "merchant", "scopes", "created", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.key_id, row.merchant_id, row.scopes, when(row.created_at), when(row.revoked_at) or "-")
    console.print(table)
