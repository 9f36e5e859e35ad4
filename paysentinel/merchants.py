"""Merchants and their API keys (the checkout API's credentials).

A key is ``psk_<key id>_<secret>``: shown once when it is made, stored only as the SHA-256 of
its secret, compared in constant time. Scopes: ``payments`` (POST /payments), ``refunds``
(POST /payments/{id}/refunds), ``read`` (GET /payments/{id}, GET /callbacks).

A merchant's order ``1001`` is the internal order number ``<merchant>-1001`` everywhere past
the checkout API (workflow, provider, webhooks, reconciliation, operators): merchant ids are
``[a-z0-9]{1,16}``, without ``-``, so the prefix is unambiguous.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from paysentinel.db import ApiKey, Merchant, utcnow

API_SCOPES = ("payments", "refunds", "read")
MERCHANT_ID_PATTERN = r"^[a-z0-9]{1,16}$"
KEY_PREFIX = "psk_"
INTERNAL_ORDER_MAX = 64  # what the payments table and the providers' order numbers hold
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


class MerchantError(ValueError):
    """A merchant or key command that cannot be done, with what to do instead."""


def internal_order(merchant_id: str, order_id: str) -> str:
    """The order number past the checkout API: ``<merchant>-<order>``."""
    return f"{merchant_id}-{order_id}"


def merchant_order(merchant_id: str, internal: str) -> str:
    """The merchant's own order id of an internal order number."""
    return internal.removeprefix(f"{merchant_id}-")


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(raw: str) -> Optional[tuple[str, str]]:
    """(key id, secret) of a ``psk_<key id>_<secret>`` key, or None."""
    if not raw.startswith(KEY_PREFIX):
        return None
    key_id, _, secret = raw[len(KEY_PREFIX) :].partition("_")
    if not key_id or not secret:
        return None
    return key_id, secret


@dataclass(frozen=True)
class Caller:
    """The merchant a valid key belongs to, and the key's scopes."""

    merchant_id: str
    key_id: str
    scopes: tuple[str, ...]


async def authenticate(sessions: async_sessionmaker[AsyncSession], raw: str) -> Optional[Caller]:
    """The caller of a full key, or None when it is malformed, unknown or revoked."""
    parsed = parse_key(raw)
    key_id, secret = parsed if parsed else ("", raw)
    row = None
    if parsed and len(key_id) <= 32:
        async with sessions() as session:
            row = await session.get(ApiKey, key_id)
    stored = row.secret_sha256 if row is not None else _DUMMY_DIGEST
    matches = hmac.compare_digest(secret_digest(secret).encode(), stored.encode())  # constant time
    if row is None or not matches or row.revoked_at is not None:
        return None
    return Caller(row.merchant_id, row.key_id, tuple(row.scope_list))


async def create_merchant(sessions: async_sessionmaker[AsyncSession], merchant_id: str, name: str) -> Merchant:
    if not re.fullmatch(MERCHANT_ID_PATTERN, merchant_id):
        raise MerchantError(f"merchant id {merchant_id!r} must be 1 to 16 lower-case letters or digits (no '-')")
    async with sessions() as session:
        row = Merchant(merchant_id=merchant_id, name=name, created_at=utcnow())
        session.add(row)
        try:
            await session.commit()
        except IntegrityError as err:
            raise MerchantError(f"merchant {merchant_id} exists already (paysentinel merchant list)") from err
        return row


async def get_merchant(sessions: async_sessionmaker[AsyncSession], merchant_id: str) -> Optional[Merchant]:
    async with sessions() as session:
        return await session.get(Merchant, merchant_id)


async def list_merchants(sessions: async_sessionmaker[AsyncSession]) -> list[Merchant]:
    async with sessions() as session:
        return list((await session.scalars(select(Merchant).order_by(Merchant.merchant_id))).all())


async def create_key(sessions: async_sessionmaker[AsyncSession], merchant_id: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """A new key for the merchant: (its row, the full key, which is never stored)."""
    unknown = sorted(set(scopes) - set(API_SCOPES))
    if unknown or not scopes:
        raise MerchantError(f"scopes must be among {', '.join(API_SCOPES)} (got {', '.join(scopes) or 'none'})")
    if await get_merchant(sessions, merchant_id) is None:
        raise MerchantError(
            f"no merchant {merchant_id!r}; create it with `paysentinel merchant create {merchant_id} --name NAME`"
        )
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = ApiKey(
        key_id=key_id,
        merchant_id=merchant_id,
        secret_sha256=secret_digest(secret),
        scopes=",".join(s for s in API_SCOPES if s in scopes),
        created_at=utcnow(),
    )
    async with sessions() as session:
        session.add(row)
        await session.commit()
    return row, f"{KEY_PREFIX}{key_id}_{secret}"


async def revoke_key(sessions: async_sessionmaker[AsyncSession], key_id: str) -> ApiKey:
    async with sessions() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise MerchantError(f"no key {key_id!r} (paysentinel key list --merchant M)")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            await session.commit()
        return row


async def list_keys(sessions: async_sessionmaker[AsyncSession], merchant_id: Optional[str] = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.merchant_id, ApiKey.created_at)
    if merchant_id:
        query = query.where(ApiKey.merchant_id == merchant_id)
    async with sessions() as session:
        return list((await session.scalars(query)).all())


def when(value: Optional[datetime]) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""
