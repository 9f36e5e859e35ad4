"""Reading a provider's daily settlement bill (Alipay trade-bill layout).

Lines starting with ``#`` are headers and summaries; the first other record names the
columns; every further record is one paid trade (交易) or one refund (退款, negative
amounts). A record is CSV: a quoted field may hold line breaks (a subject written on two
lines), so the bill is read as the stream it is, not split into lines first. Times are
the provider's local times, converted to UTC here.
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


async def _records(chunks: AsyncIterator[str]) -> AsyncIterator[tuple[int, str]]:
    """(first line number, text) of each CSV record of a bill arriving in pieces of any
    size; a line break inside a quoted field (a subject written on two lines) stays in
    its record, as CSV has it."""
    buffer, record, first, number = "", "", 0, 0
    quotes = 0

    def lines(final: bool):
        nonlocal buffer
        while True:
            end = buffer.find("\n")
            if end < 0:
                if final and buffer:
                    line, buffer = buffer, ""
                    yield line
                return
            line, buffer = buffer[: end + 1], buffer[end + 1 :]
            yield line

    async def pieces():
        async for chunk in chunks:
            yield chunk, False
        yield "", True

    async for chunk, final in pieces():
        buffer += chunk
        for line in lines(final):
            number += 1
            if not record:
                first = number
                if line.lstrip("\ufeff").startswith("#"):  # a header or summary line, whatever it holds
                    yield first, line
                    continue
            record += line
            quotes += line.count('"')
            if quotes % 2 == 0:
                yield first, record
                record, quotes = "", 0
    if record:
        raise BillFormatError(f"line {first}: a quoted field is never closed in {record[:120]!r}")


async def parse_bill(chunks: AsyncIterator[str], tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
    """The bill's rows, read from its text as it streams in (pieces of any size)."""
    columns: list[str] | None = None
    async for number, text in _records(chunks):
        line = text.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        try:
            values = next(csv.reader([line]))
        except csv.Error as err:
            raise BillFormatError(f"line {number}: {err} in {line[:120]!r}") from err
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
                kind=kind,
                trade_no=row["支付宝交易号"],
                order_id=row["商户订单号"],
                refund_no=row["退款批次号/请求号"] if kind == REFUND else "",
                amount_minor=abs(to_minor(row["订单金额（元）"].lstrip("-"), currency)),
                currency=currency,
                at=datetime.strptime(row["完成时间"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=tz).astimezone(timezone.utc),
            )
        except (KeyError, ValueError) as err:
            raise BillFormatError(f"line {number}: {err!r} in {line[:120]!r}") from err
