"""Reading a provider's daily settlement bill (Alipay trade-bill layout).

Lines starting with ``#`` are headers and summaries; the first other line names the
columns; every further line is one paid trade (交易) or one refund (退款, negative
amounts). Times are the provider's local times, converted to UTC here.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from paysentinel.models import to_minor

PAYMENT, REFUND = "payment", "refund"
KINDS = {"交易": PAYMENT, "退款": REFUND}
REQUIRED = ["支付宝交易号", "商户订单号", "业务类型", "完成时间", "币种", "订单金额（元）", "退款批次号/请求号"]


class BillFormatError(ValueError):
    """A bill line that cannot be read; says which line and why."""


class SettlementRow(BaseModel):
    kind: str  # payment, refund
    trade_no: str
    order_id: str
    refund_no: str = ""  # the refund's out_request_no (refund rows)
    amount_minor: int  # positive for both kinds
    currency: str
    at: datetime  # paid (payment) or refunded (refund), UTC


async def parse_bill(lines: AsyncIterator[str], tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
    columns: list[str] | None = None
    number = 0
    async for raw in lines:
        number += 1
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        values = next(csv.reader([line]))
        if columns is None:
            missing = [c for c in REQUIRED if c not in values]
            if missing:
                raise BillFormatError(f"line {number}: the column row lacks {', '.join(missing)}")
            columns = values
            continue
        row = dict(zip(columns, values))
        try:
            kind = KINDS[row["业务类型"]]
            currency = row["币种"] or "CNY"
            yield SettlementRow(
                kind=kind, trade_no=row["支付宝交易号"], order_id=row["商户订单号"],
                refund_no=row["退款批次号/请求号"] if kind == REFUND else "",
                amount_minor=abs(to_minor(row["订单金额（元）"].lstrip("-"), currency)), currency=currency,
                at=datetime.strptime(row["完成时间"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=tz).astimezone(timezone.utc),
            )
        except (KeyError, ValueError) as err:
            raise BillFormatError(f"line {number}: {err!r} in {line[:120]!r}") from err
