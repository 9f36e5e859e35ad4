"""What WeChat Pay's answers mean for us: which error codes are transient and which final,
trade and refund states, and its transactions and refunds read as our trades and refunds.
The adapter that makes the calls is paysentinel/providers/wechatpay.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Optional

from paysentinel.models import (
    ProviderRefund,
    RefundStatus,
    Trade,
    TradeStatus,
)
from paysentinel.providers.wechatpay_bill import CHINA


# Error codes (the ``code`` of an error answer). Transient ones are retried by Temporal;
# every other 4xx code is final. Any 5xx or 429 is transient whatever its code.
TRANSIENT_CODES = {
    "SYSTEM_ERROR": "system error, try again later",
    "FREQUENCY_LIMITED": "rate limited",
    "BANK_ERROR": "the bank's system failed",
    "STATEMENT_CREATING": "the bill is being produced",
}
FINAL_CODES = {
    "PARAM_ERROR": "invalid parameters",
    "INVALID_REQUEST": "the request breaks the API's rules (or the trade's state forbids it)",
    "SIGN_ERROR": "our signature was refused",
    "ORDER_CLOSED": "the order is closed",
    "ORDER_NOT_EXIST": "no such order",
    "RESOURCE_NOT_EXISTS": "no such refund",
    "NOT_ENOUGH": "the merchant's balance does not cover the refund",
    "USER_ACCOUNT_ABNORMAL": "the payer's account is abnormal",
    "OUT_TRADE_NO_USED": "the order number was used with other parameters",
    "APPID_MCHID_NOT_MATCH": "appid and mchid do not match",
    "MCH_NOT_EXISTS": "no such merchant",
    "NO_AUTH": "the merchant may not use this API",
    "RULE_LIMIT": "a business rule forbids it",
    "TRADE_ERROR": "the trade failed for a business reason",
    "ACCOUNT_ERROR": "account error",
    "ORDERPAID": "the order is paid",
    "NO_STATEMENT_EXIST": "no bill for that day",
}
# Business codes that a close answers for a trade it cannot (or need not) close: the query
# that follows says what the trade is.
CLOSE_SETTLED_BY_QUERY = {"ORDER_CLOSED", "ORDERPAID", "ORDER_PAID", "TRADE_ERROR", "USER_PAYING", "ORDER_NOT_EXIST"}

TRADE_STATES = {
    "SUCCESS": TradeStatus.TRADE_SUCCESS,
    "REFUND": TradeStatus.TRADE_SUCCESS,  # paid, refunds since
    "NOTPAY": TradeStatus.WAIT_BUYER_PAY,
    "USERPAYING": TradeStatus.PAYING,  # the payer is entering a password: cannot be closed
    "CLOSED": TradeStatus.TRADE_CLOSED,
    "REVOKED": TradeStatus.TRADE_CLOSED,
    "PAYERROR": TradeStatus.TRADE_CLOSED,
}
REFUND_STATES = {
    "PROCESSING": RefundStatus.PROCESSING,
    "SUCCESS": RefundStatus.SUCCEEDED,
    "ABNORMAL": RefundStatus.FAILED,
    "CLOSED": RefundStatus.FAILED,
}
REFUND_FAILURES = {
    "ABNORMAL": "refund abnormal: the payer's account or card cannot take it (needs an abnormal-refund request)",
    "CLOSED": "refund closed by WeChat Pay",
}
ORDER_PATTERN = re.compile(r"^[A-Za-z0-9_\-|*]{6,32}$")
NOTIFY_EVENT_PAID = "TRANSACTION.SUCCESS"


def _parse_time(value: Optional[str]) -> Optional[datetime]:
    return datetime.fromisoformat(value) if value else None


def rfc3339_china(moment: datetime) -> str:
    """WeChat Pay's time format: 2018-06-08T10:34:56+08:00."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(CHINA).replace(microsecond=0).isoformat()


def trade_from(body: Mapping[str, Any], order_id: str) -> Trade:
    """A Trade from a transaction (query answer or decrypted notification)."""
    state = body["trade_state"]
    if state not in TRADE_STATES:
        raise ValueError(f"unknown trade_state {state!r}")
    amount = body.get("amount") or {}
    return Trade(
        order_id=body.get("out_trade_no") or order_id,
        trade_no=body.get("transaction_id") or None,
        status=TRADE_STATES[state],
        amount_minor=amount.get("total"),
        currency=amount.get("currency") or "CNY",
        paid_at=_parse_time(body.get("success_time")) if TRADE_STATES[state].is_paid else None,
    )


def refund_from(body: Mapping[str, Any]) -> ProviderRefund:
    status = body["status"]
    if status not in REFUND_STATES:
        raise ValueError(f"unknown refund status {status!r}")
    return ProviderRefund(
        refund_id=body["out_refund_no"],
        trade_no=body.get("transaction_id") or "",
        amount_minor=int(body["amount"]["refund"]),
        status=REFUND_STATES[status],
        fail_reason=REFUND_FAILURES.get(status),
    )
