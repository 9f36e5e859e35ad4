"""The fake Alipay's daily trade bill, in the real layout: a zip of two GBK CSV files with
GBK member names (no zip UTF-8 flag), comment header lines, values padded with tabs,
full-width parentheses in the column names, and summary lines after the list."""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

CHINA = ZoneInfo("Asia/Shanghai")
COLUMNS = [
    "支付宝交易号",
    "商户订单号",
    "业务类型",
    "商品名称",
    "创建时间",
    "完成时间",
    "门店编号",
    "门店名称",
    "操作员",
    "终端号",
    "对方账户",
    "订单金额（元）",
    "商家实收（元）",
    "支付宝红包（元）",
    "集分宝（元）",
    "支付宝优惠（元）",
    "商家优惠（元）",
    "券核销金额（元）",
    "券名称",
    "商家红包消费金额（元）",
    "卡消费金额（元）",
    "退款批次号/请求号",
    "服务费（元）",
    "分润（元）",
    "备注",
]
FEE_RATE = Decimal("0.006")
LINE = "\r\n"


@dataclass
class BillRow:
    kind: str  # 交易 or 退款
    trade_no: str
    out_trade_no: str
    subject: str
    created: datetime
    finished: datetime
    amount: Decimal  # positive; refunds are written negative
    out_request_no: str = ""


@dataclass
class Adjustments:
    """Differences a test injects into a day's bill."""

    amounts: dict[str, str] = field(default_factory=dict)  # order -> the amount the bill shows
    drop_orders: list[str] = field(default_factory=list)
    extra_lines: list[str] = field(default_factory=list)  # raw lines after the rows (a broken bill)


def _t(moment: datetime) -> str:
    return moment.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S")


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01')):.2f}"


def _cn_day(day: date) -> str:
    return f"{day.year}年{day.month:02d}月{day.day:02d}日"


def detail_csv(pid: str, day: date, rows: list[BillRow], adjust: Adjustments, exported: datetime) -> str:
    out = io.StringIO()
    out.write(f"#支付宝业务明细查询{LINE}#账号：[{pid}0156]{LINE}")
    nxt = date.fromordinal(day.toordinal() + 1)
    out.write(f"#起始日期：[{_cn_day(day)} 00:00:00]   终止日期：[{_cn_day(nxt)} 00:00:00]{LINE}")
    out.write("#-----------------------------------------业务明细列表----------------------------------------" + LINE)
    writer = csv.writer(out, lineterminator=LINE)
    writer.writerow(COLUMNS)
    totals = {"交易": [0, Decimal(0)], "退款": [0, Decimal(0)]}
    for row in rows:
        if row.out_trade_no in adjust.drop_orders:
            continue
        amount = (
            Decimal(adjust.amounts[row.out_trade_no])
            if (row.kind == "交易" and row.out_trade_no in adjust.amounts)
            else row.amount
        )
        signed = amount if row.kind == "交易" else -amount
        fee = (amount * FEE_RATE).quantize(Decimal("0.01"))
        totals[row.kind][0] += 1
        totals[row.kind][1] += signed
        writer.writerow(
            [
                f"{row.trade_no}\t",
                f"{row.out_trade_no}\t",
                f"{row.kind}\t",
                f"{row.subject}\t",
                _t(row.created),
                _t(row.finished),
                "\t",
                "\t",
                "\t",
                "\t",
                "159******20\t",
                _money(signed),
                _money(signed),
                "0.00",
                "0.00",
                "0.00",
                "0.00",
                "0.00",
                "\t",
                "0.00",
                "0.00",
                f"{row.out_request_no}\t" if row.out_request_no else "\t",
                _money(-fee if row.kind == "交易" else fee),
                "0.00",
                "\t",
            ]
        )
    for line in adjust.extra_lines:
        out.write(line + LINE)
    out.write("#-----------------------------------------业务明细列表结束------------------------------------" + LINE)
    for kind in ("交易", "退款"):
        count, total = totals[kind]
        out.write(f"#{kind}合计：{count}笔，商家实收共{_money(total)}元，商家优惠共0.00元{LINE}")
    out.write(f"#导出时间：[{exported.astimezone(CHINA).strftime('%Y年%m月%d日 %H:%M:%S')}]{LINE}")
    return out.getvalue()


def summary_csv(pid: str, day: date, rows: list[BillRow], exported: datetime) -> str:
    trades = [r for r in rows if r.kind == "交易"]
    refunds = [r for r in rows if r.kind == "退款"]
    total = sum((r.amount for r in trades), Decimal(0)) - sum((r.amount for r in refunds), Decimal(0))
    nxt = date.fromordinal(day.toordinal() + 1)
    return LINE.join(
        [
            "#支付宝业务汇总查询",
            f"#账号：[{pid}0156]",
            f"#起始日期：[{_cn_day(day)} 00:00:00]   终止日期：[{_cn_day(nxt)} 00:00:00]",
            "#-----------------------------------------业务汇总列表----------------------------------------",
            "门店编号,门店名称,交易订单总笔数,退款订单总笔数,订单金额（元）,商家实收（元）,支付宝优惠（元）,商家优惠（元）,卡消费金额（元）,"
            "服务费（元）,分润（元）,实收净额（元）",
            f"合计,,{len(trades)},{len(refunds)},{_money(total)},{_money(total)},0.00,0.00,0.00,0.00,0.00,{_money(total)}",
            "#-----------------------------------------业务汇总列表结束------------------------------------",
            f"#导出时间：[{exported.astimezone(CHINA).strftime('%Y年%m月%d日 %H:%M:%S')}]",
            "",
        ]
    )


class _GbkName(zipfile.ZipInfo):
    """A member whose name is written in GBK without the UTF-8 flag, as Alipay's zips are."""

    def _encodeFilenameFlags(self):  # zipfile's hook for the bytes of the name
        return self.filename.encode("gbk"), self.flag_bits & ~0x800


def bill_zip(pid: str, day: date, rows: list[BillRow], adjust: Adjustments, exported: datetime) -> bytes:
    stamp = day.strftime("%Y%m%d")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in (
            (f"{pid}0156_{stamp}_业务明细.csv", detail_csv(pid, day, rows, adjust, exported)),
            (f"{pid}0156_{stamp}_业务明细(汇总).csv", summary_csv(pid, day, rows, exported)),
        ):
            info = _GbkName(name, date_time=exported.astimezone(CHINA).timetuple()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text.encode("gbk"))
    return buffer.getvalue()
