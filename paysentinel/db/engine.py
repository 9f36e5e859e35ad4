"""Connecting to the application database: engines, sessions, and bringing the schema to the
newest Alembic revision."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def make_engine(url: str, *, pre_ping: bool = True) -> AsyncEngine:
    """The engine for the application database. ``pre_ping``: test each pooled connection with
    a round trip before use (callers that retry on a dropped connection, like activities, can
    skip it). A PostgreSQL server on this machine is reached without TLS unless the URL asks
    for it (``sslmode``/``ssl``): encrypting loopback traffic costs CPU and protects nothing."""
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        return create_async_engine(url, connect_args={"timeout": 30})
    connect_args: dict[str, object] = {}
    parsed = make_url(url)
    if parsed.host in LOOPBACK_HOSTS and not {"ssl", "sslmode"} & set(parsed.query):
        connect_args["ssl"] = False
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=pre_ping, pool_recycle=1800, connect_args=connect_args
    )


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def upgrade(url: str) -> None:
    """Bring the schema to the newest Alembic revision (sync; call before serving)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(config, "head")
