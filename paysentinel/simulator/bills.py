"""Daily settlement bills of the simulated provider, shaped after Alipay's trade bill.

One CSV per merchant and day: ``#`` header lines, a column row, one row per paid trade
(业务类型 交易) and per successful refund (退款, negative amounts), in yuan with two
decimals, times in the bill's time zone, then ``#`` summary lines. A payment belongs to
the day it was *paid* (not created); a refund to the day it succeeded. Rows are
generated lazily, so a 100,000-row day is streamed, never held in memory.

For tests the simulator can adjust a day's bill (drop a row, report another amount) and
add synthetic rows (``prefix-000001`` ...), which a benchmark loads into the database.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

COLUMNS = [
    "支付宝交易号",
    "商户订单号",
    "业务类型",
    "商品名称",
    "创建时间",
    "完成时间",
    "币种",
    "订单金额（元）",
    "商家实收（元）",
    "退款批次号/请求号",
    "备注",
]
PAYMENT, REFUND = "交易", "退款"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class BillAdjustments(BaseModel):
    """What the provider's bill gets wrong for a day (tests inject discrepancies with this)."""

    model_config = ConfigDict(extra="forbid")
    drop_orders: list[str] = Field(default_factory=list, description="paid trades of these orders are left out")
    amounts: dict[str, str] = Field(default_factory=dict, description="order -> amount the bill reports")
    refund_amounts: dict[str, str] = Field(default_factory=dict, description="out_request_no -> refund amount")
    drop_refunds: list[str] = Field(default_factory=list, description="refunds (out_request_no) left out")
    extra_lines: list[str] = Field(default_factory=list, description="raw lines added to the detail list")


class SyntheticRows(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = Field(..., ge=1, le=5_000_000)
    prefix: str = Field("bench", pattern=r"^[A-Za-z0-9_-]{1,20}$")


def synthetic_row(prefix: str, i: int, day: date) -> tuple[str, str, str, datetime]:
    """(trade_no, order, amount, paid at local time) of synthetic row ``i``: deterministic,
    so a benchmark can create the matching payments on our side."""
    paid = datetime.combine(day, time()) + timedelta(seconds=(i * 7) % 86_000 + 60)
    return f"{day:%Y%m%d}99{i:014d}", f"{prefix}-{i:06d}", f"{(i % 9000 + 100) / 100:.2f}", paid


@dataclass
class DayBill:
    day: date
    tz: ZoneInfo
    adjustments: BillAdjustments = field(default_factory=BillAdjustments)
    synthetic: list[SyntheticRows] = field(default_factory=list)

    def bounds(self) -> tuple[datetime, datetime]:
        start = datetime.combine(self.day, time(), self.tz)
        return start, start + timedelta(days=1)

    def lines(self, trades: Iterable) -> Iterator[str]:
        """The CSV, line by line. ``trades``: the simulator's trades (SimTrade)."""
        start, end = self.bounds()
        buffer = io.StringIO()
        writer = csv.writer(buffer)  # CRLF, and a field holding a line break or quote is quoted

        def line(values: list[str]) -> str:
            buffer.seek(0)
            buffer.truncate()
            writer.writerow(values)
            return buffer.getvalue()

        yield "#支付宝业务明细查询\n"
        yield "#账号：[paysentinel-simulator]\n"
        yield f"#起始日期：[{start:%Y年%m月%d日 %H:%M:%S}]   终止日期：[{end:%Y年%m月%d日 %H:%M:%S}]\n"
        yield "#-----------------------------------------业务明细列表----------------------------------------\n"
        yield line(COLUMNS)
        paid_count, refund_count = 0, 0
        paid_total, refund_total = Decimal(0), Decimal(0)
        adjust = self.adjustments
        for trade in trades:
            if trade.gmt_payment and start <= trade.gmt_payment < end and trade.out_trade_no not in adjust.drop_orders:
                amount = adjust.amounts.get(trade.out_trade_no, trade.total_amount)
                paid_count, paid_total = paid_count + 1, paid_total + Decimal(amount)
                yield line(
                    [
                        trade.trade_no,
                        trade.out_trade_no,
                        PAYMENT,
                        trade.subject,
                        self._local(trade.gmt_create),
                        self._local(trade.gmt_payment),
                        trade.currency,
                        amount,
                        amount,
                        "",
                        "",
                    ]
                )
            for refund in trade.refunds.values():
                if (
                    refund.refund_status == "REFUND_SUCCESS"
                    and refund.gmt_refund
                    and start <= refund.gmt_refund < end
                    and refund.out_request_no not in adjust.drop_refunds
                ):
                    amount = adjust.refund_amounts.get(refund.out_request_no, refund.refund_amount)
                    refund_count, refund_total = refund_count + 1, refund_total + Decimal(amount)
                    yield line(
                        [
                            trade.trade_no,
                            trade.out_trade_no,
                            REFUND,
                            trade.subject,
                            self._local(trade.gmt_create),
                            self._local(refund.gmt_refund),
                            trade.currency,
                            f"-{amount}",
                            f"-{amount}",
                            refund.out_request_no,
                            "",
                        ]
                    )
        for raw in adjust.extra_lines:
            yield raw.rstrip("\n") + "\n"
        for synthetic in self.synthetic:
            for i in range(1, synthetic.rows + 1):
                trade_no, order, amount, paid = synthetic_row(synthetic.prefix, i, self.day)
                paid_count, paid_total = paid_count + 1, paid_total + Decimal(amount)
                stamp = paid.strftime(TIME_FORMAT)
                yield line([trade_no, order, PAYMENT, "synthetic", stamp, stamp, "CNY", amount, amount, "", ""])
        yield "#-----------------------------------------业务明细列表结束------------------------------------\n"
        yield f"#交易合计：{paid_count}笔，商家实收：{paid_total:.2f}元\n"
        yield f"#退款合计：{refund_count}笔，退款金额：{refund_total:.2f}元\n"

    def _local(self, moment: datetime | None) -> str:
        return moment.astimezone(self.tz).strftime(TIME_FORMAT) if moment else ""
