"""Side effects of a payment: the provider's HTTP API and the application database.

Each activity is small and idempotent, so Temporal may retry it safely:
- provider calls carry an idempotency key derived from the workflow id and purpose;
- database writes are upserts or "newer snapshot wins" updates.
Provider rejections become non-retryable ``ApplicationError``s; transient failures
are raised as-is and retried with the bounded policy the workflow sets.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from paysentinel import db
from paysentinel.models import CreateTradeInput, PaymentRecord, RecordPaymentInput, Trade, TradeRef
from paysentinel.providers import Provider, ProviderRejected

PROVIDER_REJECTED = "ProviderRejected"
ORDER_CONFLICT = "OrderConflict"


class PaymentActivities:
    def __init__(self, providers: dict[str, Provider], sessions: async_sessionmaker[AsyncSession]):
        self._providers = providers
        self._sessions = sessions

    def _provider(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise ApplicationError(f"unknown provider {name!r}", type=PROVIDER_REJECTED, non_retryable=True) from None

    @activity.defn
    async def record_payment(self, payload: RecordPaymentInput) -> None:
        """Make sure the payment row exists (the checkout API usually wrote it first)."""
        try:
            await db.claim_order(self._sessions, payload.payment_id, payload.request, payload.expires_at)
        except db.OrderConflict as err:
            raise ApplicationError(str(err), type=ORDER_CONFLICT, non_retryable=True) from err

    @activity.defn
    async def save_payment_state(self, record: PaymentRecord) -> bool:
        """Write the workflow's newest snapshot; an older snapshot never overwrites a newer one."""
        applied = await db.apply_record(self._sessions, record)
        activity.logger.info(
            "payment %s -> %s (seq %s, %s)", record.payment_id, record.status.value, record.seq,
            "applied" if applied else "already newer",
        )
        return applied

    @activity.defn
    async def create_trade(self, payload: CreateTradeInput) -> Trade:
        provider = self._provider(payload.provider)
        try:
            return await provider.create_trade(payload)
        except ProviderRejected as err:
            raise ApplicationError(str(err), err.code, type=PROVIDER_REJECTED, non_retryable=True) from err

    @activity.defn
    async def query_trade(self, ref: TradeRef) -> Trade:
        provider = self._provider(ref.provider)
        try:
            return await provider.query_trade(ref.order_id)
        except ProviderRejected as err:
            raise ApplicationError(str(err), err.code, type=PROVIDER_REJECTED, non_retryable=True) from err

    @activity.defn
    async def close_trade(self, ref: TradeRef) -> Trade:
        provider = self._provider(ref.provider)
        try:
            return await provider.close_trade(ref.order_id, ref.idempotency_key)
        except ProviderRejected as err:
            raise ApplicationError(str(err), err.code, type=PROVIDER_REJECTED, non_retryable=True) from err
