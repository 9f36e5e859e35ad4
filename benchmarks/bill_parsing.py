"""Benchmark: read a settlement day of N rows (default 100,000) in each provider's bill format.

For Alipay (a zip of GBK CSVs with tab padding and summary lines), WeChat Pay (gzip,
backtick-prefixed values, a summary row) and the simulator (UTF-8 CSV), a bill of N rows
is written to a file, then read by the adapter's own streaming parser in a fresh process
that reports rows per second and its peak memory (VmHWM) above the same process before
reading. A parser that held the day in memory would grow with N; these stay flat.

    python benchmarks/bill_parsing.py [--rows 100000] [--small 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHINA = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 20)
FORMATS = ("alipay", "wechatpay", "simulator")


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def write_bill(kind: str, rows: int, path: Path) -> None:
    start = datetime(2026, 11, 20, 0, 0, tzinfo=CHINA)
    if kind == "alipay":
        from tests.fakes.alipay_bills import Adjustments, BillRow, bill_zip

        bill = [
            BillRow(
                kind="交易",
                trade_no=f"2026112022001{n:012d}",
                out_trade_no=f"bench-{n}",
                subject="商品",
                created=start + timedelta(seconds=n % 86000),
                finished=start + timedelta(seconds=n % 86000),
                amount=Decimal("99.90"),
            )
            for n in range(rows)
        ]
        path.write_bytes(bill_zip("2088000000000000", DAY, bill, Adjustments(), start + timedelta(days=1)))
    elif kind == "wechatpay":
        from paysentinel.providers.wechatpay_bill import render_bill

        def row(n: int) -> dict[str, str]:
            moment = (start + timedelta(seconds=n % 86000)).strftime("%Y-%m-%d %H:%M:%S")
            return {
                "交易时间": moment,
                "公众账号ID": "wx0000000000000000",
                "商户号": "1900000000",
                "微信订单号": f"42000{n:023d}",
                "商户订单号": f"bench-{n}",
                "交易类型": "NATIVE",
                "交易状态": "SUCCESS",
                "货币种类": "CNY",
                "应结订单金额": "99.90",
                "代金券金额": "0.00",
                "退款金额": "0.00",
                "充值券退款金额": "0.00",
                "商品名称": "商品",
                "手续费": "0.60",
                "费率": "0.60%",
                "订单金额": "99.90",
                "申请退款金额": "0.00",
            }

        with gzip.open(path, "wt", encoding="utf-8") as out:
            for text in render_bill(row(n) for n in range(rows)):
                out.write(text)
    else:
        with open(path, "w", encoding="utf-8") as out:
            out.write("支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,币种,订单金额（元）,退款批次号/请求号\n")
            for n in range(rows):
                out.write(f"2026112022001{n:012d},bench-{n},交易,商品,2026-11-20 10:00:00,2026-11-20 10:00:01,CNY,99.90,\n")


async def read_bill(kind: str, path: Path) -> int:
    count = 0
    if kind == "alipay":
        from paysentinel.providers.alipay_bill import aiter_rows

        with open(path, "rb") as fileobj:
            async for _ in aiter_rows(fileobj):
                count += 1
    elif kind == "wechatpay":
        from paysentinel.providers.wechatpay_bill import lines_of, parse_bill

        def chunks():
            with gzip.open(path, "rb") as stream:
                while piece := stream.read(64 * 1024):
                    yield piece

        async for _ in parse_bill(lines_of(chunks())):
            count += 1
    else:
        from paysentinel.settlement import parse_bill as parse_simulator

        async def text():
            with open(path, encoding="utf-8") as stream:
                while piece := stream.read(64 * 1024):
                    yield piece

        async for _ in parse_simulator(text(), CHINA):
            count += 1
    return count


def child(kind: str, path: str) -> None:
    """Run in a fresh process: read the bill, print rows, seconds and memory as JSON."""
    import paysentinel.providers.alipay_bill  # noqa: F401 - the parsers' imports count in the baseline
    import paysentinel.providers.wechatpay_bill  # noqa: F401
    import paysentinel.settlement  # noqa: F401

    before = peak_kib()
    started = time.perf_counter()
    rows = asyncio.run(read_bill(kind, Path(path)))
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": seconds, "grew_kib": peak_kib() - before, "peak_kib": peak_kib()}))


def measure(kind: str, rows: int, directory: Path) -> dict:
    path = directory / f"{kind}-{rows}.bill"
    write_bill(kind, rows, path)
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["file_kib"] = path.stat().st_size // 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--child", nargs=2, metavar=("FORMAT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; one run")
    print(f"{'format':<10} {'rows':>8} {'file KiB':>9} {'seconds':>8} {'rows/s':>8} {'peak MiB':>9} {'grew MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in FORMATS:
            for rows in (args.small, args.rows):
                r = measure(kind, rows, Path(tmp))
                assert r["rows"] == rows, f"{kind}: read {r['rows']} of {rows} rows"
                print(
                    f"{kind:<10} {rows:>8} {r['file_kib']:>9} {r['seconds']:>8.2f} {rows / r['seconds']:>8.0f} "
                    f"{r['peak_kib'] / 1024:>9.1f} {r['grew_kib'] / 1024:>9.1f}"
                )


if __name__ == "__main__":
    main()
