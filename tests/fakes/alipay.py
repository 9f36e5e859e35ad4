"""A protocol-faithful fake of the Alipay open platform, for tests.

Gateway ``/gateway.do`` (form POST, or GET with everything in the query string as
python-alipay-sdk and page-pay URLs send it): the common parameters are checked and the
request's RSA2 signature verified with the app's public key; answers are
``{"<method>_response": {...}, "sign": "..."}`` signed with the fake's own "Alipay" key over
the inner object's exact text (written with spaces after ``:`` and ``,`` and non-ASCII
text, so a verifier that re-serializes fails), served as ``text/html;charset=utf-8`` like
the real gateway. Gateway-level errors (40001, 40002) come unsigned, as Alipay's do.

Methods: alipay.trade.precreate (a QR code; the trade has no trade_no and is unknown to
query and close until the buyer scans), alipay.trade.query, alipay.trade.close,
alipay.trade.refund (idempotent by out_request_no: a repeat answers fund_change "N"),
alipay.trade.fastpay.refund.query (refund_status only once the refund succeeded),
alipay.data.dataservice.bill.downloadurl.query (a zip in the real layout, alipay_bills.py),
and alipay.trade.page.pay opened in a browser (GET: the cashier page).

Notifications (trade_status_sync, form-encoded, RSA2 over the sorted parameters without
sign and sign_type) go to the trade's notify_url and are resent on Alipay's schedule
(4m, 10m, 10m, 1h, 2h, 6h, 15h; compressed by ALIPAY_FAKE_RESEND_SECONDS) until the answer
is exactly ``success``. Alipay notifies TRADE_SUCCESS, TRADE_FINISHED and TRADE_CLOSED (not
WAIT_BUYER_PAY), and refunds (trade_status with refund_fee, gmt_refund, out_biz_no).

Control routes (tests/fakes/__init__.py): /health, /control/ledger, /control/pay/{order}
(the buyer pays; ``{"amount": "1.00"}`` pays another amount, ``{"scan_only": true}`` only
scans: the trade exists, WAIT_BUYER_PAY), /control/scripts/{order}, /control/fail,
/control/trades/{order}, /control/orphans, /control/bills/{day}/adjustments.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import urllib.parse
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Optional

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tests.fakes import FakeSetup
from tests.fakes.alipay_bills import Adjustments, BillRow, bill_zip

log = logging.getLogger("tests.fakes.alipay")

APP_ID = "2021004123456789"
PID = "2088621987654321"  # the merchant's partner id (seller_id)
CHINA = timezone(timedelta(hours=8))
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
ORDER_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
AMOUNT_RE = re.compile(r"^\d{1,9}(\.\d{1,2})?$")
DEFAULT_RESEND = "0.5,1,1,2,2,3,4"  # Alipay's 4m,10m,10m,1h,2h,6h,15h, compressed
METHODS = (
    "alipay.trade.precreate",
    "alipay.trade.query",
    "alipay.trade.close",
    "alipay.trade.refund",
    "alipay.trade.fastpay.refund.query",
    "alipay.data.dataservice.bill.downloadurl.query",
    "alipay.trade.page.pay",
)


# --- Keys and signatures (the fake's own, independent of the adapter's code) -----------------


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def unsigned_string(params: dict[str, str], exclude: tuple[str, ...]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in exclude and v != "")


def rsa2(key: rsa.RSAPrivateKey, text: str) -> str:
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa2_ok(key, text: str, sign: str) -> bool:
    try:
        key.verify(base64.b64decode(sign), text.encode(), padding.PKCS1v15(), hashes.SHA256())
        return True
    except (InvalidSignature, ValueError):
        return False


def sign_notification(key: rsa.RSAPrivateKey, params: dict[str, str]) -> dict[str, str]:
    """A notification's parameters with ``sign`` (over everything but sign and sign_type)."""
    return {**params, "sign": rsa2(key, unsigned_string(params, ("sign", "sign_type")))}


def prepare(directory: Path, port: int, webhook_url: str) -> FakeSetup:
    """The session's keys: the app's pair (the system signs with its private half) and the
    fake Alipay's pair (the system verifies with its public half, given inline with literal
    ``\\n`` escapes as a console copy-paste often is)."""
    directory.mkdir(parents=True, exist_ok=True)
    app_key, alipay_key = new_key(), new_key()
    files = {
        "app_private.pem": private_pem(app_key),
        "app_public.pem": public_pem(app_key),
        "alipay_private.pem": private_pem(alipay_key),
        "alipay_public.pem": public_pem(alipay_key),
    }
    for name, text in files.items():
        (directory / name).write_text(text)
        os.chmod(directory / name, 0o600)
    return FakeSetup(
        app_env={
            "PAYSENTINEL_ALIPAY_APP_ID": APP_ID,
            "PAYSENTINEL_ALIPAY_GATEWAY_URL": f"http://127.0.0.1:{port}/gateway.do",
            "PAYSENTINEL_ALIPAY_PRIVATE_KEY_FILE": str(directory / "app_private.pem"),
            "PAYSENTINEL_ALIPAY_PUBLIC_KEY": files["alipay_public.pem"].strip().replace("\n", "\\n"),
        },
        fake_env={
            "ALIPAY_FAKE_PORT": str(port),
            "ALIPAY_FAKE_KEYS": str(directory),
            "ALIPAY_FAKE_RESEND_SECONDS": os.environ.get("ALIPAY_FAKE_RESEND_SECONDS", DEFAULT_RESEND),
        },
    )


# --- Scripts ------------------------------------------------------------------------------------


class Failure(BaseModel):
    """Answer a method with an error ``times`` times (-1: always)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    code: str = "20000"
    sub_code: str = "isp.unknow-error"
    sub_msg: str = "系统繁忙"
    times: int = Field(1, ge=-1)
    http_status: int = Field(200, ge=200, le=599)  # 5xx: the gateway's front answers an error page
    after: bool = False  # do the work first, then answer the error (the answer is lost)


class Script(BaseModel):
    model_config = ConfigDict(extra="forbid")
    notify: Literal["normal", "drop"] = "normal"  # drop: every notification of the order is lost
    failures: list[Failure] = Field(default_factory=list)
    refund: Literal["immediate", "processing"] = "immediate"
    refund_processing_seconds: float = Field(2.0, ge=0, le=3600)
    refund_outcome: Literal["success", "fail"] = "success"
    pay_on_close: bool = False  # the buyer's payment completes just as the merchant closes


class PayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Optional[str] = Field(None, pattern=AMOUNT_RE.pattern)
    scan_only: bool = False


class Orphan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_trade_no: str = Field(pattern=ORDER_RE.pattern)
    total_amount: str = Field(pattern=AMOUNT_RE.pattern)


class BillAdjust(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amounts: dict[str, str] = Field(default_factory=dict)
    drop_orders: list[str] = Field(default_factory=list)
    extra_lines: list[str] = Field(default_factory=list)


# --- The ledger --------------------------------------------------------------------------------


def now() -> datetime:
    return datetime.now(timezone.utc)


def cn(moment: Optional[datetime]) -> str:
    return moment.astimezone(CHINA).strftime(TIME_FORMAT) if moment else ""


def money(value: Decimal) -> str:
    return f"{value:.2f}"


@dataclass
class FakeRefund:
    out_request_no: str
    amount: Decimal
    status: str = "REFUND_PROCESSING"  # REFUND_SUCCESS, REFUND_FAILED
    gmt_refund: Optional[datetime] = None
    submissions: int = 1


@dataclass
class FakeTrade:
    out_trade_no: str
    total_amount: Decimal
    subject: str
    notify_url: str
    time_expire: Optional[datetime]
    qr_code: str
    status: str = "NOT_SCANNED"  # then WAIT_BUYER_PAY, TRADE_SUCCESS, TRADE_FINISHED, TRADE_CLOSED
    trade_no: Optional[str] = None
    gmt_create: datetime = field(default_factory=now)
    gmt_payment: Optional[datetime] = None
    gmt_close: Optional[datetime] = None
    refunds: dict[str, FakeRefund] = field(default_factory=dict)

    @property
    def paid(self) -> bool:
        return self.gmt_payment is not None

    def refunded(self, processing: bool = False) -> Decimal:
        counted = ("REFUND_SUCCESS", "REFUND_PROCESSING") if processing else ("REFUND_SUCCESS",)
        return sum((r.amount for r in self.refunds.values() if r.status in counted), Decimal(0))

    def out(self) -> dict[str, Any]:
        return {
            "out_trade_no": self.out_trade_no,
            "trade_no": self.trade_no,
            "trade_status": self.status,
            "total_amount": money(self.total_amount),
            "qr_code": self.qr_code,
            "gmt_create": cn(self.gmt_create),
            "gmt_payment": cn(self.gmt_payment) or None,
            "gmt_close": cn(self.gmt_close) or None,
            "time_expire": cn(self.time_expire) or None,
            "refunds": [
                {
                    "out_request_no": r.out_request_no,
                    "refund_amount": money(r.amount),
                    "refund_status": r.status,
                    "submissions": r.submissions,
                }
                for r in self.refunds.values()
            ],
        }


class Answer(Exception):
    """An error answer: business failures (40004) are signed, gateway-level ones not."""

    def __init__(self, code: str, sub_code: str, sub_msg: str, extra: Optional[dict[str, Any]] = None):
        self.code, self.sub_code, self.sub_msg, self.extra = code, sub_code, sub_msg, extra or {}
        super().__init__(f"{code} {sub_code} {sub_msg}")

    @property
    def msg(self) -> str:
        return {
            "20000": "Service Currently Unavailable",
            "40001": "Missing Required Arguments",
            "40002": "Invalid Arguments",
            "40004": "Business Failed",
        }.get(self.code, "Error")


def not_exist() -> Answer:
    return Answer("40004", "ACQ.TRADE_NOT_EXIST", "交易不存在")


class Alipay:
    def __init__(self, keys: Path, resend: list[float]):
        self.app_public = serialization.load_pem_public_key((keys / "app_public.pem").read_bytes())
        self.key = serialization.load_pem_private_key((keys / "alipay_private.pem").read_bytes(), password=None)
        self.resend = resend
        self.trades: dict[str, FakeTrade] = {}
        self.by_trade_no: dict[str, str] = {}
        self.scripts: dict[str, Script] = {}
        self.failures_left: dict[str, list[list[Any]]] = {}  # order -> [[Failure, left]]
        self.global_failures: list[list[Any]] = []
        self.calls: dict[str, Counter[str]] = {}
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.notifications: dict[str, list[dict[str, Any]]] = {}
        self.adjustments: dict[date, Adjustments] = {}
        self.http: Optional[httpx.AsyncClient] = None
        self.tasks: set[asyncio.Task] = set()

    def script(self, order: str) -> Script:
        return self.scripts.get(order) or Script()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def later(self, delay: float, action) -> None:
        await asyncio.sleep(delay)
        action()

    def failure(self, order: str, method: str) -> Optional[Failure]:
        """The scripted failure due for this call, if any (counted down)."""
        for entries in (self.failures_left.get(order, []), self.global_failures):
            for entry in entries:
                failure, left = entry
                if failure.method == method and left != 0:
                    if left > 0:
                        entry[1] = left - 1
                    return failure
        return None

    def find(self, biz: dict[str, Any]) -> Optional[FakeTrade]:
        if biz.get("trade_no"):
            order = self.by_trade_no.get(str(biz["trade_no"]))
            trade = self.trades.get(order) if order else None
            if trade is not None and biz.get("out_trade_no") and biz["out_trade_no"] != trade.out_trade_no:
                return None
            return trade
        return self.trades.get(str(biz.get("out_trade_no") or ""))

    # The buyer -----------------------------------------------------------------------------

    def expire(self, trade: FakeTrade) -> None:
        """At time_expire the QR code dies; a scanned trade still unpaid is closed (and notified)."""
        if trade.time_expire is None or now() <= trade.time_expire:
            return
        if trade.status == "WAIT_BUYER_PAY":
            trade.status, trade.gmt_close = "TRADE_CLOSED", now()
            self.notify(trade)

    def scan(self, trade: FakeTrade, under_way: bool = False) -> Optional[str]:
        if not under_way:
            self.expire(trade)
        if trade.status == "NOT_SCANNED":
            if not under_way and trade.time_expire is not None and now() > trade.time_expire:
                return "the QR code has expired"
            trade.status = "WAIT_BUYER_PAY"
            trade.trade_no = (
                now().astimezone(CHINA).strftime("%Y%m%d") + "22001" + "".join(secrets.choice("0123456789") for _ in range(15))
            )
            self.by_trade_no[trade.trade_no] = trade.out_trade_no
        return None

    def pay(
        self, trade: FakeTrade, amount: Optional[str] = None, scan_only: bool = False, under_way: bool = False
    ) -> Optional[str]:
        """The buyer scans (and pays). Returns why not, or None. ``under_way``: the buyer's
        payment started before time_expire and completes now."""
        if (why := self.scan(trade, under_way)) is not None:
            return why
        if trade.status != "WAIT_BUYER_PAY":
            return f"the trade is {trade.status}"
        if scan_only:
            return None
        if amount is not None:
            trade.total_amount = Decimal(amount)
        trade.status, trade.gmt_payment = "TRADE_SUCCESS", now()
        log.info("trade %s (%s) paid %s", trade.trade_no, trade.out_trade_no, trade.total_amount)
        self.notify(trade)
        return None

    # Refunds -------------------------------------------------------------------------------

    def finish_refund(self, trade: FakeTrade, refund: FakeRefund, outcome: str) -> None:
        if outcome == "fail":
            refund.status = "REFUND_FAILED"
            return
        refund.status, refund.gmt_refund = "REFUND_SUCCESS", now()
        if trade.refunded() >= trade.total_amount:
            trade.status, trade.gmt_close = "TRADE_CLOSED", now()  # fully refunded
        self.notify(trade, refund)

    # Notifications -------------------------------------------------------------------------

    def notification(self, trade: FakeTrade, refund: Optional[FakeRefund] = None) -> dict[str, str]:
        amount = money(trade.total_amount)
        params = {
            "gmt_create": cn(trade.gmt_create),
            "charset": "utf-8",
            "seller_email": "shop@example.com",
            "subject": trade.subject,
            "buyer_id": "2088102177846880",
            "invoice_amount": amount,
            "notify_id": now().astimezone(CHINA).strftime("%Y%m%d") + "00222" + secrets.token_hex(12),
            "fund_bill_list": json.dumps([{"amount": amount, "fundChannel": "ALIPAYACCOUNT"}], separators=(",", ":")),
            "notify_type": "trade_status_sync",
            "trade_status": trade.status,
            "receipt_amount": amount,
            "app_id": APP_ID,
            "buyer_pay_amount": amount,
            "sign_type": "RSA2",
            "seller_id": PID,
            "gmt_payment": cn(trade.gmt_payment),
            "notify_time": cn(now()),
            "version": "1.0",
            "out_trade_no": trade.out_trade_no,
            "total_amount": amount,
            "trade_no": trade.trade_no or "",
            "auth_app_id": APP_ID,
            "buyer_logon_id": "159****5620",
            "point_amount": "0.00",
            "gmt_close": cn(trade.gmt_close),
        }
        if refund is not None:
            params.update(
                {
                    "refund_fee": money(trade.refunded()),
                    "out_biz_no": refund.out_request_no,
                    "gmt_refund": refund.gmt_refund.astimezone(CHINA).strftime(TIME_FORMAT) + ".123" if refund.gmt_refund else "",
                }
            )
        return sign_notification(self.key, {k: v for k, v in params.items() if v != ""})

    def notify(self, trade: FakeTrade, refund: Optional[FakeRefund] = None) -> None:
        params = self.notification(trade, refund)
        body = urllib.parse.urlencode(params)
        self.notifications.setdefault(trade.out_trade_no, []).append(
            {
                "notify_id": params["notify_id"],
                "trade_status": trade.status,
                "body": body,
                "refund": refund.out_request_no if refund else None,
            }
        )
        if self.script(trade.out_trade_no).notify == "drop":
            self.record(trade, params["notify_id"], 0, None, None, "lost (scripted)")
            return
        if not trade.notify_url:
            return
        self.spawn(self.deliver(trade, params["notify_id"], body))

    async def deliver(self, trade: FakeTrade, notify_id: str, body: str) -> None:
        for attempt in range(1, len(self.resend) + 2):
            status, answer, error = None, None, None
            try:
                assert self.http is not None
                response = await self.http.post(
                    trade.notify_url,
                    content=body.encode(),
                    headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
                )
                status, answer = response.status_code, response.content[:200].decode("utf-8", "replace")
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"
            self.record(trade, notify_id, attempt, status, answer, error)
            if status == 200 and answer == "success":
                return
            if attempt > len(self.resend):
                return
            await asyncio.sleep(self.resend[attempt - 1])

    def record(
        self, trade: FakeTrade, notify_id: str, attempt: int, status: Optional[int], answer: Optional[str], error: Optional[str]
    ) -> None:
        self.deliveries.setdefault(trade.out_trade_no, []).append(
            {
                "notify_id": notify_id,
                "trade_status": trade.status,
                "attempt": attempt,
                "status_code": status,
                "answer": answer,
                "error": error,
                "at": now().isoformat(),
            }
        )

    # Books ---------------------------------------------------------------------------------

    def ledger(self, order: str) -> dict[str, Any]:
        trade = self.trades.get(order)
        trades = [trade] if trade is not None else []
        captured = sum((t.total_amount for t in trades if t.paid), Decimal(0))
        refunded = sum((t.refunded() for t in trades), Decimal(0))
        return {
            "order": order,
            "currency": "CNY" if trades else None,
            "captured_minor": int(captured * 100),
            "refunded_minor": int(refunded * 100),
            "net_minor": int((captured - refunded) * 100),
            "trades": [
                {
                    "trade_no": t.trade_no,
                    "trade_status": t.status,
                    "total_amount": money(t.total_amount),
                    "paid": t.paid,
                    "refunded_amount": money(t.refunded()),
                }
                for t in trades
            ],
            "refunds": [
                {
                    "out_request_no": r.out_request_no,
                    "trade_no": t.trade_no,
                    "out_trade_no": t.out_trade_no,
                    "refund_amount": money(r.amount),
                    "currency": "CNY",
                    "refund_status": r.status,
                    "submissions": r.submissions,
                }
                for t in trades
                for r in t.refunds.values()
            ],
        }

    def bill_rows(self, day: date) -> list[BillRow]:
        rows = []
        for trade in self.trades.values():
            if trade.paid and trade.gmt_payment.astimezone(CHINA).date() == day:
                rows.append(
                    BillRow(
                        "交易",
                        trade.trade_no or "",
                        trade.out_trade_no,
                        trade.subject,
                        trade.gmt_create,
                        trade.gmt_payment,
                        trade.total_amount,
                    )
                )
            for refund in trade.refunds.values():
                if refund.status == "REFUND_SUCCESS" and refund.gmt_refund.astimezone(CHINA).date() == day:
                    rows.append(
                        BillRow(
                            "退款",
                            trade.trade_no or "",
                            trade.out_trade_no,
                            trade.subject,
                            trade.gmt_create,
                            refund.gmt_refund,
                            refund.amount,
                            refund.out_request_no,
                        )
                    )
        return sorted(rows, key=lambda r: r.finished)

    # The API ------------------------------------------------------------------------------

    def precreate(self, biz: dict[str, Any], params: dict[str, str], base: str) -> dict[str, Any]:
        order = str(biz.get("out_trade_no") or "")
        if not ORDER_RE.match(order):
            raise Answer("40004", "ACQ.INVALID_PARAMETER", "参数无效: out_trade_no")
        amount = str(biz.get("total_amount") or "")
        if not AMOUNT_RE.match(amount) or Decimal(amount) <= 0:
            raise Answer("40004", "ACQ.INVALID_PARAMETER", "参数无效: total_amount")
        if not biz.get("subject"):
            raise Answer("40004", "ACQ.INVALID_PARAMETER", "参数无效: subject")
        expire = None
        if biz.get("time_expire"):
            try:
                expire = datetime.strptime(biz["time_expire"], TIME_FORMAT).replace(tzinfo=CHINA)
            except ValueError:
                raise Answer("40004", "ACQ.INVALID_PARAMETER", "参数无效: time_expire") from None
        trade = self.trades.get(order)
        if trade is not None:
            self.expire(trade)
            if trade.status in ("TRADE_SUCCESS", "TRADE_FINISHED"):
                raise Answer("40004", "ACQ.TRADE_HAS_SUCCESS", "交易已被支付", {"out_trade_no": order})
            if trade.status == "TRADE_CLOSED":
                raise Answer("40004", "ACQ.TRADE_HAS_CLOSE", "交易已经关闭", {"out_trade_no": order})
            if trade.total_amount != Decimal(amount):
                raise Answer("40004", "ACQ.CONTEXT_INCONSISTENT", "交易信息被篡改", {"out_trade_no": order})
            return {"code": "10000", "msg": "Success", "out_trade_no": order, "qr_code": trade.qr_code}
        trade = FakeTrade(
            out_trade_no=order,
            total_amount=Decimal(amount),
            subject=str(biz["subject"]),
            notify_url=params.get("notify_url", ""),
            time_expire=expire,
            qr_code=f"https://qr.alipay.com/bax{secrets.token_hex(10)}",
        )
        self.trades[order] = trade
        return {"code": "10000", "msg": "Success", "out_trade_no": order, "qr_code": trade.qr_code}

    def query(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.find(biz)
        if trade is not None:
            self.expire(trade)
        if trade is None or trade.status == "NOT_SCANNED":
            raise not_exist()
        body = {
            "code": "10000",
            "msg": "Success",
            "buyer_logon_id": "159****5620",
            "buyer_pay_amount": "0.00",
            "out_trade_no": trade.out_trade_no,
            "point_amount": "0.00",
            "receipt_amount": "0.00",
            "total_amount": money(trade.total_amount),
            "trade_no": trade.trade_no,
            "trade_status": trade.status,
            "buyer_user_id": "2088102177846880",
        }
        if trade.paid:
            body.update(
                {
                    "send_pay_date": cn(trade.gmt_payment),
                    "buyer_pay_amount": money(trade.total_amount),
                    "receipt_amount": money(trade.total_amount),
                    "invoice_amount": money(trade.total_amount),
                    "fund_bill_list": [{"amount": money(trade.total_amount), "fund_channel": "ALIPAYACCOUNT"}],
                }
            )
        return body

    def close(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.find(biz)
        if trade is None:
            raise not_exist()
        if self.script(trade.out_trade_no).pay_on_close and trade.status in ("NOT_SCANNED", "WAIT_BUYER_PAY"):
            self.pay(trade, under_way=True)  # the buyer's password went in a moment before our close
        self.expire(trade)
        if trade.status == "NOT_SCANNED":
            raise not_exist()  # no trade until scanned; the QR code lives on until time_expire
        if trade.status != "WAIT_BUYER_PAY":
            raise Answer(
                "40004",
                "ACQ.TRADE_STATUS_ERROR",
                "交易状态不合法",
                {"out_trade_no": trade.out_trade_no, "trade_no": trade.trade_no},
            )
        trade.status, trade.gmt_close = "TRADE_CLOSED", now()
        self.notify(trade)
        return {"code": "10000", "msg": "Success", "out_trade_no": trade.out_trade_no, "trade_no": trade.trade_no}

    def refund(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.find(biz)
        if trade is None or trade.status == "NOT_SCANNED":
            raise not_exist()
        amount = str(biz.get("refund_amount") or "")
        if not AMOUNT_RE.match(amount) or Decimal(amount) <= 0:
            raise Answer("40004", "ACQ.INVALID_PARAMETER", "参数无效: refund_amount")
        request_no = str(biz.get("out_request_no") or trade.out_trade_no)
        existing = trade.refunds.get(request_no)

        def answer(fund_change: str) -> dict[str, Any]:
            return {
                "code": "10000",
                "msg": "Success",
                "buyer_logon_id": "159****5620",
                "buyer_user_id": "2088102177846880",
                "fund_change": fund_change,
                "gmt_refund_pay": cn(now()),
                "out_trade_no": trade.out_trade_no,
                "refund_fee": money(trade.refunded()),
                "send_back_fee": "0.00",
                "trade_no": trade.trade_no,
            }

        if existing is not None:
            if existing.amount != Decimal(amount):
                raise Answer("40004", "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额与原请求不一致")
            existing.submissions += 1
            return answer("N")  # nothing refunded twice
        if not trade.paid:
            raise Answer("40004", "ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
        if trade.status == "TRADE_CLOSED":
            raise Answer("40004", "ACQ.TRADE_HAS_CLOSE", "交易已经关闭")
        if trade.refunded(processing=True) + Decimal(amount) > trade.total_amount:
            raise Answer("40004", "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限")
        refund = FakeRefund(out_request_no=request_no, amount=Decimal(amount))
        trade.refunds[request_no] = refund
        script = self.script(trade.out_trade_no)
        if script.refund == "processing":
            self.spawn(
                self.later(script.refund_processing_seconds, lambda: self.finish_refund(trade, refund, script.refund_outcome))
            )
            return answer("N")
        self.finish_refund(trade, refund, "success")
        return answer("Y")

    def refund_query(self, biz: dict[str, Any]) -> dict[str, Any]:
        trade = self.find(biz)
        if trade is None or trade.status == "NOT_SCANNED":
            raise not_exist()
        refund = trade.refunds.get(str(biz.get("out_request_no") or trade.out_trade_no))
        if refund is None or refund.status == "REFUND_FAILED":
            return {"code": "10000", "msg": "Success"}  # no such refund: an empty success
        body = {
            "code": "10000",
            "msg": "Success",
            "out_request_no": refund.out_request_no,
            "out_trade_no": trade.out_trade_no,
            "trade_no": trade.trade_no,
            "refund_amount": money(refund.amount),
            "total_amount": money(trade.total_amount),
        }
        if refund.status == "REFUND_SUCCESS":
            body["refund_status"] = "REFUND_SUCCESS"
            if "gmt_refund_pay" in (biz.get("query_options") or []):
                body["gmt_refund_pay"] = cn(refund.gmt_refund)
        return body

    def bill_url(self, biz: dict[str, Any], base: str) -> dict[str, Any]:
        if biz.get("bill_type") != "trade":
            raise Answer("40004", "isv.invalid-bill-type", "账单类型不正确")
        try:
            day = date.fromisoformat(str(biz.get("bill_date")))
        except ValueError:
            raise Answer("40004", "isv.invalid-bill-date", "账单时间格式不正确") from None
        if day > now().astimezone(CHINA).date():
            raise Answer("40004", "isp.bill_not_exist", "账单不存在")
        stamp = day.strftime("%Y%m%d")
        query = urllib.parse.urlencode(
            {
                "bizType": "trade",
                "userId": PID,
                "fileType": "csv.zip",
                "bizDates": stamp,
                "downloadFileName": f"{PID}0156_{stamp}.csv.zip",
                "fileId": f"/trade/{PID}/{stamp}",
                "timestamp": int(now().timestamp()),
            }
        )
        return {"code": "10000", "msg": "Success", "bill_download_url": f"{base}/downloadBillFile.resource?{query}"}


# --- The application ----------------------------------------------------------------------------


def render(method: str, inner: dict[str, Any], key: Optional[rsa.RSAPrivateKey]) -> Response:
    """The gateway's answer: the inner object written once (spaces, non-ASCII kept), signed
    over exactly that text when ``key`` is given."""
    raw = json.dumps(inner, ensure_ascii=False)
    name = "error_response" if method == "" else method.replace(".", "_") + "_response"
    body = "{" + json.dumps(name) + ":" + raw + (',"sign":"' + rsa2(key, raw) + '"' if key is not None else "") + "}"
    return Response(body.encode("utf-8"), media_type="text/html;charset=utf-8")


def create_app(keys: Path, resend: list[float]) -> FastAPI:
    alipay = Alipay(keys, resend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=5) as http:
            alipay.http = http
            sweeper = asyncio.create_task(sweep())
            yield
            sweeper.cancel()
            for task in list(alipay.tasks):
                task.cancel()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(0.5)
            for trade in list(alipay.trades.values()):
                alipay.expire(trade)

    app = FastAPI(title="fake Alipay open platform", lifespan=lifespan)
    app.state.alipay = alipay

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def params_of(request: Request) -> dict[str, str]:
        params = dict(request.query_params)
        if request.method == "POST":
            body = (await request.body()).decode(params.get("charset") or "utf-8", "replace")
            params.update(urllib.parse.parse_qsl(body, keep_blank_values=True))
        return params

    @app.api_route("/gateway.do", methods=["GET", "POST"])
    async def gateway(request: Request) -> Response:
        params = await params_of(request)
        method = params.get("method", "")
        if not method:
            return render(
                "",
                {
                    "code": "40001",
                    "msg": "Missing Required Arguments",
                    "sub_code": "isv.missing-method",
                    "sub_msg": "缺少方法名参数",
                },
                None,
            )
        if method not in METHODS:
            return render(
                "",
                {
                    "code": "40002",
                    "msg": "Invalid Arguments",
                    "sub_code": "isv.invalid-method",
                    "sub_msg": f"不存在的方法名: {method}",
                },
                None,
            )
        try:
            check_common(params)
            biz = json.loads(params.get("biz_content") or "{}")
            if not isinstance(biz, dict):
                raise ValueError
        except Answer as err:
            if method == "alipay.trade.page.pay":
                return HTMLResponse(
                    f"<html><body><h1>支付宝 - 错误</h1><p>错误代码: {err.sub_code}</p><p>{err.sub_msg}</p></body></html>"
                )
            return render(method, {"code": err.code, "msg": err.msg, "sub_code": err.sub_code, "sub_msg": err.sub_msg}, None)
        except ValueError:
            return render(
                method,
                {
                    "code": "40002",
                    "msg": "Invalid Arguments",
                    "sub_code": "isv.invalid-parameter",
                    "sub_msg": "biz_content 不是 JSON 对象",
                },
                None,
            )
        if method == "alipay.trade.page.pay":
            return HTMLResponse(
                f"<html><head><meta charset='utf-8'><title>支付宝 - 网上支付 安全快速！</title></head>"
                f"<body><h1>收银台</h1><p>订单号 {biz.get('out_trade_no')}</p>"
                f"<p>应付金额 {biz.get('total_amount')} 元</p></body></html>"
            )
        order = str(biz.get("out_trade_no") or alipay.by_trade_no.get(str(biz.get("trade_no") or ""), ""))
        alipay.calls.setdefault(order, Counter())[method] += 1
        failure = alipay.failure(order, method)
        base = str(request.base_url).rstrip("/")
        if failure is not None and not failure.after:
            return failed(method, failure)
        try:
            inner = dispatch(method, biz, params, base)
        except Answer as err:
            inner = {"code": err.code, "msg": err.msg, "sub_code": err.sub_code, "sub_msg": err.sub_msg, **err.extra}
        if failure is not None:
            return failed(method, failure)  # the work is done; the answer is lost
        return render(method, inner, alipay.key if inner["code"] != "40002" else None)

    def check_common(params: dict[str, str]) -> None:
        if params.get("app_id") != APP_ID:
            raise Answer("40002", "isv.invalid-app-id", "无效的AppID参数")
        if not params.get("sign"):
            raise Answer("40001", "isv.missing-signature", "缺少签名参数")
        if params.get("sign_type") != "RSA2":
            raise Answer("40002", "isv.invalid-signature-type", "无效的签名类型")
        for name in ("timestamp", "version", "charset"):
            if not params.get(name):
                raise Answer("40001", f"isv.missing-{name}", f"缺少{name}参数")
        try:
            datetime.strptime(params["timestamp"], TIME_FORMAT)
        except ValueError:
            raise Answer("40002", "isv.invalid-timestamp", "非法的时间戳参数") from None
        if params.get("format", "JSON").upper() != "JSON" or params["charset"].lower() != "utf-8":
            raise Answer("40002", "isv.invalid-parameter", "format/charset")
        if not rsa2_ok(alipay.app_public, unsigned_string(params, ("sign",)), params["sign"]):
            raise Answer("40002", "isv.invalid-signature", "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配")

    def dispatch(method: str, biz: dict[str, Any], params: dict[str, str], base: str) -> dict[str, Any]:
        if method == "alipay.trade.precreate":
            return alipay.precreate(biz, params, base)
        if method == "alipay.trade.query":
            return alipay.query(biz)
        if method == "alipay.trade.close":
            return alipay.close(biz)
        if method == "alipay.trade.refund":
            return alipay.refund(biz)
        if method == "alipay.trade.fastpay.refund.query":
            return alipay.refund_query(biz)
        return alipay.bill_url(biz, base)

    def failed(method: str, failure: Failure) -> Response:
        if failure.http_status >= 500:
            return HTMLResponse("<html><body>502 Bad Gateway</body></html>", status_code=failure.http_status)
        code = failure.code
        return render(
            method,
            {"code": code, "msg": Answer(code, "", "").msg, "sub_code": failure.sub_code, "sub_msg": failure.sub_msg},
            alipay.key if code in ("10000", "20000", "40004") else None,
        )

    @app.get("/downloadBillFile.resource")
    async def download_bill(bizDates: str = Query(...), userId: str = Query(...)) -> Response:
        day = datetime.strptime(bizDates, "%Y%m%d").date()
        data = bill_zip(PID, day, alipay.bill_rows(day), alipay.adjustments.get(day, Adjustments()), now())

        async def pieces():
            for start in range(0, len(data), 1000):  # in small pieces, as a slow download arrives
                yield data[start : start + 1000]

        from fastapi.responses import StreamingResponse

        return StreamingResponse(
            pieces(),
            media_type="application/oct-stream",
            headers={"Content-Disposition": f"attachment; filename={PID}0156_{bizDates}.csv.zip"},
        )

    # Control ----------------------------------------------------------------------------

    @app.get("/control/ledger")
    async def ledgers(order: list[str] = Query(default_factory=list, max_length=500)):
        return {"orders": {name: alipay.ledger(name) for name in order}}

    @app.get("/control/ledger/{order}")
    async def ledger(order: str):
        return alipay.ledger(order)

    @app.post("/control/pay/{order}")
    async def pay(order: str, request: Request):
        raw = await request.body()
        body = PayBody.model_validate_json(raw) if raw.strip() else PayBody()
        trade = alipay.trades.get(order)
        if trade is None:
            return JSONResponse({"error": f"no trade for {order}"}, status_code=404)
        if (why := alipay.pay(trade, body.amount, body.scan_only)) is not None:
            return JSONResponse({"error": why, "trade": trade.out()}, status_code=409)
        return {"trade": trade.out()}

    @app.put("/control/scripts/{order}")
    async def put_script(order: str, script: Script):
        alipay.scripts[order] = script
        alipay.failures_left[order] = [[failure, failure.times] for failure in script.failures]
        return {"order": order, "script": script.model_dump()}

    @app.post("/control/fail")
    async def fail(failure: Failure):
        """Answer the next ``times`` calls of ``method`` (any order) with the failure."""
        alipay.global_failures.append([failure, failure.times])
        return {"failure": failure.model_dump()}

    @app.get("/control/trades/{order}")
    async def trade_view(order: str):
        trade = alipay.trades.get(order)
        return {
            "trade": trade.out() if trade else None,
            "script": alipay.script(order).model_dump(),
            "calls": dict(alipay.calls.get(order, Counter())),
            "deliveries": alipay.deliveries.get(order, []),
            "notifications": alipay.notifications.get(order, []),
        }

    @app.post("/control/orphans")
    async def orphan(body: Orphan):
        """A trade paid at Alipay for an order the merchant never made (no notification)."""
        trade = FakeTrade(
            out_trade_no=body.out_trade_no,
            total_amount=Decimal(body.total_amount),
            subject="paid elsewhere",
            notify_url="",
            time_expire=None,
            qr_code="",
        )
        alipay.trades[trade.out_trade_no] = trade
        alipay.pay(trade)
        return {"trade": trade.out()}

    @app.put("/control/bills/{day}/adjustments")
    async def adjust(day: date, body: BillAdjust):
        try:
            for value in body.amounts.values():
                Decimal(value)
        except InvalidOperation:
            return JSONResponse({"error": "amounts must be decimals"}, status_code=422)
        alipay.adjustments[day] = Adjustments(body.amounts, body.drop_orders, body.extra_lines)
        return {"day": str(day), "adjustments": body.model_dump()}

    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake-alipay %(levelname)s %(message)s")
    resend = [float(x) for x in os.environ.get("ALIPAY_FAKE_RESEND_SECONDS", DEFAULT_RESEND).split(",") if x.strip()]
    app = create_app(Path(os.environ["ALIPAY_FAKE_KEYS"]), resend)
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["ALIPAY_FAKE_PORT"]), log_level="warning")


if __name__ == "__main__":
    main()
