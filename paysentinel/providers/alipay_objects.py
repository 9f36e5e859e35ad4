"""What Alipay's answers mean for us: which gateway codes are transient and which final,
trade statuses, and a gateway error. The adapter that makes the calls is
paysentinel/providers/alipay.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from paysentinel.models import (
    TradeStatus,
    to_minor,
)

CURRENCY = "CNY"
SUCCESS = "10000"


# --- Which answers are transient (retry) and which are final (never retried) -----------
# Gateway codes: 10000 success; 20000 service unavailable (transient); 20001 insufficient
# token permissions, 40001 missing parameter, 40002 invalid parameter, 40004 business
# failure, 40006 insufficient permissions (final).
TRANSIENT_CODES = {"20000"}
# Sub-codes that mean "system busy, try again" whatever the code: Alipay's own advice for
# them is to retry the same request (a refund with the same out_request_no).
TRANSIENT_SUB_CODES = {
    "ACQ.SYSTEM_ERROR",
    "aop.ACQ.SYSTEM_ERROR",
    "ACQ.SYSTEM_BUSY",
    "isp.unknow-error",
    "aop.unknow-error",
    "isp.rop.service.unavailable",
    "isp.bill_not_exist",
}
TRANSIENT_SUB_CODE_PREFIXES = ("isp.",)  # Alipay's internal service errors
# Final business answers (40004), named here so the table reads as documentation; any other
# code that is not transient is final too.
FINAL_SUB_CODES = {
    "ACQ.TRADE_HAS_SUCCESS": "the trade is already paid",
    "ACQ.TRADE_HAS_CLOSE": "the trade is closed",
    "ACQ.TRADE_NOT_EXIST": "no such trade (query and close treat it as 'no trade')",
    "ACQ.TRADE_STATUS_ERROR": "the trade's status does not allow it (close: the trade is paid)",
    "ACQ.INVALID_PARAMETER": "invalid parameters",
    "ACQ.CONTEXT_INCONSISTENT": "the same out_trade_no with other details",
    "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL": "the refund exceeds what is left of the trade",
    "ACQ.SELLER_BALANCE_NOT_ENOUGH": "the merchant's balance cannot cover the refund",
    "ACQ.REASON_TRADE_REFUND_FEE_ERR": "invalid refund amount",
    "ACQ.TRADE_NOT_ALLOW_REFUND": "the trade cannot be refunded any more",
    "ACQ.REFUND_CHARGE_ERROR": "the refund's fee cannot be charged",
    "isv.invalid-signature": "our request's signature did not verify (wrong key)",
    "isv.invalid-app-id": "unknown app_id",
}


def classify(code: str, sub_code: str = "") -> str:
    """``"ok"``, ``"transient"`` or ``"final"`` for a gateway answer's code and sub_code."""
    if code == SUCCESS:
        return "ok"
    if code in TRANSIENT_CODES or sub_code in TRANSIENT_SUB_CODES:
        return "transient"
    if sub_code.lower().startswith(TRANSIENT_SUB_CODE_PREFIXES):
        return "transient"
    return "final"


TRADE_STATUSES = {
    "WAIT_BUYER_PAY": TradeStatus.WAIT_BUYER_PAY,
    "TRADE_SUCCESS": TradeStatus.TRADE_SUCCESS,
    "TRADE_FINISHED": TradeStatus.TRADE_FINISHED,
    "TRADE_CLOSED": TradeStatus.TRADE_CLOSED,
}


class GatewayError(Exception):
    """A verified non-success answer; ``final`` unless the code is transient."""

    def __init__(self, method: str, body: Mapping[str, Any]):
        self.code = str(body.get("code", ""))
        self.sub_code = str(body.get("sub_code") or "")
        self.message = str(body.get("sub_msg") or body.get("msg") or "")
        self.body = dict(body)
        super().__init__(f"{method}: {self.code} {self.sub_code} {self.message}".strip())


def amount_of(value: Any) -> int:
    return to_minor(str(value), CURRENCY)
