"""WeChat Pay's trade bill (``GET /v3/bill/tradebill``, bill_type ALL), read as common rows.

The bill is CSV: a column row, one row per payment (交易状态 SUCCESS) or refund (REFUND;
also REVOKED for revoked payments, which moved no money), every value prefixed with a
backtick so spreadsheets keep long numbers as text, then a summary column row
(总交易单数, ...) and one summary row. Amounts are yuan; times China time.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from paysentinel.models import to_minor
from paysentinel.settlement import PAYMENT, REFUND, BillFormatError, SettlementRow

CHINA = ZoneInfo("Asia/Shanghai")

COLUMNS = [
    "交易时间",
    "公众账号ID",
    "商户号",
    "特约商户号",
    "设备号",
    "微信订单号",
    "商户订单号",
    "用户标识",
    "交易类型",
    "交易状态",
    "付款银行",
    "货币种类",
    "应结订单金额",
    "代金券金额",
    "微信退款单号",
    "商户退款单号",
    "退款金额",
    "充值券退款金额",
    "退款类型",
    "退款状态",
    "商品名称",
    "商户数据包",
    "手续费",
    "费率",
    "订单金额",
    "申请退款金额",
    "费率备注",
]
SUMMARY_COLUMNS = [
    "总交易单数",
    "应结订单总金额",
    "退款总金额",
    "充值券退款总金额",
    "手续费总金额",
    "订单总金额",
    "申请退款总金额",
]
REQUIRED = ["交易时间", "微信订单号", "商户订单号", "交易状态", "货币种类", "商户退款单号", "退款金额", "订单金额"]
KINDS = {"SUCCESS": PAYMENT, "REFUND": REFUND}
SKIPPED_STATES = {"REVOKED"}  # listed, but no money moved


def _value(text: str) -> str:
    return text.strip().removeprefix("`").strip()


def _yuan(text: str, line: int, column: str) -> Decimal:
    try:
        amount = Decimal(text or "0")
    except InvalidOperation:
        raise BillFormatError(f"line {line}: {column} {text!r} is not an amount") from None
    exponent = amount.as_tuple().exponent
    if not amount.is_finite() or not isinstance(exponent, int) or amount < 0 or exponent < -2:
        raise BillFormatError(f"line {line}: {column} {text!r} is not an amount in yuan")
    return amount


def _fields(line: str, number: int) -> list[str]:
    try:
        return [_value(v) for v in next(csv.reader([line]))]
    except (csv.Error, StopIteration) as err:
        raise BillFormatError(f"line {number}: {err} in {line[:120]!r}") from err


async def lines_of(chunks: AsyncIterator[bytes] | Iterable[bytes]) -> AsyncIterator[str]:
    """Text lines of a UTF-8 bill arriving as byte pieces of any size."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    buffer = ""

    async def pieces():
        if hasattr(chunks, "__aiter__"):
            async for chunk in chunks:
                yield chunk
        else:
            for chunk in chunks:
                yield chunk

    try:
        async for chunk in pieces():
            buffer += decoder.decode(chunk)
            *complete, buffer = buffer.split("\n")
            for line in complete:
                yield line
        buffer += decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise BillFormatError(f"the bill is not UTF-8 text: {err}") from err
    if buffer:
        yield buffer


async def parse_bill(lines: AsyncIterator[str]) -> AsyncIterator[SettlementRow]:
    """The bill's money rows; BillFormatError for a bill that is not this layout, lacks its
    summary, or whose summary disagrees with its rows."""
    columns: list[str] | None = None
    summary_columns: list[str] | None = None
    summary: dict[str, str] | None = None
    count, refunded = 0, Decimal(0)
    number = 0
    async for raw in lines:
        number += 1
        line = raw.strip().lstrip("\ufeff")
        if not line:
            continue
        if summary is not None:
            raise BillFormatError(f"line {number}: text after the summary row: {line[:120]!r}")
        if summary_columns is not None:
            values = _fields(line, number)
            if len(values) != len(summary_columns):
                raise BillFormatError(
                    f"line {number}: the summary row has {len(values)} values for {len(summary_columns)} columns"
                )
            summary = dict(zip(summary_columns, values))
            continue
        if columns is None:
            values = _fields(line, number)
            missing = [c for c in REQUIRED if c not in values]
            if missing:
                raise BillFormatError(f"line {number}: the column row lacks {', '.join(missing)}")
            columns = values
            continue
        if line.startswith("总交易单数"):
            summary_columns = _fields(line, number)
            if "总交易单数" not in summary_columns or "退款总金额" not in summary_columns:
                raise BillFormatError(f"line {number}: the summary column row lacks 总交易单数 or 退款总金额")
            continue
        values = _fields(line, number)
        if len(values) != len(columns):
            raise BillFormatError(f"line {number}: {len(values)} values for {len(columns)} columns in {line[:120]!r}")
        row = dict(zip(columns, values))
        count += 1
        state = row["交易状态"]
        if state in SKIPPED_STATES:
            continue
        kind = KINDS.get(state)
        if kind is None:
            raise BillFormatError(f"line {number}: unknown 交易状态 {state!r}")
        currency = row["货币种类"] or "CNY"
        try:
            at = datetime.strptime(row["交易时间"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA).astimezone(timezone.utc)
        except ValueError:
            raise BillFormatError(f"line {number}: 交易时间 {row['交易时间']!r} is not a time") from None
        if not row["微信订单号"] or not row["商户订单号"]:
            raise BillFormatError(f"line {number}: no 微信订单号 or 商户订单号")
        if kind == REFUND:
            amount = _yuan(row["退款金额"], number, "退款金额")
            refunded += amount
            if not row["商户退款单号"]:
                raise BillFormatError(f"line {number}: a refund row without 商户退款单号")
        else:
            amount = _yuan(row["订单金额"], number, "订单金额")
        try:
            amount_minor = to_minor(f"{amount:.2f}", currency)
        except (ValueError, ArithmeticError) as err:
            raise BillFormatError(f"line {number}: {err}") from err
        yield SettlementRow(
            kind=kind,
            trade_no=row["微信订单号"],
            order_id=row["商户订单号"],
            refund_no=row["商户退款单号"] if kind == REFUND else "",
            amount_minor=amount_minor,
            currency=currency,
            at=at,
        )
    if columns is None:
        raise BillFormatError("the bill is empty: no column row")
    if summary is None:
        raise BillFormatError("the bill ends without its summary (总交易单数 ...): it is cut short")
    try:
        listed = int(summary["总交易单数"])
    except ValueError:
        raise BillFormatError(f"总交易单数 {summary['总交易单数']!r} is not a number") from None
    if listed != count:
        raise BillFormatError(f"the summary counts {listed} rows, the bill has {count}")
    total_refunded = _yuan(summary["退款总金额"], number, "退款总金额")
    if total_refunded != refunded:
        raise BillFormatError(f"the summary's 退款总金额 {total_refunded} differs from the rows' {refunded}")


def render_bill(rows: Iterable[dict[str, str]]) -> Iterator[str]:
    """A bill in the real layout from rows of column -> value (the tests' fake uses it)."""
    rows = list(rows)
    yield ",".join(COLUMNS) + "\r\n"
    for row in rows:
        yield ",".join("`" + row.get(c, "") for c in COLUMNS) + "\r\n"
    paid = [r for r in rows if r.get("交易状态") == "SUCCESS"]

    def total(items, column):
        return f"{sum((Decimal(r.get(column) or '0') for r in items), Decimal(0)):.2f}"

    refunds = [r for r in rows if r.get("交易状态") == "REFUND"]
    yield ",".join(SUMMARY_COLUMNS) + "\r\n"
    yield (
        ",".join(
            "`" + v
            for v in (
                str(len(rows)),
                total(paid, "应结订单金额"),
                total(refunds, "退款金额"),
                "0.00",
                total(rows, "手续费"),
                total(paid, "订单金额"),
                total(refunds, "申请退款金额"),
            )
        )
        + "\r\n"
    )
