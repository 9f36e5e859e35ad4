"""Alipay's daily trade bill (``bill_type=trade``), read as it really comes.

``alipay.data.dataservice.bill.downloadurl.query`` gives a URL to a zip holding, in GBK:

- ``<pid>_<yyyyMMdd>_业务明细.csv``: ``#支付宝业务明细查询``, ``#账号：[...]``,
  ``#起始日期：[...]   终止日期：[...]``, a ``#----业务明细列表----`` line, the column row
  (支付宝交易号,商户订单号,业务类型,...,订单金额（元）,...,退款批次号/请求号,...: full-width
  parentheses, no currency column: the bill is CNY), one row per paid trade (交易) or refund
  (退款, negative amounts, the refund's out_request_no in 退款批次号/请求号), every value
  padded with a tab, then ``#----业务明细列表结束----`` and ``#交易合计：N笔，...``,
  ``#退款合计：M笔，...``, ``#导出时间：[...]``;
- ``<pid>_<yyyyMMdd>_业务明细(汇总).csv``: the totals per store (not read).

The zip's member names are GBK without the zip UTF-8 flag. The detail member is decompressed
and decoded incrementally; the summary counts are checked against the rows read, so a bill
cut short is an error, not a short day.
"""

from __future__ import annotations

import codecs
import csv
import re
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import IO

from paysentinel.models import to_minor
from paysentinel.providers.alipay_sign import parse_china_time
from paysentinel.settlement import PAYMENT, REFUND, BillFormatError, SettlementRow

KINDS = {"交易": PAYMENT, "退款": REFUND}
REQUIRED = ["支付宝交易号", "商户订单号", "业务类型", "完成时间", "订单金额（元）", "退款批次号/请求号"]
DETAIL_SUFFIX = "_业务明细.csv"
SUMMARY_SUFFIX = "_业务明细(汇总).csv"
TOTALS = re.compile(r"^#(交易|退款)合计[:：]\s*(\d+)\s*笔")
CHUNK = 64 * 1024
ENCODING = "gb18030"  # a superset of GBK: every GBK bill decodes the same


def member_name(info: zipfile.ZipInfo) -> str:
    """The member's real name: without the UTF-8 flag Python read it as cp437; Alipay wrote GBK."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode(ENCODING)
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def detail_member(archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    names = {member_name(info): info for info in archive.infolist()}
    found = [info for name, info in names.items() if name.endswith(DETAIL_SUFFIX)]
    if len(found) != 1:
        raise BillFormatError(
            f"the bill zip holds {len(found)} detail files (*{DETAIL_SUFFIX}), expected one; "
            f"members: {', '.join(names) or 'none'}"
        )
    return found[0]


def decoded_chunks(stream: IO[bytes]) -> Iterator[str]:
    """The member's text in pieces, decoded incrementally (a character split between pieces
    is kept whole)."""
    decoder = codecs.getincrementaldecoder(ENCODING)()
    offset = 0
    try:
        while chunk := stream.read(CHUNK):
            yield decoder.decode(chunk)
            offset += len(chunk)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise BillFormatError(f"the bill is not GBK text near byte {offset + err.start}: {err.reason}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # a CRC or deflate error: a damaged download
        raise BillFormatError(f"the bill zip is damaged: {err}") from None


def records(chunks: Iterator[str]) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each record; a quoted field may hold a line break."""
    buffer, record, first, number, quotes = "", "", 0, 0, 0
    for chunk in chunks:
        buffer += chunk
        while (end := buffer.find("\n")) >= 0:
            line, buffer = buffer[: end + 1], buffer[end + 1 :]
            number += 1
            if not record:
                first = number
            record += line
            quotes += line.count('"')
            if quotes % 2 == 0:
                yield first, record
                record, quotes = "", 0
    if buffer:
        number += 1
        if not record:
            first = number
        record += buffer
        quotes += buffer.count('"')
    if record:
        if quotes % 2:
            raise BillFormatError(f"line {first}: a quoted field is never closed in {record[:120]!r}")
        yield first, record


def rows(chunks: Iterator[str]) -> Iterator[SettlementRow]:
    """The detail file's rows as common settlement rows (times: China time -> UTC)."""
    columns: list[str] | None = None
    counted = {PAYMENT: 0, REFUND: 0}
    totals: dict[str, int] = {}
    for number, text in records(chunks):
        line = text.strip().lstrip("\ufeff")
        if not line:
            continue
        if line.startswith("#"):
            if (match := TOTALS.match(line)) is not None:
                totals[KINDS[match.group(1)]] = int(match.group(2))
            continue
        try:
            values = [value.strip() for value in next(csv.reader([line]))]
        except csv.Error as err:
            raise BillFormatError(f"line {number}: {err} in {line[:120]!r}") from None
        if columns is None:
            missing = [c for c in REQUIRED if c not in values]
            if missing:
                raise BillFormatError(
                    f"line {number}: the column row lacks {', '.join(missing)} (found {', '.join(values[:8])}...)"
                )
            columns = values
            continue
        if len(values) != len(columns):
            raise BillFormatError(f"line {number}: {len(values)} values for {len(columns)} columns in {line[:120]!r}")
        row = dict(zip(columns, values))
        try:
            kind = KINDS[row["业务类型"]]
            at = parse_china_time(row["完成时间"])
            if at is None:
                raise ValueError("完成时间 is empty")
            try:
                amount = abs(to_minor(row["订单金额（元）"].lstrip("-"), "CNY"))
            except (ValueError, ArithmeticError):
                raise ValueError(f"订单金额（元） {row['订单金额（元）']!r} is not an amount in yuan") from None
            if not row["支付宝交易号"] or not row["商户订单号"]:
                raise ValueError("支付宝交易号 and 商户订单号 must not be empty")
            if kind == REFUND and not row["退款批次号/请求号"]:
                raise ValueError("a refund row without 退款批次号/请求号")
        except KeyError as err:
            raise BillFormatError(f"line {number}: unknown 业务类型 {err} in {line[:120]!r}") from None
        except (ValueError, ArithmeticError) as err:
            raise BillFormatError(f"line {number}: {err} in {line[:120]!r}") from None
        counted[kind] += 1
        yield SettlementRow(
            kind=kind,
            trade_no=row["支付宝交易号"],
            order_id=row["商户订单号"],
            refund_no=row["退款批次号/请求号"] if kind == REFUND else "",
            amount_minor=amount,
            currency="CNY",
            at=at,
        )
    if columns is None:
        raise BillFormatError("the detail file has no column row")
    for kind, total in totals.items():
        if counted[kind] != total:
            raise BillFormatError(
                f"the bill's summary counts {total} {kind} row(s), the detail list has {counted[kind]}: the bill is incomplete"
            )


def zip_rows(fileobj: IO[bytes]) -> Iterator[SettlementRow]:
    """The rows of a bill zip (a file object: the download spooled as it arrived)."""
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError) as err:
        raise BillFormatError(f"the bill download is not a zip: {err}") from None
    with archive:
        with archive.open(detail_member(archive)) as stream:
            yield from rows(decoded_chunks(stream))


async def aiter_rows(fileobj: IO[bytes]) -> AsyncIterator[SettlementRow]:
    for row in zip_rows(fileobj):
        yield row
