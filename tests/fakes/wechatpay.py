"""A protocol-faithful fake of WeChat Pay API v3 (direct merchant, Native pay), for tests.

Provider API (each request's Authorization signature is checked with the merchant's public
key; every answer is signed with the fake's "WeChat Pay public key" pair, whose id is
``PUB_KEY_ID_...``):

- ``POST /v3/pay/transactions/native`` -> ``{"code_url"}``; the same order number with the
  same parameters answers the same code_url, other parameters OUT_TRADE_NO_USED.
- ``GET /v3/pay/transactions/out-trade-no/{out_trade_no}?mchid=`` and
  ``GET /v3/pay/transactions/id/{transaction_id}?mchid=``: the transaction (404 ORDER_NOT_EXIST).
- ``POST /v3/pay/transactions/out-trade-no/{out_trade_no}/close`` -> 204.
- ``POST /v3/refund/domestic/refunds``, ``GET /v3/refund/domestic/refunds/{out_refund_no}``.
- ``GET /v3/bill/tradebill?bill_date=&bill_type=ALL&tar_type=GZIP`` and the download URL it
  gives (``/v3/billdownload/file?token=``).

Notifications (TRANSACTION.SUCCESS, REFUND.*) are AEAD_AES_256_GCM-encrypted with the APIv3
key, signed, and resent on WeChat Pay's schedule (compressed) until answered 200/204.

Control API: ``GET /health``; ``GET /control/ledger?order=``; ``PUT /control/scripts/{order}``
(see ``Script``); ``POST /control/pay/{order}`` (``{"amount": fen}`` optional);
``POST /control/userpaying/{order}``; ``POST /control/fail`` (``{"route", "code", "times"}``:
the next calls of a route, any order); ``GET /control/trades/{order}`` (trade, refunds,
calls, deliveries); ``POST /control/notify/{order}`` (send one crafted notification:
tampered, wrong key, stale, a replay; answers what the receiver said);
``PUT /control/bills/{day}/adjustments``; ``POST /control/tamper`` (answers altered after
signing, bills with a wrong hash); ``GET /control/signature-failures``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from paysentinel.providers import wechatpay_sign as sign
from paysentinel.providers.wechatpay_bill import CHINA, render_bill
from tests.fakes import FakeSetup

log = logging.getLogger("tests.fakes.wechatpay")

MCHID = "1900009191"
APPID = "wxd678efh567hg6787"
PUBLIC_KEY_ID = "PUB_KEY_ID_0119000091912025112300181500000"
# WeChat Pay's resend schedule (15s/15s/30s/3m/10m/20m/30m/30m/30m/60m/3h/3h/3h/6h/6h), compressed.
RESEND_SECONDS = [0.5, 0.5, 1, 2, 4, 4, 4]
OPERATIONS = ("create", "query", "close", "refund", "refund_query", "bill")
CODE_STATUS = {
    "SYSTEM_ERROR": 500,
    "BANK_ERROR": 500,
    "FREQUENCY_LIMITED": 429,
    "PARAM_ERROR": 400,
    "INVALID_REQUEST": 400,
    "ORDER_CLOSED": 400,
    "ORDERPAID": 400,
    "NOT_ENOUGH": 403,
    "USER_ACCOUNT_ABNORMAL": 403,
    "OUT_TRADE_NO_USED": 403,
    "SIGN_ERROR": 401,
    "NO_AUTH": 403,
    "RULE_LIMIT": 403,
    "TRADE_ERROR": 403,
    "ORDER_NOT_EXIST": 404,
    "RESOURCE_NOT_EXISTS": 404,
    "MCH_NOT_EXISTS": 400,
    "APPID_MCHID_NOT_MATCH": 400,
    "NO_STATEMENT_EXIST": 400,
}


# --- Keys and setup -----------------------------------------------------------------------


def _new_rsa():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _private_pem(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def _public_pem(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def prepare(directory: Path, port: int, webhook_url: str) -> FakeSetup:
    """The session's keys: the merchant's pair (the system signs with the private half, the
    fake verifies with the public half), WeChat Pay's pair (the fake signs, the system has the
    public key inline, with its id) and the APIv3 key."""
    directory.mkdir(parents=True, exist_ok=True)
    merchant, platform = _new_rsa(), _new_rsa()
    serial = secrets.token_hex(20).upper()
    apiv3_key = secrets.token_hex(16)  # 32 ASCII characters
    files = {
        "merchant_private.pem": _private_pem(merchant),
        "merchant_public.pem": _public_pem(merchant),
        "platform_private.pem": _private_pem(platform),
        "platform_public.pem": _public_pem(platform),
        "apiv3.key": apiv3_key,
    }
    for name, text in files.items():
        (directory / name).write_text(text)
        os.chmod(directory / name, 0o600)
    config = {
        "port": port,
        "mchid": MCHID,
        "appid": APPID,
        "merchant_serial": serial,
        "public_key_id": PUBLIC_KEY_ID,
        "directory": str(directory),
        "webhook_url": webhook_url,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return FakeSetup(
        app_env={
            "PAYSENTINEL_WECHATPAY_MCHID": MCHID,
            "PAYSENTINEL_WECHATPAY_APPID": APPID,
            "PAYSENTINEL_WECHATPAY_API_URL": f"http://127.0.0.1:{port}",
            "PAYSENTINEL_WECHATPAY_CERT_SERIAL": serial,
            "PAYSENTINEL_WECHATPAY_PRIVATE_KEY_FILE": str(directory / "merchant_private.pem"),
            "PAYSENTINEL_WECHATPAY_APIV3_KEY_FILE": str(directory / "apiv3.key"),
            # Inline, one line with literal \n escapes (as an environment variable holds it).
            "PAYSENTINEL_WECHATPAY_PUBLIC_KEY": files["platform_public.pem"].strip().replace("\n", "\\n"),
            "PAYSENTINEL_WECHATPAY_PUBLIC_KEY_ID": PUBLIC_KEY_ID,
        },
        fake_env={"WECHATPAY_FAKE_CONFIG": str(directory / "config.json")},
    )


@dataclass
class Keys:
    mchid: str
    appid: str
    merchant_serial: str
    public_key_id: str
    merchant_public: Any
    platform_private: Any
    apiv3_key: str

    @classmethod
    def load(cls, config_path: str) -> tuple["Keys", dict[str, Any]]:
        config = json.loads(Path(config_path).read_text())
        d = Path(config["directory"])
        return cls(
            mchid=config["mchid"],
            appid=config["appid"],
            merchant_serial=config["merchant_serial"],
            public_key_id=config["public_key_id"],
            merchant_public=sign.load_public_key((d / "merchant_public.pem").read_text()),
            platform_private=sign.load_private_key((d / "platform_private.pem").read_text()),
            apiv3_key=(d / "apiv3.key").read_text().strip(),
        ), config


# --- Scripts ------------------------------------------------------------------------------


class ErrorScript(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = "SYSTEM_ERROR"
    times: int = Field(1, ge=-1, description="-1: every call")
    status: Optional[int] = None
    after: bool = Field(False, description="do the work, then answer the error (the answer is lost)")


class Script(BaseModel):
    """What the payer and WeChat Pay do for one order; unscripted orders wait for the payer."""

    model_config = ConfigDict(extra="forbid")
    pay: Literal["never", "immediately", "after_delay"] = "never"
    pay_delay_seconds: float = Field(1.0, ge=0)
    paid_amount: Optional[int] = Field(None, ge=1, description="fen the payer pays (the trade shows it)")
    notify: Literal["normal", "drop"] = "normal"
    userpaying: bool = Field(False, description="the payer scans and enters the password slowly: USERPAYING")
    userpaying_then: Literal["stay", "pay", "fail"] = "stay"
    userpaying_seconds: float = Field(0.0, ge=0)
    pay_while_closing: bool = Field(False, description="the payer's payment lands just before a close")
    refund: Literal["succeed", "abnormal", "closed"] = "succeed"
    refund_processing_seconds: float = Field(0.0, ge=0)
    errors: dict[str, ErrorScript] = Field(default_factory=dict)


class GlobalFail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    route: Literal["create", "query", "close", "refund", "refund_query", "bill"]
    code: str = "SYSTEM_ERROR"
    times: int = Field(1, ge=1)
    status: Optional[int] = None


class PayBody(BaseModel):
    amount: Optional[int] = Field(None, ge=1)


class Craft(BaseModel):
    """One crafted TRANSACTION.SUCCESS notification for an order (paid or not)."""

    model_config = ConfigDict(extra="forbid")
    tamper: bool = False  # the body changed after signing
    wrong_key: bool = False  # signed with a key that is not WeChat Pay's
    wrong_serial: bool = False  # Wechatpay-Serial names another key
    stale: bool = False  # the timestamp an hour old
    wrong_apiv3_key: bool = False  # the resource encrypted with another key
    replay: bool = False  # the last notification sent for the order, again (same id and body)
    amount: Optional[int] = None


class Adjustments(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amounts: dict[str, int] = Field(default_factory=dict)  # order -> fen the bill claims
    drop_orders: list[str] = Field(default_factory=list)
    refund_amounts: dict[str, int] = Field(default_factory=dict)  # out_refund_no -> fen
    drop_refunds: list[str] = Field(default_factory=list)


# --- State --------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _rfc3339(moment: Optional[datetime]) -> Optional[str]:
    return moment.astimezone(CHINA).replace(microsecond=0).isoformat() if moment else None


def _digits(n: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(n))


@dataclass
class FakeRefund:
    out_refund_no: str
    refund_id: str
    transaction_id: str
    out_trade_no: str
    refund: int
    total: int
    currency: str
    reason: str
    notify_url: Optional[str]
    status: str = "PROCESSING"
    create_time: datetime = field(default_factory=_now)
    success_time: Optional[datetime] = None

    def out(self) -> dict[str, Any]:
        return {
            "refund_id": self.refund_id,
            "out_refund_no": self.out_refund_no,
            "transaction_id": self.transaction_id,
            "out_trade_no": self.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": "支付用户零钱",
            "success_time": _rfc3339(self.success_time),
            "create_time": _rfc3339(self.create_time),
            "status": self.status,
            "funds_account": "AVAILABLE",
            "amount": {
                "total": self.total,
                "refund": self.refund,
                "payer_total": self.total,
                "payer_refund": self.refund,
                "settlement_refund": self.refund,
                "settlement_total": self.total,
                "discount_refund": 0,
                "currency": self.currency,
                "refund_fee": 0,
            },
        }


@dataclass
class FakeTrade:
    out_trade_no: str
    appid: str
    mchid: str
    description: str
    notify_url: str
    total: int
    currency: str
    time_expire: Optional[datetime]
    code_url: str
    request: dict[str, Any]
    trade_state: str = "NOTPAY"
    transaction_id: Optional[str] = None
    success_time: Optional[datetime] = None
    create_time: datetime = field(default_factory=_now)
    refunds: dict[str, FakeRefund] = field(default_factory=dict)

    @property
    def paid(self) -> bool:
        return self.trade_state in ("SUCCESS", "REFUND")

    def refunded(self, *, including_processing: bool = False) -> int:
        counted = ("SUCCESS", "PROCESSING") if including_processing else ("SUCCESS",)
        return sum(r.refund for r in self.refunds.values() if r.status in counted)

    def out(self, mchid: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "appid": self.appid,
            "mchid": mchid,
            "out_trade_no": self.out_trade_no,
            "trade_state": self.trade_state,
            "trade_state_desc": {
                "NOTPAY": "未支付",
                "SUCCESS": "支付成功",
                "REFUND": "转入退款",
                "CLOSED": "已关闭",
                "USERPAYING": "用户支付中",
                "PAYERROR": "支付失败",
                "REVOKED": "已撤销",
            }[self.trade_state],
            "amount": {"total": self.total, "currency": self.currency},
            "attach": "",
        }
        if self.transaction_id:
            body.update(
                {
                    "transaction_id": self.transaction_id,
                    "trade_type": "NATIVE",
                    "bank_type": "OTHERS",
                    "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
                }
            )
        if self.paid:
            body["success_time"] = _rfc3339(self.success_time)
            body["amount"].update({"payer_total": self.total, "payer_currency": self.currency})
        return body


class WeChatPayFake:
    def __init__(self, keys: Keys, config: dict[str, Any]):
        self.keys = keys
        self.base_url = f"http://127.0.0.1:{config['port']}"
        self.trades: dict[str, FakeTrade] = {}
        self.by_transaction: dict[str, str] = {}
        self.refunds: dict[str, FakeRefund] = {}
        self.scripts: dict[str, Script] = {}
        self.errors_left: dict[str, dict[str, int]] = {}
        self.global_fails: dict[str, GlobalFail] = {}
        self.global_left: dict[str, int] = {}
        self.calls: dict[str, dict[str, int]] = {}
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.last_notification: dict[str, bytes] = {}
        self.adjustments: dict[str, Adjustments] = {}
        self.bill_files: dict[str, bytes] = {}
        self.signature_failures: list[str] = []
        self.tamper_answers = 0  # the next answers' bodies change after signing
        self.corrupt_bill_hash = 0  # the next bill answers give a wrong hash_value
        self.resend = [float(s) for s in os.environ.get("WECHATPAY_FAKE_RESEND_SECONDS", "").split(",") if s] or RESEND_SECONDS
        self.http: Optional[httpx.AsyncClient] = None
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def later(self, delay: float, action) -> None:
        await asyncio.sleep(delay)
        action()

    def script(self, order: str) -> Script:
        return self.scripts.get(order) or Script()

    # Answers ------------------------------------------------------------------------

    def answer(self, status: int, body: Optional[dict[str, Any]] = None) -> Response:
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if body is not None else b""
        headers = sign.signed_headers(self.keys.platform_private, self.keys.public_key_id, raw)
        headers["Request-ID"] = uuid.uuid4().hex
        if self.tamper_answers > 0 and raw:
            self.tamper_answers -= 1
            raw = raw[:-1] + b' ,"tampered":true}'
        return Response(raw, status_code=status, headers=headers, media_type="application/json" if body is not None else None)

    def error(self, code: str, message: str, status: Optional[int] = None) -> Response:
        return self.answer(status or CODE_STATUS.get(code, 400), {"code": code, "message": message})

    def fault(self, order: Optional[str], op: str) -> Optional[ErrorScript]:
        """Count the call; the scripted error due now, if any."""
        if order:
            self.calls.setdefault(order, {o: 0 for o in OPERATIONS})[op] += 1
        if self.global_left.get(op, 0) > 0:
            self.global_left[op] -= 1
            fail = self.global_fails[op]
            return ErrorScript(code=fail.code, status=fail.status)
        if order is None:
            return None
        left = self.errors_left.get(order, {}).get(op, 0)
        if left == 0:
            return None
        if left > 0:
            self.errors_left[order][op] = left - 1
        return self.script(order).errors[op]

    def failed(self, fault: ErrorScript) -> Response:
        return self.error(fault.code, f"scripted {fault.code}", fault.status)

    async def verify_request(self, request: Request) -> Optional[Response]:
        """The merchant's Authorization signature, as WeChat Pay checks it: 401 SIGN_ERROR
        (unsigned) when it does not verify."""
        body = await request.body()
        raw_path = request.scope.get("raw_path", request.url.path.encode()).decode()
        query = request.scope.get("query_string", b"").decode()
        path = raw_path + (f"?{query}" if query else "")
        try:
            params = sign.parse_authorization(request.headers.get("authorization", ""))
            if params["mchid"] != self.keys.mchid:
                raise ValueError(f"mchid {params['mchid']} is not {self.keys.mchid}")
            if params["serial_no"] != self.keys.merchant_serial:
                raise ValueError(f"serial_no {params['serial_no']} is not the merchant certificate's")
            if abs(time.time() - int(params["timestamp"])) > 300:
                raise ValueError("timestamp more than 5 minutes away")
            message = sign.request_message(request.method, path, params["timestamp"], params["nonce_str"], body)
            if not sign.rsa_verify(self.keys.merchant_public, message, params["signature"]):
                raise ValueError(f"signature does not verify over {request.method} {path}")
        except ValueError as err:
            self.signature_failures.append(f"{request.method} {path}: {err}")
            log.warning("SIGN_ERROR %s %s: %s", request.method, path, err)
            return JSONResponse({"code": "SIGN_ERROR", "message": f"签名错误: {err}"}, status_code=401)
        return None

    # Trade lifecycle ------------------------------------------------------------------

    def expired(self, trade: FakeTrade) -> bool:
        return trade.time_expire is not None and _now() > trade.time_expire

    def pay(self, trade: FakeTrade, amount: Optional[int] = None, *, force: bool = False) -> Optional[str]:
        if trade.paid:
            return "the trade is already paid"
        if trade.trade_state not in ("NOTPAY", "USERPAYING"):
            return f"the trade is {trade.trade_state}"
        if self.expired(trade) and not force and trade.trade_state == "NOTPAY":
            return "the trade expired"
        amount = amount or self.script(trade.out_trade_no).paid_amount
        if amount:
            trade.total = amount
        trade.trade_state = "SUCCESS"
        trade.transaction_id = "4200" + _now().astimezone(CHINA).strftime("%Y%m%d") + _digits(16)
        trade.success_time = _now()
        self.by_transaction[trade.transaction_id] = trade.out_trade_no
        log.info("trade %s paid (%s)", trade.out_trade_no, trade.transaction_id)
        self.notify_transaction(trade)
        return None

    def scan(self, trade: FakeTrade) -> None:
        """The payer scans the code (the script says what happens then)."""
        script = self.script(trade.out_trade_no)
        if not script.userpaying:
            self.pay(trade)
            return
        if trade.trade_state != "NOTPAY":
            return
        trade.trade_state = "USERPAYING"
        if script.userpaying_then == "pay":
            self.spawn(self.later(script.userpaying_seconds, lambda: self.pay(trade, force=True)))
        elif script.userpaying_then == "fail":
            self.spawn(self.later(script.userpaying_seconds, lambda: self.fail_payment(trade)))

    def fail_payment(self, trade: FakeTrade) -> None:
        if trade.trade_state == "USERPAYING":
            trade.trade_state = "PAYERROR"

    # Notifications --------------------------------------------------------------------

    def notification(
        self,
        event_type: str,
        summary: str,
        resource: dict[str, Any],
        original_type: str,
        associated_data: str,
        *,
        apiv3_key: Optional[str] = None,
    ) -> bytes:
        plaintext = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
        event = {
            "id": str(uuid.uuid4()),
            "create_time": _rfc3339(_now()),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": sign.encrypt_resource(apiv3_key or self.keys.apiv3_key, plaintext, associated_data, original_type),
        }
        return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()

    def notify_transaction(self, trade: FakeTrade) -> None:
        body = self.notification("TRANSACTION.SUCCESS", "支付成功", trade.out(self.keys.mchid), "transaction", "transaction")
        self.last_notification[trade.out_trade_no] = body
        if self.script(trade.out_trade_no).notify == "drop":
            log.info("notification for %s lost (scripted)", trade.out_trade_no)
            self.deliveries.setdefault(trade.out_trade_no, []).append({"event": "TRANSACTION.SUCCESS", "lost": True})
            return
        self.spawn(self.deliver(trade.out_trade_no, trade.notify_url, body, "TRANSACTION.SUCCESS"))

    def notify_refund(self, refund: FakeRefund) -> None:
        if not refund.notify_url:
            return
        resource = {
            "mchid": self.keys.mchid,
            "out_trade_no": refund.out_trade_no,
            "transaction_id": refund.transaction_id,
            "out_refund_no": refund.out_refund_no,
            "refund_id": refund.refund_id,
            "refund_status": refund.status,
            "success_time": _rfc3339(refund.success_time),
            "user_received_account": "支付用户零钱",
            "amount": {
                "total": refund.total,
                "refund": refund.refund,
                "payer_total": refund.total,
                "payer_refund": refund.refund,
            },
        }
        event = f"REFUND.{refund.status}"
        body = self.notification(event, "退款状态", resource, "refund", "refund")
        self.spawn(self.deliver(refund.out_trade_no, refund.notify_url, body, event))

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        assert self.http is not None
        try:
            response = await self.http.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
            return response.status_code, response.text
        except httpx.HTTPError as err:
            return 0, repr(err)

    async def deliver(self, order: str, url: str, body: bytes, event: str) -> None:
        """Send until answered 200/204, on the (compressed) resend schedule."""
        event_id = json.loads(body)["id"]
        for attempt in range(len(self.resend) + 1):
            headers = sign.signed_headers(self.keys.platform_private, self.keys.public_key_id, body)
            status, text = await self.send(url, body, headers)
            self.deliveries.setdefault(order, []).append(
                {"event": event, "id": event_id, "attempt": attempt + 1, "status_code": status, "answer": text[:300]}
            )
            if status in (200, 204):
                return
            if attempt < len(self.resend):
                await asyncio.sleep(self.resend[attempt])
        log.warning("notification %s for %s never acknowledged", event_id, order)

    async def craft(self, order: str, craft: Craft) -> dict[str, Any]:
        trade = self.trades.get(order)
        if trade is None:
            return {"error": "no such trade"}
        if craft.replay:
            body = self.last_notification.get(order)
            if body is None:
                return {"error": "nothing sent yet"}
        else:
            claimed = trade.out(self.keys.mchid)
            claimed.update(
                {
                    "trade_state": "SUCCESS",
                    "success_time": _rfc3339(_now()),
                    "transaction_id": trade.transaction_id or "4200" + _digits(24),
                    "trade_type": "NATIVE",
                    "bank_type": "OTHERS",
                }
            )
            if craft.amount:
                claimed["amount"] = {"total": craft.amount, "currency": trade.currency, "payer_total": craft.amount}
            body = self.notification(
                "TRANSACTION.SUCCESS",
                "支付成功",
                claimed,
                "transaction",
                "transaction",
                apiv3_key=secrets.token_hex(16) if craft.wrong_apiv3_key else None,
            )
        key = _new_rsa() if craft.wrong_key else self.keys.platform_private
        timestamp = int(time.time()) - 3600 if craft.stale else None
        serial = "PUB_KEY_ID_0000000000000000000000000000000000" if craft.wrong_serial else self.keys.public_key_id
        headers = sign.signed_headers(key, serial, body, timestamp=timestamp)
        if craft.tamper:
            body = body.replace(b'"summary":"', b'"summary":"X', 1)
        status, text = await self.send(trade.notify_url, body, headers)
        return {"status_code": status, "answer": text, "id": json.loads(body)["id"]}

    # Refunds -------------------------------------------------------------------------

    def finish_refund(self, refund: FakeRefund) -> None:
        if refund.status != "PROCESSING":
            return
        outcome = self.script(refund.out_trade_no).refund
        if outcome == "succeed":
            refund.status, refund.success_time = "SUCCESS", _now()
            trade = self.trades[refund.out_trade_no]
            trade.trade_state = "REFUND"
        else:
            refund.status = "ABNORMAL" if outcome == "abnormal" else "CLOSED"
        log.info("refund %s %s", refund.out_refund_no, refund.status)
        self.notify_refund(refund)

    # Books and bills -----------------------------------------------------------------

    def ledger(self, order: str) -> dict[str, Any]:
        trade = self.trades.get(order)
        trades = [trade] if trade else []
        captured = sum(t.total for t in trades if t.paid)
        refunded = sum(t.refunded() for t in trades)
        return {
            "order": order,
            "currency": trade.currency if trade else None,
            "captured_minor": captured,
            "refunded_minor": refunded,
            "net_minor": captured - refunded,
            "trades": [
                {
                    "trade_no": t.transaction_id,
                    "trade_status": t.trade_state,
                    "total_amount": f"{t.total / 100:.2f}",
                    "paid": t.paid,
                    "refunded_amount": f"{t.refunded() / 100:.2f}",
                }
                for t in trades
            ],
            "refunds": [
                {
                    "out_request_no": r.out_refund_no,
                    "refund_amount": f"{r.refund / 100:.2f}",
                    "refund_status": r.status,
                    "refund_id": r.refund_id,
                }
                for t in trades
                for r in t.refunds.values()
            ],
        }

    def bill_rows(self, day: date) -> list[dict[str, str]]:
        adjust = self.adjustments.get(day.isoformat()) or Adjustments()
        rows: list[tuple[datetime, dict[str, str]]] = []

        def on_day(moment: Optional[datetime]) -> bool:
            return moment is not None and moment.astimezone(CHINA).date() == day

        def yuan(fen: int) -> str:
            return f"{fen / 100:.2f}"

        for trade in self.trades.values():
            base = {
                "公众账号ID": trade.appid,
                "商户号": self.keys.mchid,
                "特约商户号": "0",
                "设备号": "",
                "微信订单号": trade.transaction_id or "",
                "商户订单号": trade.out_trade_no,
                "用户标识": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
                "交易类型": "NATIVE",
                "付款银行": "OTHERS",
                "货币种类": trade.currency,
                "代金券金额": "0.00",
                "充值券退款金额": "0.00",
                "商品名称": trade.description.replace(",", " "),
                "商户数据包": "",
                "费率": "0.60%",
                "费率备注": "",
            }
            if trade.paid and on_day(trade.success_time) and trade.out_trade_no not in adjust.drop_orders:
                total = adjust.amounts.get(trade.out_trade_no, trade.total)
                rows.append(
                    (
                        trade.success_time,
                        {
                            **base,
                            "交易时间": trade.success_time.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S"),
                            "交易状态": "SUCCESS",
                            "应结订单金额": yuan(total),
                            "微信退款单号": "0",
                            "商户退款单号": "0",
                            "退款金额": "0.00",
                            "退款类型": "",
                            "退款状态": "",
                            "手续费": yuan(round(total * 0.006)),
                            "订单金额": yuan(total),
                            "申请退款金额": "0.00",
                        },
                    )
                )
            for refund in trade.refunds.values():
                if refund.status != "SUCCESS" or not on_day(refund.success_time) or refund.out_refund_no in adjust.drop_refunds:
                    continue
                amount = adjust.refund_amounts.get(refund.out_refund_no, refund.refund)
                rows.append(
                    (
                        refund.success_time,
                        {
                            **base,
                            "交易时间": refund.success_time.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S"),
                            "交易状态": "REFUND",
                            "应结订单金额": yuan(trade.total),
                            "微信退款单号": refund.refund_id,
                            "商户退款单号": refund.out_refund_no,
                            "退款金额": yuan(amount),
                            "退款类型": "ORIGINAL",
                            "退款状态": "SUCCESS",
                            "手续费": "-" + yuan(round(amount * 0.006)) if amount >= 200 else "0.00",
                            "订单金额": yuan(trade.total),
                            "申请退款金额": yuan(amount),
                        },
                    )
                )
        return [row for _, row in sorted(rows, key=lambda item: item[0])]


# --- The app ------------------------------------------------------------------------------


class NativeAmount(BaseModel):
    total: int = Field(ge=1)
    currency: str = "CNY"


class NativeCreate(BaseModel):
    appid: str = Field(min_length=1, max_length=32)
    mchid: str = Field(min_length=1, max_length=32)
    description: str = Field(min_length=1, max_length=127)
    out_trade_no: str = Field(pattern=r"^[A-Za-z0-9_\-|*]{6,32}$")
    time_expire: Optional[datetime] = None
    notify_url: str = Field(min_length=1, max_length=256)
    amount: NativeAmount


class RefundAmount(BaseModel):
    refund: int = Field(ge=1)
    total: int = Field(ge=1)
    currency: str = "CNY"


class RefundCreate(BaseModel):
    transaction_id: Optional[str] = None
    out_trade_no: Optional[str] = None
    out_refund_no: str = Field(pattern=r"^[A-Za-z0-9_\-|*@]{1,64}$")
    reason: Optional[str] = Field(None, max_length=80)
    notify_url: Optional[str] = None
    amount: RefundAmount


def make_app(fake: WeChatPayFake) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        async with httpx.AsyncClient(timeout=5) as http:
            fake.http = http
            yield
            for task in list(fake.tasks):
                task.cancel()

    app = FastAPI(title="WeChat Pay API v3 (test fake)", lifespan=lifespan)

    async def parse(request: Request, model):
        try:
            return model.model_validate_json(await request.body()), None
        except ValueError as err:
            return None, fake.error("PARAM_ERROR", f"参数错误: {str(err)[:200]}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v3/pay/transactions/native")
    async def create(request: Request) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        body, problem = await parse(request, NativeCreate)
        if problem is not None:
            return problem
        if body.mchid != fake.keys.mchid or body.appid != fake.keys.appid:
            return fake.error("APPID_MCHID_NOT_MATCH", "AppID和mch_id不匹配")
        if body.amount.currency != "CNY":
            return fake.error("PARAM_ERROR", "currency must be CNY")
        if body.time_expire is not None and body.time_expire.tzinfo is None:
            return fake.error("PARAM_ERROR", "time_expire must be RFC 3339 with an offset")
        order = body.out_trade_no
        if (fault := fake.fault(order, "create")) is not None and not fault.after:
            return fake.failed(fault)
        signature = body.model_dump(mode="json")
        trade = fake.trades.get(order)
        if trade is None:
            trade = FakeTrade(
                out_trade_no=order,
                appid=body.appid,
                mchid=body.mchid,
                description=body.description,
                notify_url=body.notify_url,
                total=body.amount.total,
                currency=body.amount.currency,
                time_expire=body.time_expire,
                code_url=f"weixin://wxpay/bizpayurl?pr={secrets.token_urlsafe(6)}",
                request=signature,
            )
            fake.trades[order] = trade
            script = fake.script(order)
            if script.pay == "immediately":
                fake.spawn(fake.later(0.2, lambda: fake.scan(trade)))
            elif script.pay == "after_delay":
                fake.spawn(fake.later(script.pay_delay_seconds, lambda: fake.scan(trade)))
        elif trade.request != signature:
            return fake.error("OUT_TRADE_NO_USED", "商户订单号重复")
        elif trade.paid:
            return fake.error("ORDERPAID", "该订单已支付")
        elif trade.trade_state == "CLOSED":
            return fake.error("ORDER_CLOSED", "订单已关闭")
        if fault is not None:
            return fake.failed(fault)
        return fake.answer(200, {"code_url": trade.code_url})

    @app.get("/v3/pay/transactions/out-trade-no/{out_trade_no}")
    async def query(out_trade_no: str, request: Request, mchid: str = Query("")) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        if mchid != fake.keys.mchid:
            return fake.error("PARAM_ERROR", "mchid is required and must be yours")
        if (fault := fake.fault(out_trade_no, "query")) is not None:
            return fake.failed(fault)
        trade = fake.trades.get(out_trade_no)
        if trade is None:
            return fake.error("ORDER_NOT_EXIST", "订单不存在")
        return fake.answer(200, trade.out(fake.keys.mchid))

    @app.get("/v3/pay/transactions/id/{transaction_id}")
    async def query_by_id(transaction_id: str, request: Request, mchid: str = Query("")) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        if mchid != fake.keys.mchid:
            return fake.error("PARAM_ERROR", "mchid is required and must be yours")
        order = fake.by_transaction.get(transaction_id)
        if (fault := fake.fault(order, "query")) is not None:
            return fake.failed(fault)
        if order is None:
            return fake.error("ORDER_NOT_EXIST", "订单不存在")
        return fake.answer(200, fake.trades[order].out(fake.keys.mchid))

    @app.post("/v3/pay/transactions/out-trade-no/{out_trade_no}/close")
    async def close(out_trade_no: str, request: Request) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        try:
            if json.loads(await request.body()).get("mchid") != fake.keys.mchid:
                return fake.error("PARAM_ERROR", "mchid must be yours")
        except (ValueError, AttributeError):
            return fake.error("PARAM_ERROR", "body must be JSON with mchid")
        if (fault := fake.fault(out_trade_no, "close")) is not None and not fault.after:
            return fake.failed(fault)
        trade = fake.trades.get(out_trade_no)
        if trade is None:
            return fake.error("ORDER_NOT_EXIST", "订单不存在")
        if fake.script(out_trade_no).pay_while_closing and trade.trade_state in ("NOTPAY", "USERPAYING"):
            fake.pay(trade, force=True)  # the payer's payment landed first
        if trade.paid:
            return fake.error("ORDERPAID", "订单已支付")
        if trade.trade_state == "USERPAYING":
            return fake.error("USER_PAYING", "用户支付中,需要输入密码", 202)
        if trade.trade_state == "NOTPAY":
            trade.trade_state = "CLOSED"
            log.info("trade %s closed", out_trade_no)
        if fault is not None:
            return fake.failed(fault)
        return fake.answer(204)

    @app.post("/v3/refund/domestic/refunds")
    async def refund(request: Request) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        body, problem = await parse(request, RefundCreate)
        if problem is not None:
            return problem
        if bool(body.transaction_id) == bool(body.out_trade_no):
            return fake.error("PARAM_ERROR", "transaction_id 和 out_trade_no 二选一")
        order = body.out_trade_no or fake.by_transaction.get(body.transaction_id or "")
        if (fault := fake.fault(order, "refund")) is not None and not fault.after:
            return fake.failed(fault)
        trade = fake.trades.get(order or "")
        if trade is None:
            return fake.error("RESOURCE_NOT_EXISTS", "订单不存在")
        existing = fake.refunds.get(body.out_refund_no)
        if existing is not None:
            if existing.out_trade_no != trade.out_trade_no or existing.refund != body.amount.refund:
                return fake.error("PARAM_ERROR", "同一退款单号的参数与之前的请求不一致")
            return fake.failed(fault) if fault is not None else fake.answer(200, existing.out())
        if not trade.paid:
            return fake.error("TRADE_ERROR", "订单未支付")
        if body.amount.total != trade.total:
            return fake.error("PARAM_ERROR", "订单金额与原订单不一致")
        if body.amount.currency != trade.currency:
            return fake.error("PARAM_ERROR", "币种与原订单不一致")
        if trade.refunded(including_processing=True) + body.amount.refund > trade.total:
            return fake.error("PARAM_ERROR", "申请退款金额超过订单可退金额")
        created = FakeRefund(
            out_refund_no=body.out_refund_no,
            refund_id="50" + _digits(27),
            transaction_id=trade.transaction_id or "",
            out_trade_no=trade.out_trade_no,
            refund=body.amount.refund,
            total=trade.total,
            currency=trade.currency,
            reason=body.reason or "",
            notify_url=body.notify_url,
        )
        trade.refunds[created.out_refund_no] = created
        fake.refunds[created.out_refund_no] = created
        delay = max(fake.script(trade.out_trade_no).refund_processing_seconds, 0.05)
        fake.spawn(fake.later(delay, lambda: fake.finish_refund(created)))
        if fault is not None:
            return fake.failed(fault)
        return fake.answer(200, created.out())

    @app.get("/v3/refund/domestic/refunds/{out_refund_no}")
    async def query_refund(out_refund_no: str, request: Request) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        found = fake.refunds.get(out_refund_no)
        if (fault := fake.fault(found.out_trade_no if found else None, "refund_query")) is not None:
            return fake.failed(fault)
        if found is None:
            return fake.error("RESOURCE_NOT_EXISTS", "退款单不存在")
        return fake.answer(200, found.out())

    @app.get("/v3/bill/tradebill")
    async def tradebill(
        request: Request, bill_date: str = Query(...), bill_type: str = Query("ALL"), tar_type: Optional[str] = Query(None)
    ) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        if (fault := fake.fault(None, "bill")) is not None:
            return fake.failed(fault)
        try:
            day = date.fromisoformat(bill_date)
        except ValueError:
            return fake.error("PARAM_ERROR", "bill_date must be YYYY-MM-DD")
        if bill_type != "ALL" or tar_type not in (None, "GZIP"):
            return fake.error("PARAM_ERROR", "this fake serves bill_type ALL, tar_type GZIP or none")
        rows = fake.bill_rows(day)
        if not rows:
            return fake.error("NO_STATEMENT_EXIST", "账单不存在")
        plain = "".join(render_bill(rows)).encode()
        token = secrets.token_urlsafe(16)
        fake.bill_files[token] = gzip.compress(plain) if tar_type == "GZIP" else plain
        digest = hashlib.sha1(plain)
        if fake.corrupt_bill_hash > 0:
            fake.corrupt_bill_hash -= 1
            digest.update(b"corrupt")
        return fake.answer(
            200,
            {
                "hash_type": "SHA1",
                "hash_value": digest.hexdigest(),
                "download_url": f"{fake.base_url}/v3/billdownload/file?token={token}",
            },
        )

    @app.get("/v3/billdownload/file")
    async def download(request: Request, token: str = Query(...)) -> Response:
        if (refused := await fake.verify_request(request)) is not None:
            return refused
        content = fake.bill_files.pop(token, None)
        if content is None:
            return fake.error("RESOURCE_NOT_EXISTS", "下载地址已失效")
        return Response(content, media_type="application/octet-stream")  # the file is not signed; its hash is

    # --- Control ---------------------------------------------------------------------

    @app.get("/control/ledger")
    async def ledger(order: list[str] = Query(default_factory=list)) -> dict[str, Any]:
        return {"orders": {o: fake.ledger(o) for o in order}}

    @app.get("/control/ledger/{order}")
    async def ledger_one(order: str) -> dict[str, Any]:
        return fake.ledger(order)

    @app.put("/control/scripts/{order}")
    async def put_script(order: str, script: Script) -> dict[str, Any]:
        bad = [op for op in script.errors if op not in OPERATIONS]
        if bad:
            return JSONResponse({"error": f"unknown routes {bad}; routes: {OPERATIONS}"}, status_code=422)
        fake.scripts[order] = script
        fake.errors_left[order] = {op: e.times for op, e in script.errors.items()}
        return {"order": order, "script": script.model_dump()}

    @app.post("/control/fail")
    async def fail(body: GlobalFail) -> dict[str, Any]:
        fake.global_fails[body.route] = body
        fake.global_left[body.route] = body.times
        return body.model_dump()

    @app.post("/control/pay/{order}")
    async def pay(order: str, request: Request) -> Response:
        raw = await request.body()
        body = PayBody.model_validate_json(raw) if raw else PayBody()
        trade = fake.trades.get(order)
        if trade is None:
            return JSONResponse({"error": "no such trade"}, status_code=404)
        why = fake.pay(trade, body.amount)
        if why:
            return JSONResponse({"error": why}, status_code=409)
        return JSONResponse(trade.out(fake.keys.mchid))

    @app.post("/control/userpaying/{order}")
    async def userpaying(order: str) -> Response:
        trade = fake.trades.get(order)
        if trade is None or trade.trade_state != "NOTPAY":
            return JSONResponse({"error": "no unpaid trade"}, status_code=409)
        trade.trade_state = "USERPAYING"
        return JSONResponse(trade.out(fake.keys.mchid))

    @app.get("/control/trades/{order}")
    async def show(order: str) -> dict[str, Any]:
        trade = fake.trades.get(order)
        return {
            "trade": trade.out(fake.keys.mchid) if trade else None,
            "refunds": [r.out() for r in trade.refunds.values()] if trade else [],
            "calls": fake.calls.get(order, {o: 0 for o in OPERATIONS}),
            "deliveries": fake.deliveries.get(order, []),
        }

    @app.post("/control/notify/{order}")
    async def craft(order: str, body: Craft) -> dict[str, Any]:
        return await fake.craft(order, body)

    @app.put("/control/bills/{day}/adjustments")
    async def adjust(day: date, body: Adjustments) -> dict[str, Any]:
        fake.adjustments[day.isoformat()] = body
        return body.model_dump()

    @app.post("/control/tamper")
    async def tamper(request: Request) -> dict[str, int]:
        """``{"answers": n, "bill_hash": n}``: the next n answers altered after signing, the next
        n bill answers with a hash_value the file does not have."""
        body = json.loads(await request.body() or b"{}")
        fake.tamper_answers = int(body.get("answers", 0))
        fake.corrupt_bill_hash = int(body.get("bill_hash", 0))
        return {"answers": fake.tamper_answers, "bill_hash": fake.corrupt_bill_hash}

    @app.get("/control/signature-failures")
    async def signature_failures() -> dict[str, Any]:
        return {"failures": fake.signature_failures}

    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="wechatpay-fake %(levelname)s %(message)s")
    keys, config = Keys.load(os.environ["WECHATPAY_FAKE_CONFIG"])
    fake = WeChatPayFake(keys, config)
    uvicorn.run(make_app(fake), host="127.0.0.1", port=int(config["port"]), log_level="warning")


if __name__ == "__main__":
    main()
