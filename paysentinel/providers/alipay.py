"""Adapter for the Alipay open platform (``/gateway.do``, RSA2 keys).

Every call is a form POST of the common parameters (app_id, method, format=JSON,
charset=utf-8, sign_type=RSA2, timestamp in China time, version=1.0, notify_url where
relevant) and ``biz_content`` (JSON), signed with the app's private key
(``alipay_sign``). Answers are verified with Alipay's public key over the exact text of
``<method>_response``.

Trades are made with ``alipay.trade.precreate`` (a QR code: the pay URL); Alipay numbers a
trade only once the buyer scans it, so until then ``trade_no`` is None and a query or a
close answers ``ACQ.TRADE_NOT_EXIST`` (no trade: nothing can have been paid). The QR code
stops working at ``time_expire``, which is the payment's time to live.

Errors: see ``classify`` and its tables. An answer whose signature does not verify (or a
success that comes unsigned) is treated as transient (``ProviderUnavailable``): a
man-in-the-middle or a key rotation in progress must not finalize a payment one way or
the other; the activity's bounded retries then end in the workflow's own safe paths
(close, review). Gateway-level errors (40001 missing parameter, 40002 invalid parameter,
20000 ...) may come unsigned, as Alipay sends them; a success (10000) or a business
failure (40004) must be signed.
"""

from __future__ import annotations

import json
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from datetime import date, datetime, timezone
from typing import Any, Optional
from zoneinfo import ZoneInfo

import httpx
from pydantic import ValidationError

from paysentinel.config import Settings
from paysentinel.models import (
    CreateTradeInput,
    ProviderCallback,
    ProviderRefund,
    RefundInput,
    RefundStatus,
    Trade,
    TradeStatus,
    to_major,
)
from paysentinel.providers import alipay_bill
from paysentinel.providers.alipay_sign import (
    china_time,
    load_private_key,
    load_public_key,
    notification_content,
    parse_china_time,
    rsa2_verify,
    sign_params,
    signed_part,
    ResponseFormatError,
)
from paysentinel.providers.base import (
    CallbackIgnored,
    CallbackReply,
    MalformedCallback,
    ProviderRejected,
    ProviderUnavailable,
)
from paysentinel.settlement import SettlementRow
from paysentinel.signing import SignatureError

from paysentinel.providers.alipay_objects import (
    CURRENCY,
    SUCCESS,
    TRADE_STATUSES,
    GatewayError,
    amount_of,
    classify,
)

MAX_ORDER_LENGTH = 64


class AlipayProvider:
    name = "alipay"

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        app_id: str,
        gateway_url: str,
        private_key: str,
        alipay_public_key: str,
        return_url: str = "",
    ):
        self._http = http
        self._app_id = app_id
        self._gateway = gateway_url
        self._key = load_private_key(private_key)
        self._alipay_key = load_public_key(alipay_public_key)
        self._return_url = return_url

    # --- The gateway ----------------------------------------------------------------------

    def signed_request(
        self, method: str, biz: Mapping[str, Any], *, notify_url: str = "", return_url: str = "", now: Optional[datetime] = None
    ) -> dict[str, str]:
        """A request's parameters with its signature."""
        params = {
            "app_id": self._app_id,
            "method": method,
            "format": "JSON",
            "charset": "utf-8",
            "sign_type": "RSA2",
            "timestamp": china_time(now or datetime.now(timezone.utc)),
            "version": "1.0",
            "notify_url": notify_url,
            "return_url": return_url,
            "biz_content": json.dumps(
                {k: v for k, v in biz.items() if v is not None and v != ""}, ensure_ascii=False, separators=(",", ":")
            ),
        }
        return sign_params(self._key, params)

    def verify_answer(self, method: str, text: str) -> dict[str, Any]:
        """The inner object of a gateway answer once its signature checks out; raises
        ``ProviderUnavailable`` for a bad or missing signature or an unreadable answer,
        ``GatewayError`` for a (verified where Alipay signs it) error answer."""
        try:
            raw, body, sign = signed_part(text, method)
        except (ResponseFormatError, ValueError) as err:
            raise ProviderUnavailable(f"{method}: unreadable answer from the gateway ({err}): {text[:200]!r}") from None
        code = str(body.get("code", ""))
        if sign is not None:
            if not rsa2_verify(self._alipay_key, raw, sign):
                raise ProviderUnavailable(
                    f"{method}: the answer's signature does not verify with Alipay's public key "
                    "(PAYSENTINEL_ALIPAY_PUBLIC_KEY); not trusted, not acted on"
                )
        elif code in (SUCCESS, "40004"):
            raise ProviderUnavailable(f"{method}: an unsigned {code} answer; not trusted, not acted on")
        if code != SUCCESS:
            raise GatewayError(method, body)
        return body

    async def call(self, method: str, biz: Mapping[str, Any], *, notify_url: str = "") -> dict[str, Any]:
        """One gateway call; a transient failure raises ``ProviderUnavailable``, a final one
        ``GatewayError`` (callers turn it into ``ProviderRejected`` or an answer)."""
        params = self.signed_request(method, biz, notify_url=notify_url)
        try:
            response = await self._http.post(
                self._gateway,
                content=urllib.parse.urlencode(params).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded;charset=utf-8"},
            )
        except httpx.TimeoutException as err:
            raise ProviderUnavailable(f"{method}: Alipay timed out ({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise ProviderUnavailable(f"{method}: Alipay unreachable ({err!r})") from err
        if response.status_code != 200:
            raise ProviderUnavailable(f"{method}: HTTP {response.status_code} {response.text[:200]!r}")
        try:
            text = response.content.decode("utf-8")
        except UnicodeDecodeError:
            raise ProviderUnavailable(f"{method}: the answer is not UTF-8") from None
        try:
            return self.verify_answer(method, text)
        except GatewayError as err:
            if classify(err.code, err.sub_code) == "transient":
                raise ProviderUnavailable(str(err)) from err
            raise

    @staticmethod
    def _rejected(err: GatewayError) -> ProviderRejected:
        return ProviderRejected(err.sub_code or err.code or "UNKNOWN", err.message or "rejected by Alipay")

    # --- Orders and trades --------------------------------------------------------------

    def check_order(self, order_id: str, amount_minor: int, currency: str) -> Optional[str]:
        if currency != CURRENCY:
            return f"Alipay takes CNY only (not {currency})"
        if len(order_id) > MAX_ORDER_LENGTH:
            return f"the order number is {len(order_id)} characters; Alipay's out_trade_no takes at most {MAX_ORDER_LENGTH}"
        return None

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        if (why := self.check_order(request.order_id, request.amount_minor, request.currency)) is not None:
            raise ProviderRejected("ACQ.INVALID_PARAMETER", why)
        biz = {
            "out_trade_no": request.order_id,
            "total_amount": to_major(request.amount_minor, CURRENCY),
            "subject": (request.subject or request.order_id)[:256],
            "time_expire": china_time(request.expires_at),
        }
        try:
            body = await self.call("alipay.trade.precreate", biz, notify_url=request.notify_url)
        except GatewayError as err:
            if err.sub_code in ("ACQ.TRADE_HAS_SUCCESS", "ACQ.TRADE_HAS_CLOSE"):
                # A retried create after the buyer already paid (or the trade was closed):
                # what is there is the answer, not a failure.
                return await self.query_trade(request.order_id)
            raise self._rejected(err) from err
        if body.get("out_trade_no") not in (None, request.order_id):
            raise ProviderUnavailable(f"alipay.trade.precreate answered for order {body.get('out_trade_no')!r}")
        return Trade(
            order_id=request.order_id,
            trade_no=None,
            status=TradeStatus.WAIT_BUYER_PAY,
            amount_minor=request.amount_minor,
            currency=CURRENCY,
            pay_url=body.get("qr_code"),
        )

    def page_pay_url(
        self, order_id: str, amount_minor: int, subject: str, expires_at: datetime, notify_url: str = "", return_url: str = ""
    ) -> str:
        """A signed ``alipay.trade.page.pay`` URL (the desktop cashier), built locally: the
        payer's browser opens it, no call is made."""
        biz = {
            "out_trade_no": order_id,
            "product_code": "FAST_INSTANT_TRADE_PAY",
            "total_amount": to_major(amount_minor, CURRENCY),
            "subject": subject[:256],
            "time_expire": china_time(expires_at),
        }
        params = self.signed_request(
            "alipay.trade.page.pay", biz, notify_url=notify_url, return_url=return_url or self._return_url
        )
        return f"{self._gateway}?{urllib.parse.urlencode(params)}"

    def _trade(self, order_id: str, body: Mapping[str, Any]) -> Trade:
        try:
            status = TRADE_STATUSES[body["trade_status"]]
            return Trade(
                order_id=body.get("out_trade_no") or order_id,
                trade_no=body.get("trade_no") or None,
                status=status,
                amount_minor=amount_of(body["total_amount"]),
                currency=CURRENCY,
                paid_at=parse_china_time(body.get("send_pay_date")) if status.is_paid else None,
            )
        except (KeyError, ValueError, ArithmeticError) as err:
            raise ProviderUnavailable(f"alipay.trade.query: unreadable trade {dict(body)} ({err!r})") from None

    async def query_trade(
        self, order_id: str, trade_no: Optional[str] = None, *, created_trade_no: Optional[str] = None
    ) -> Trade:
        biz = {"trade_no": trade_no} if trade_no else {"out_trade_no": order_id}
        try:
            body = await self.call("alipay.trade.query", biz)
        except GatewayError as err:
            if err.sub_code == "ACQ.TRADE_NOT_EXIST":
                return Trade(exists=False, order_id=order_id)  # not scanned yet (or never created)
            raise self._rejected(err) from err
        return self._trade(order_id, body)

    async def close_trade(self, order_id: str, idempotency_key: str, *, created_trade_no: Optional[str] = None) -> Trade:
        try:
            body = await self.call("alipay.trade.close", {"out_trade_no": order_id})
        except GatewayError as err:
            if err.sub_code == "ACQ.TRADE_NOT_EXIST":
                # Never scanned: there is no trade to close, and the QR code ends at time_expire.
                return Trade(exists=False, order_id=order_id)
            if err.sub_code == "ACQ.TRADE_STATUS_ERROR":
                return await self.query_trade(order_id)  # paid (or closed already): say which
            raise self._rejected(err) from err
        return Trade(order_id=order_id, trade_no=body.get("trade_no") or None, status=TradeStatus.TRADE_CLOSED, currency=CURRENCY)

    # --- Refunds ------------------------------------------------------------------------

    async def refund(self, request: RefundInput, idempotency_key: str) -> ProviderRefund:
        biz = {
            "out_trade_no": request.order_id,
            "trade_no": request.trade_no,
            "refund_amount": to_major(request.amount_minor, CURRENCY),
            "out_request_no": request.refund_id,
            "refund_reason": request.reason[:256],
        }
        try:
            body = await self.call("alipay.trade.refund", biz)
        except GatewayError as err:
            raise self._rejected(err) from err
        if body.get("fund_change") == "Y":
            return ProviderRefund(
                refund_id=request.refund_id,
                trade_no=body.get("trade_no") or request.trade_no,
                amount_minor=request.amount_minor,
                status=RefundStatus.SUCCEEDED,
            )
        # "N": no money moved by this call: a repeated out_request_no (refunded before, or
        # not yet). Only the refund query says whether it is done.
        found = await self.query_refund(request.order_id, request.refund_id, request.trade_no)
        if found is not None:
            return found
        return ProviderRefund(
            refund_id=request.refund_id,
            trade_no=request.trade_no,
            amount_minor=request.amount_minor,
            status=RefundStatus.PROCESSING,
        )

    async def query_refund(self, order_id: str, refund_id: str, trade_no: Optional[str] = None) -> Optional[ProviderRefund]:
        biz: dict[str, Any] = {"out_trade_no": order_id, "out_request_no": refund_id, "query_options": ["gmt_refund_pay"]}
        if trade_no:
            biz["trade_no"] = trade_no
        try:
            body = await self.call("alipay.trade.fastpay.refund.query", biz)
        except GatewayError as err:
            if err.sub_code == "ACQ.TRADE_NOT_EXIST":
                return None
            raise self._rejected(err) from err
        if not body.get("out_request_no") and not body.get("refund_amount"):
            return None  # no such refund (yet): Alipay answers success with nothing in it
        try:
            amount = amount_of(body["refund_amount"])
        except (KeyError, ValueError, ArithmeticError) as err:
            raise ProviderUnavailable(f"alipay.trade.fastpay.refund.query: unreadable refund {body} ({err!r})") from None
        # Only REFUND_SUCCESS is done; an empty refund_status is a refund not (yet) made.
        status = RefundStatus.SUCCEEDED if body.get("refund_status") == "REFUND_SUCCESS" else RefundStatus.PROCESSING
        return ProviderRefund(
            refund_id=refund_id, trade_no=body.get("trade_no") or trade_no or "", amount_minor=amount, status=status
        )

    # --- Bills --------------------------------------------------------------------------

    async def bill_url(self, day: date) -> str:
        try:
            body = await self.call(
                "alipay.data.dataservice.bill.downloadurl.query", {"bill_type": "trade", "bill_date": day.isoformat()}
            )
        except GatewayError as err:
            raise self._rejected(err) from err
        url = body.get("bill_download_url")
        if not url:
            raise ProviderUnavailable(f"no bill_download_url for {day}: {body}")
        return url

    async def bill_rows(self, day: date, tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
        """The day's trade bill: the zip is streamed into a spooled file (its directory is at
        its end), then its detail member is decompressed, decoded (GBK) and parsed
        incrementally. Alipay's bill days and times are China time."""
        url = await self.bill_url(day)
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
            try:
                async with self._http.stream("GET", url, timeout=120) as response:
                    if response.status_code != 200:
                        body = (await response.aread())[:300].decode("utf-8", "replace")
                        raise ProviderUnavailable(f"bill download for {day}: HTTP {response.status_code} {body}")
                    async for chunk in response.aiter_bytes():
                        spool.write(chunk)
            except httpx.TransportError as err:
                raise ProviderUnavailable(f"bill download for {day}: {err!r}") from err
            spool.seek(0)
            async for row in alipay_bill.aiter_rows(spool):
                yield row

    # --- Notifications ------------------------------------------------------------------

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        try:
            text = body.decode("utf-8")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
        except (UnicodeDecodeError, ValueError) as err:
            raise SignatureError(f"not a form-encoded Alipay notification: {err}") from None
        params = dict(pairs)
        if len(params) != len(pairs):
            raise SignatureError("a parameter appears twice in the notification")
        sign = params.get("sign")
        if not sign:
            raise SignatureError("the notification has no sign")
        if params.get("sign_type", "RSA2") != "RSA2":
            raise SignatureError(f"sign_type {params.get('sign_type')!r}; only RSA2 is accepted")
        if not rsa2_verify(self._alipay_key, notification_content(params), sign):
            raise SignatureError("the notification's signature does not verify with Alipay's public key")
        if params.get("app_id") != self._app_id:
            raise SignatureError(f"the notification is for app_id {params.get('app_id')!r}, not ours")
        if params.get("notify_type") != "trade_status_sync":
            raise CallbackIgnored(f"notify_type {params.get('notify_type')!r} carries no trade status")
        if not params.get("trade_status"):
            raise CallbackIgnored("the notification carries no trade_status")
        try:
            status = TRADE_STATUSES[params["trade_status"]]
            return ProviderCallback(
                event_id=params["notify_id"],
                provider=self.name,
                order_id=params["out_trade_no"],
                trade_no=params["trade_no"],
                trade_status=status,
                amount_minor=amount_of(params["total_amount"]),
                currency=CURRENCY,
                paid_at=parse_china_time(params.get("gmt_payment")) if status.is_paid else None,
                received_at=datetime.now(timezone.utc),
            )
        except (KeyError, ValueError, ArithmeticError, ValidationError) as err:
            raise MalformedCallback(f"not a readable trade notification: {err!r}") from None

    def callback_reply(self, status: int, detail: object) -> CallbackReply:
        """``success`` (200, text/plain) stops Alipay's resends; anything else makes it resend
        (4m, 10m, 10m, 1h, 2h, 6h, 15h), so every refusal answers ``fail``."""
        if 200 <= status < 300:
            return CallbackReply(200, b"success", "text/plain")
        return CallbackReply(status, b"fail", "text/plain")


def build(settings: Settings, http: httpx.AsyncClient) -> AlipayProvider:
    for field in ("alipay_app_id", "alipay_gateway_url", "alipay_private_key", "alipay_public_key"):
        if not str(getattr(settings, field) or "").strip():
            raise ValueError(f"PAYSENTINEL_{field.upper()} is not set (needed by the alipay provider)")
    try:
        return AlipayProvider(
            http,
            app_id=settings.alipay_app_id,
            gateway_url=settings.alipay_gateway_url,
            private_key=settings.alipay_private_key,
            alipay_public_key=settings.alipay_public_key,
            return_url=settings.alipay_return_url,
        )
    except ValueError as err:
        raise ValueError(f"PAYSENTINEL_ALIPAY_PRIVATE_KEY / PAYSENTINEL_ALIPAY_PUBLIC_KEY: {err}") from None
