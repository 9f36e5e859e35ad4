"""WeChat Pay API v3 adapter (direct merchant, Native pay: a QR code the payer scans).

Every request is signed with the merchant's private key (``Authorization:
WECHATPAY2-SHA256-RSA2048 ...``); every answer and notification is verified with WeChat
Pay's public key (``Wechatpay-Serial`` must be its id, ``PUB_KEY_ID_...``) before anything in
it is believed. Notifications carry the transaction encrypted (AEAD_AES_256_GCM, the APIv3
key). Amounts are fen (minor units); times RFC 3339 China time. Signatures and decryption:
``wechatpay_sign``; the daily trade bill: ``wechatpay_bill``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zlib
from collections.abc import AsyncIterator, Mapping
from datetime import date, datetime, timezone
from typing import Any, Optional
from urllib.parse import quote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import httpx

from paysentinel.config import Settings
from paysentinel.models import (
    CreateTradeInput,
    ProviderCallback,
    ProviderRefund,
    RefundInput,
    Trade,
    TradeStatus,
)
from paysentinel.providers import wechatpay_sign as sign
from paysentinel.providers.base import (
    CallbackIgnored,
    CallbackReply,
    MalformedCallback,
    ProviderRejected,
    ProviderUnavailable,
    json_reply,
)
from paysentinel.providers.wechatpay_bill import lines_of, parse_bill
from paysentinel.settlement import BillFormatError, SettlementRow
from paysentinel.signing import SignatureError

from paysentinel.providers.wechatpay_objects import (
    CLOSE_SETTLED_BY_QUERY,
    FINAL_CODES,
    NOTIFY_EVENT_PAID,
    ORDER_PATTERN,
    TRANSIENT_CODES,
    refund_from,
    rfc3339_china,
    trade_from,
)

USER_AGENT = "paysentinel (WeChatPay-APIv3; python-httpx)"


class WeChatPayProvider:
    name = "wechatpay"

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_url: str,
        mchid: str,
        appid: str,
        serial_no: str,
        private_key: str,
        apiv3_key: str,
        public_key: str,
        public_key_id: str,
        tolerance_seconds: int = 300,
        refund_notify_url: str = "",
    ):
        self._http = http
        self._base = api_url.rstrip("/")
        self._mchid = mchid
        self._appid = appid
        self._serial = serial_no
        self._key = sign.load_private_key(private_key)
        self._apiv3_key = apiv3_key
        if len(apiv3_key.encode()) != 32:
            raise ValueError("PAYSENTINEL_WECHATPAY_APIV3_KEY must be 32 bytes (AES-256)")
        self._public_keys = {public_key_id: sign.load_public_key(public_key)}
        self._tolerance = tolerance_seconds
        self._refund_notify_url = refund_notify_url

    # --- HTTP ------------------------------------------------------------------------

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        headers = {
            "Authorization": sign.authorization(
                mchid=self._mchid, serial_no=self._serial, key=self._key, method=method, path=path, body=body
            ),
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if body:
            headers["Content-Type"] = "application/json"
        return headers

    async def _call(self, method: str, path: str, payload: Optional[dict[str, Any]] = None) -> tuple[int, dict[str, Any]]:
        """Send a signed request (``path`` with its query, already encoded) and verify the
        answer. Transient failures raise ProviderUnavailable; the answer is (status, JSON)."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() if payload is not None else b""
        try:
            response = await self._http.request(
                method, self._base + path, content=body or None, headers=self._headers(method, path, body)
            )
        except httpx.TimeoutException as err:
            raise ProviderUnavailable(f"{method} {path}: WeChat Pay timed out ({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise ProviderUnavailable(f"{method} {path}: WeChat Pay unreachable ({err!r})") from err
        raw = response.content
        status = response.status_code
        if status >= 500 or status == 429:
            code = _code_of(raw)
            raise ProviderUnavailable(f"{method} {path}: HTTP {status} {code}".strip())
        if status == 401 and "wechatpay-signature" not in response.headers and _code_of(raw) == "SIGN_ERROR":
            # WeChat Pay does not sign its answer to a request whose signature it refused;
            # believing this "no" decides nothing about any money.
            raise ProviderRejected("SIGN_ERROR", f"{method} {path}: WeChat Pay refused our request signature")
        try:
            sign.verify_signed(response.headers, raw, self._public_keys, self._tolerance)
        except SignatureError as err:
            raise ProviderUnavailable(
                f"{method} {path}: the answer's WeChat Pay signature does not verify ({err}); not trusting it"
            ) from err
        try:
            data = json.loads(raw) if raw else {}
        except ValueError as err:
            raise ProviderUnavailable(f"{method} {path}: HTTP {status} answer is not JSON") from err
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{method} {path}: HTTP {status} answer is not a JSON object")
        code = data.get("code", "") if status >= 300 else ""
        if code in TRANSIENT_CODES:
            raise ProviderUnavailable(f"{method} {path}: HTTP {status} {code} {data.get('message', '')}".strip())
        return status, data

    @staticmethod
    def _rejected(status: int, body: Mapping[str, Any], default: str) -> ProviderRejected:
        code = body.get("code") or f"HTTP_{status}"
        return ProviderRejected(code, body.get("message") or FINAL_CODES.get(code, default))

    # --- Provider interface ------------------------------------------------------------

    def check_order(self, order_id: str, amount_minor: int, currency: str) -> Optional[str]:
        if currency != "CNY":
            return f"WeChat Pay takes CNY only, not {currency}"
        if not ORDER_PATTERN.match(order_id):
            return f"WeChat Pay order numbers are 6 to 32 characters of letters, digits, _ - | *; {order_id!r} is not"
        if amount_minor <= 0:
            return "the amount must be at least 1 fen"
        return None

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        status, body = await self._call(
            "POST",
            "/v3/pay/transactions/native",
            {
                "appid": self._appid,
                "mchid": self._mchid,
                "description": (request.subject or request.order_id)[:127],
                "out_trade_no": request.order_id,
                "time_expire": rfc3339_china(request.expires_at),
                "notify_url": request.notify_url,
                "amount": {"total": request.amount_minor, "currency": request.currency},
            },
        )
        if status != 200 or not body.get("code_url"):
            raise self._rejected(status, body, "trade not created")
        return Trade(
            order_id=request.order_id,
            trade_no=None,
            status=TradeStatus.WAIT_BUYER_PAY,
            amount_minor=request.amount_minor,
            currency=request.currency,
            pay_url=body["code_url"],
        )

    async def query_trade(
        self, order_id: str, trade_no: Optional[str] = None, *, created_trade_no: Optional[str] = None
    ) -> Trade:
        query = urlencode({"mchid": self._mchid})
        if trade_no:
            path = f"/v3/pay/transactions/id/{quote(trade_no, safe='')}?{query}"
        else:
            path = f"/v3/pay/transactions/out-trade-no/{quote(order_id, safe='')}?{query}"
        status, body = await self._call("GET", path)
        if status == 404 and body.get("code") == "ORDER_NOT_EXIST":
            return Trade(exists=False, order_id=order_id)
        if status != 200:
            raise self._rejected(status, body, "query rejected")
        try:
            return trade_from(body, order_id)
        except (KeyError, ValueError, TypeError) as err:
            raise ProviderUnavailable(f"query {order_id}: unreadable transaction ({err})") from err

    async def close_trade(self, order_id: str, idempotency_key: str, *, created_trade_no: Optional[str] = None) -> Trade:
        status, body = await self._call(
            "POST", f"/v3/pay/transactions/out-trade-no/{quote(order_id, safe='')}/close", {"mchid": self._mchid}
        )
        if status not in (200, 202, 204) and body.get("code") not in CLOSE_SETTLED_BY_QUERY:
            raise self._rejected(status, body, "close rejected")
        # Closed now, already closed, paid first, or still being paid: the trade says which.
        return await self.query_trade(order_id)

    async def refund(self, request: RefundInput, idempotency_key: str) -> ProviderRefund:
        paid = await self.query_trade(request.order_id, request.trade_no)
        if not paid.exists or paid.amount_minor is None:
            raise ProviderRejected("ORDER_NOT_EXIST", f"no paid trade {request.trade_no} to refund")
        payload: dict[str, Any] = {
            "transaction_id": request.trade_no,
            "out_refund_no": request.refund_id,
            "reason": request.reason[:80],
            "amount": {"refund": request.amount_minor, "total": paid.amount_minor, "currency": request.currency},
        }
        if not request.trade_no:
            payload.pop("transaction_id")
            payload["out_trade_no"] = request.order_id
        if self._refund_notify_url:
            payload["notify_url"] = self._refund_notify_url
        status, body = await self._call("POST", "/v3/refund/domestic/refunds", payload)
        if status != 200:
            raise self._rejected(status, body, "refund rejected")
        return self._refund(body)

    async def query_refund(self, order_id: str, refund_id: str, trade_no: Optional[str] = None) -> Optional[ProviderRefund]:
        status, body = await self._call("GET", f"/v3/refund/domestic/refunds/{quote(refund_id, safe='')}")
        if status == 404 and body.get("code") in ("RESOURCE_NOT_EXISTS", "ORDER_NOT_EXIST"):
            return None
        if status != 200:
            raise self._rejected(status, body, "refund query rejected")
        return self._refund(body)

    @staticmethod
    def _refund(body: Mapping[str, Any]) -> ProviderRefund:
        try:
            return refund_from(body)
        except (KeyError, ValueError, TypeError) as err:
            raise ProviderUnavailable(f"unreadable refund answer ({err})") from err

    # --- Bills ---------------------------------------------------------------------------

    async def bill_rows(self, day: date, tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
        """The day's trade bill (a China day: WeChat Pay bills by it). The bill is fetched whole
        into a temporary file while its SHA1 is taken, checked against the hash the bill API
        gave (over the bill as produced, i.e. after un-gzipping), then read as it streams from
        the file."""
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as file:
            if not await self._download_bill(day, file):
                return
            file.seek(0)

            def chunks():
                while piece := file.read(64 * 1024):
                    yield piece

            async for row in parse_bill(lines_of(chunks())):
                yield row

    async def _download_bill(self, day: date, file) -> bool:
        """Write the day's bill into ``file``; False when WeChat Pay has no bill for the day."""
        query = urlencode({"bill_date": day.isoformat(), "bill_type": "ALL", "tar_type": "GZIP"})
        status, body = await self._call("GET", f"/v3/bill/tradebill?{query}")
        if status in (400, 404) and body.get("code") == "NO_STATEMENT_EXIST":
            return False
        if status != 200:
            raise self._rejected(status, body, f"bill for {day} refused")
        url, hash_type, expected = body.get("download_url"), body.get("hash_type"), body.get("hash_value")
        if not url or hash_type != "SHA1" or not expected:
            raise BillFormatError(f"the bill answer lacks download_url or a SHA1 hash_value: {body}")
        own, there = urlsplit(self._base), urlsplit(url)
        if (there.scheme, there.netloc) != (own.scheme, own.netloc):
            raise ProviderRejected("BAD_DOWNLOAD_URL", f"the bill's download_url {url} is not on {self._base}")
        path = there.path + (f"?{there.query}" if there.query else "")
        digest = hashlib.sha1()
        inflate = zlib.decompressobj(wbits=31)  # gzip
        try:
            async with self._http.stream("GET", url, headers=self._headers("GET", path, b""), timeout=60) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", "replace")[:300]
                    if response.status_code >= 500 or response.status_code == 429:
                        raise ProviderUnavailable(f"bill download for {day}: HTTP {response.status_code} {text}")
                    raise ProviderRejected(
                        _code_of(text.encode()) or f"HTTP_{response.status_code}", f"bill download for {day} refused: {text}"
                    )
                async for piece in response.aiter_raw():
                    plain = inflate.decompress(piece)
                    digest.update(plain)
                    file.write(plain)
        except httpx.TransportError as err:
            raise ProviderUnavailable(f"bill download for {day}: WeChat Pay unreachable ({err!r})") from err
        except zlib.error as err:
            raise BillFormatError(f"the bill for {day} is not gzip data: {err}") from err
        if not inflate.eof:
            raise BillFormatError(f"the bill for {day} is cut short (gzip stream incomplete)")
        rest = inflate.flush()
        digest.update(rest)
        file.write(rest)
        if digest.hexdigest().lower() != str(expected).lower():
            raise BillFormatError(f"the bill for {day} does not match its SHA1 hash_value ({digest.hexdigest()} vs {expected})")
        return True

    # --- Notifications -------------------------------------------------------------------

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        sign.verify_signed(headers, body, self._public_keys, self._tolerance)
        try:
            event = json.loads(body)
            event_id = str(event["id"])
            event_type = str(event["event_type"])
            resource = event["resource"]
        except (ValueError, KeyError, TypeError) as err:
            raise MalformedCallback(f"notification is not a WeChat Pay event: {err}") from err
        if not event_type.startswith("TRANSACTION."):
            raise CallbackIgnored(f"{event_type} notification {event_id}: refunds are followed by query")
        if event_type != NOTIFY_EVENT_PAID:
            raise CallbackIgnored(f"{event_type} notification {event_id}: not a payment result")
        if event.get("resource_type") != "encrypt-resource" or not isinstance(resource, dict):
            raise MalformedCallback(f"notification {event_id} carries no encrypt-resource")
        try:
            transaction = json.loads(sign.decrypt_resource(self._apiv3_key, resource))
        except sign.DecryptionError as err:
            raise MalformedCallback(f"notification {event_id}: {err}") from err
        except ValueError as err:
            raise MalformedCallback(f"notification {event_id}: the resource is not JSON ({err})") from err
        try:
            if transaction.get("mchid") != self._mchid:
                raise MalformedCallback(f"notification {event_id} is for merchant {transaction.get('mchid')!r}")
            trade = trade_from(transaction, transaction["out_trade_no"])
            if not trade.trade_no or trade.status is None or trade.amount_minor is None:
                raise MalformedCallback(f"notification {event_id} lacks transaction_id, trade_state or amount")
            return ProviderCallback(
                event_id=event_id,
                provider=self.name,
                order_id=trade.order_id,
                trade_no=trade.trade_no,
                trade_status=trade.status,
                amount_minor=int(trade.amount_minor),
                currency=trade.currency or "CNY",
                paid_at=trade.paid_at,
                received_at=datetime.now(timezone.utc),
            )
        except MalformedCallback:
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise MalformedCallback(f"notification {event_id}: not a transaction ({err})") from err

    def callback_reply(self, status: int, detail: object) -> CallbackReply:
        """WeChat Pay: 204 with no body when accepted; otherwise the status and
        ``{"code": "FAIL", "message": ...}`` so it resends."""
        if 200 <= status < 300:
            return CallbackReply(204, b"")
        message = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False, default=str)
        return json_reply(status, {"code": "FAIL", "message": message[:256]})


def _code_of(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        return str(data.get("code", "")) if isinstance(data, dict) else ""
    except ValueError:
        return ""


SETTINGS = (
    ("wechatpay_mchid", "PAYSENTINEL_WECHATPAY_MCHID"),
    ("wechatpay_appid", "PAYSENTINEL_WECHATPAY_APPID"),
    ("wechatpay_api_url", "PAYSENTINEL_WECHATPAY_API_URL"),
    ("wechatpay_cert_serial", "PAYSENTINEL_WECHATPAY_CERT_SERIAL"),
    ("wechatpay_private_key", "PAYSENTINEL_WECHATPAY_PRIVATE_KEY"),
    ("wechatpay_apiv3_key", "PAYSENTINEL_WECHATPAY_APIV3_KEY"),
    ("wechatpay_public_key", "PAYSENTINEL_WECHATPAY_PUBLIC_KEY"),
    ("wechatpay_public_key_id", "PAYSENTINEL_WECHATPAY_PUBLIC_KEY_ID"),
)


def build(settings: Settings, http: httpx.AsyncClient) -> WeChatPayProvider:
    missing = [env for field, env in SETTINGS if not str(getattr(settings, field, "") or "").strip()]
    if missing:
        raise ValueError(f"wechatpay needs {', '.join(missing)} (secrets also as <name>_FILE)")
    return WeChatPayProvider(
        http,
        api_url=settings.wechatpay_api_url,
        mchid=settings.wechatpay_mchid,
        appid=settings.wechatpay_appid,
        serial_no=settings.wechatpay_cert_serial,
        private_key=settings.wechatpay_private_key,
        apiv3_key=settings.wechatpay_apiv3_key.strip(),
        public_key=settings.wechatpay_public_key,
        public_key_id=settings.wechatpay_public_key_id,
        tolerance_seconds=settings.webhook_tolerance_seconds,
        refund_notify_url=f"{settings.effective_webhook_base_url}/webhooks/wechatpay",
    )
