"""WeChat Pay API v3: the adapter's signatures, decryption, bill and state mapping (unit); the
reference library ``wechatpayv3`` against our signatures and the fake's (interop); and the
system end to end against the fake (tests/fakes/wechatpay.py) over HTTP, Temporal and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from paysentinel.models import RefundStatus, TradeStatus
from paysentinel.providers import wechatpay as wx
from paysentinel.providers import wechatpay_sign as sign
from paysentinel.providers.base import CallbackIgnored, MalformedCallback
from paysentinel.providers.wechatpay_bill import lines_of, parse_bill, render_bill
from paysentinel.settlement import BillFormatError
from paysentinel.signing import SignatureError
from tests.conftest import OPERATOR_HEADERS, Stack, new_order
from tests.fakes import wechatpay as fake_module
from tests.helpers import (
    callback_rows,
    events,
    payment_row,
    provider_order,
    start_payment,
    wait_for,
    wait_status,
)

PROVIDER = "wechatpay"
CHINA = ZoneInfo("Asia/Shanghai")


# --- Keys for the unit tests -------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """A merchant key pair, a "WeChat Pay" key pair and an APIv3 key, as the fake makes them."""
    directory = tmp_path_factory.mktemp("wechatpay-unit")
    setup = fake_module.prepare(directory, 1, "http://127.0.0.1:1/webhooks/wechatpay")
    env = setup.app_env
    return {
        "env": env,
        "merchant_private_pem": Path(env["PAYSENTINEL_WECHATPAY_PRIVATE_KEY_FILE"]).read_text(),
        "merchant_public_pem": (directory / "merchant_public.pem").read_text(),
        "platform_private_pem": (directory / "platform_private.pem").read_text(),
        "platform_public_pem": (directory / "platform_public.pem").read_text(),
        "apiv3_key": Path(env["PAYSENTINEL_WECHATPAY_APIV3_KEY_FILE"]).read_text().strip(),
        "key_id": env["PAYSENTINEL_WECHATPAY_PUBLIC_KEY_ID"],
        "serial": env["PAYSENTINEL_WECHATPAY_CERT_SERIAL"],
    }


def adapter(keys: dict, http: httpx.AsyncClient | None = None, base: str = "http://127.0.0.1:1") -> wx.WeChatPayProvider:
    env = keys["env"]
    return wx.WeChatPayProvider(
        http or httpx.AsyncClient(),
        api_url=base,
        mchid=env["PAYSENTINEL_WECHATPAY_MCHID"],
        appid=env["PAYSENTINEL_WECHATPAY_APPID"],
        serial_no=keys["serial"],
        private_key=keys["merchant_private_pem"],
        apiv3_key=keys["apiv3_key"],
        public_key=env["PAYSENTINEL_WECHATPAY_PUBLIC_KEY"],  # inline, "\n" escapes
        public_key_id=keys["key_id"],
        tolerance_seconds=300,
    )


def transaction(keys: dict, order: str = "testa-unit-000001", state: str = "SUCCESS", total: int = 9990) -> dict:
    body = {
        "appid": keys["env"]["PAYSENTINEL_WECHATPAY_APPID"],
        "mchid": keys["env"]["PAYSENTINEL_WECHATPAY_MCHID"],
        "out_trade_no": order,
        "trade_state": state,
        "trade_state_desc": "",
        "amount": {"total": total, "currency": "CNY"},
    }
    if state in ("SUCCESS", "REFUND"):
        body.update({"transaction_id": "4200001234202611230000000001", "success_time": "2026-11-23T10:34:56+08:00"})
        body["amount"]["payer_total"] = total
    return body


def notification(
    keys: dict,
    event_type: str = "TRANSACTION.SUCCESS",
    resource: dict | None = None,
    apiv3_key: str | None = None,
    event_id: str = "EV-2018022511223320873",
) -> bytes:
    plaintext = json.dumps(resource if resource is not None else transaction(keys)).encode()
    original = "refund" if event_type.startswith("REFUND") else "transaction"
    return json.dumps(
        {
            "id": event_id,
            "create_time": "2026-11-23T10:34:57+08:00",
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": "支付成功",
            "resource": sign.encrypt_resource(apiv3_key or keys["apiv3_key"], plaintext, original, original),
        }
    ).encode()


def signed(keys: dict, body: bytes, *, pem: str | None = None, **kwargs) -> dict[str, str]:
    return sign.signed_headers(
        sign.load_private_key(pem or keys["platform_private_pem"]), kwargs.pop("serial", keys["key_id"]), body, **kwargs
    )


# --- Unit: signatures ------------------------------------------------------------------------


def test_request_signature_string_and_authorization_header(keys):
    message = sign.request_message(
        "post", "/v3/pay/transactions/native?x=1", "1554208460", "593BEC0C930BF1AFEB40B4A08C8FB242", b'{"a":1}'
    )
    assert message == b'POST\n/v3/pay/transactions/native?x=1\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n{"a":1}\n'
    assert sign.request_message("GET", "/v3/certificates", "1", "N", b"") == b"GET\n/v3/certificates\n1\nN\n\n"
    header = sign.authorization(
        mchid="1900009191",
        serial_no=keys["serial"],
        key=sign.load_private_key(keys["merchant_private_pem"]),
        method="GET",
        path="/v3/refund/domestic/refunds/r1",
        body=b"",
        timestamp=1554208460,
        nonce="N0",
    )
    assert header.startswith('WECHATPAY2-SHA256-RSA2048 mchid="1900009191",nonce_str="N0",signature="')
    params = sign.parse_authorization(header)
    assert (params["timestamp"], params["serial_no"]) == ("1554208460", keys["serial"])
    merchant_public = sign.load_public_key(keys["merchant_public_pem"])
    good = sign.request_message("GET", "/v3/refund/domestic/refunds/r1", "1554208460", "N0", b"")
    assert sign.rsa_verify(merchant_public, good, params["signature"])
    assert not sign.rsa_verify(merchant_public, good.replace(b"r1", b"r2"), params["signature"])
    with pytest.raises(ValueError):
        sign.parse_authorization('WECHATPAY2-SHA256-RSA2048 mchid="1"')


def test_answer_and_notification_verification(keys):
    key_ids = {keys["key_id"]: sign.load_public_key(keys["platform_public_pem"])}
    body = b'{"code_url":"weixin://wxpay/bizpayurl?pr=abc"}'
    sign.verify_signed(signed(keys, body), body, key_ids, 300)  # good
    lowered = {k.lower(): v for k, v in signed(keys, body).items()}  # header names in any case
    sign.verify_signed(lowered, body, key_ids, 300)
    with pytest.raises(SignatureError, match="does not verify"):
        sign.verify_signed(signed(keys, body), body.replace(b"abc", b"abd"), key_ids, 300)  # tampered body
    with pytest.raises(SignatureError, match="does not verify"):
        sign.verify_signed(signed(keys, body, pem=keys["merchant_private_pem"]), body, key_ids, 300)  # wrong key
    with pytest.raises(SignatureError, match="away from now"):
        sign.verify_signed(signed(keys, body, timestamp=int(time.time()) - 301), body, key_ids, 300)  # stale
    with pytest.raises(SignatureError, match="not the configured"):
        sign.verify_signed(signed(keys, body, serial="PUB_KEY_ID_OTHER"), body, key_ids, 300)  # another key id
    with pytest.raises(SignatureError, match="missing"):
        sign.verify_signed({}, body, key_ids, 300)


def test_aead_decryption(keys):
    resource = sign.encrypt_resource(keys["apiv3_key"], b'{"x":1}', "transaction", "transaction", nonce="fdasflkja484")
    assert resource["algorithm"] == "AEAD_AES_256_GCM" and resource["nonce"] == "fdasflkja484"
    assert sign.decrypt_resource(keys["apiv3_key"], resource) == b'{"x":1}'
    with pytest.raises(sign.DecryptionError):
        sign.decrypt_resource("0" * 32, resource)  # another APIv3 key
    with pytest.raises(sign.DecryptionError):
        sign.decrypt_resource(keys["apiv3_key"], {**resource, "associated_data": "refund"})
    with pytest.raises(sign.DecryptionError):
        sign.decrypt_resource(keys["apiv3_key"], {**resource, "algorithm": "AES_128_CBC"})


def test_parse_callback(keys):
    provider = adapter(keys)
    body = notification(keys)
    callback = provider.parse_callback(signed(keys, body), body)
    assert (
        callback.event_id,
        callback.order_id,
        callback.trade_no,
        callback.trade_status,
        callback.amount_minor,
        callback.currency,
    ) == ("EV-2018022511223320873", "testa-unit-000001", "4200001234202611230000000001", TradeStatus.TRADE_SUCCESS, 9990, "CNY")
    assert callback.paid_at == datetime(2026, 11, 23, 2, 34, 56, tzinfo=timezone.utc)
    refund_body = notification(keys, "REFUND.SUCCESS", {"out_refund_no": "r1", "refund_status": "SUCCESS"})
    with pytest.raises(CallbackIgnored):
        provider.parse_callback(signed(keys, refund_body), refund_body)
    wrong_apiv3 = notification(keys, apiv3_key="1" * 32)
    with pytest.raises(MalformedCallback, match="APIv3"):
        provider.parse_callback(signed(keys, wrong_apiv3), wrong_apiv3)
    other_merchant = notification(keys, resource={**transaction(keys), "mchid": "1111111111"})
    with pytest.raises(MalformedCallback, match="merchant"):
        provider.parse_callback(signed(keys, other_merchant), other_merchant)
    with pytest.raises(SignatureError):
        provider.parse_callback(signed(keys, body), body.replace(b"EV-", b"EW-"))
    with pytest.raises(MalformedCallback):
        provider.parse_callback(signed(keys, b"[]"), b"[]")


def test_callback_reply_and_order_checks(keys):
    provider = adapter(keys)
    accepted = provider.callback_reply(200, {"result": "delivered"})
    assert (accepted.status, accepted.body) == (204, b"")
    refused = provider.callback_reply(401, "bad signature")
    assert refused.status == 401 and json.loads(refused.body) == {"code": "FAIL", "message": "bad signature"}
    assert json.loads(provider.callback_reply(503, {"error": "later"}).body)["code"] == "FAIL"
    assert provider.check_order("testa-t-0123456789ab", 100, "CNY") is None
    assert "CNY only" in provider.check_order("testa-t-0123456789ab", 100, "USD")
    assert "6 to 32" in provider.check_order("abc", 100, "CNY")
    assert "6 to 32" in provider.check_order("testa-" + "x" * 30, 100, "CNY")
    assert "6 to 32" in provider.check_order("testa-a.b:c", 100, "CNY")


def test_build_names_the_missing_setting(keys):
    from paysentinel.config import Settings

    with pytest.raises(ValueError, match="PAYSENTINEL_WECHATPAY_MCHID"):
        wx.build(Settings(wechatpay_mchid=""), httpx.AsyncClient())


def test_state_mapping_including_userpaying(keys):
    expected = {
        "SUCCESS": TradeStatus.TRADE_SUCCESS,
        "REFUND": TradeStatus.TRADE_SUCCESS,
        "NOTPAY": TradeStatus.WAIT_BUYER_PAY,
        "USERPAYING": TradeStatus.PAYING,
        "CLOSED": TradeStatus.TRADE_CLOSED,
        "REVOKED": TradeStatus.TRADE_CLOSED,
        "PAYERROR": TradeStatus.TRADE_CLOSED,
    }
    for state, status in expected.items():
        trade = wx.trade_from(transaction(keys, state=state), "testa-unit-000001")
        assert trade.status is status, state
        assert (trade.trade_no is not None) == (state in ("SUCCESS", "REFUND"))
        assert (trade.paid_at is not None) == status.is_paid
    assert wx.trade_from(transaction(keys, state="USERPAYING"), "o").status is not TradeStatus.TRADE_CLOSED
    with pytest.raises(ValueError):
        wx.trade_from(transaction(keys, state="WHATEVER"), "o")
    refund = {"out_refund_no": "r1", "transaction_id": "42", "amount": {"refund": 100}}
    for status, mapped, reason in (
        ("PROCESSING", RefundStatus.PROCESSING, False),
        ("SUCCESS", RefundStatus.SUCCEEDED, False),
        ("ABNORMAL", RefundStatus.FAILED, True),
        ("CLOSED", RefundStatus.FAILED, True),
    ):
        result = wx.refund_from({**refund, "status": status})
        assert (result.status, bool(result.fail_reason), result.amount_minor) == (mapped, reason, 100)
    assert wx.rfc3339_china(datetime(2026, 11, 23, 2, 34, 56, 123, tzinfo=timezone.utc)) == "2026-11-23T10:34:56+08:00"
    assert set(wx.TRANSIENT_CODES) >= {"SYSTEM_ERROR", "FREQUENCY_LIMITED", "BANK_ERROR"}
    assert not set(wx.TRANSIENT_CODES) & set(wx.FINAL_CODES)


# --- Unit: the bill ------------------------------------------------------------------------


def bill_row(state: str, order: str, amount: str, **extra) -> dict[str, str]:
    return {
        "交易时间": "2026-11-23 00:00:05",
        "公众账号ID": "wx1",
        "商户号": "1900009191",
        "微信订单号": "4200000001",
        "商户订单号": order,
        "交易类型": "NATIVE",
        "交易状态": state,
        "货币种类": "CNY",
        "应结订单金额": amount,
        "微信退款单号": "0",
        "商户退款单号": "0",
        "退款金额": "0.00",
        "订单金额": amount,
        "申请退款金额": "0.00",
        "商品名称": "会员 月卡",
        **extra,
    }


async def rows_of(text: str, piece: int = 7) -> list:
    data = text.encode()
    return [row async for row in parse_bill(lines_of(data[i : i + piece] for i in range(0, len(data), piece)))]


async def test_bill_parsing():
    bill = "".join(
        render_bill(
            [
                bill_row("SUCCESS", "testa-bill-1", "99.90"),
                bill_row(
                    "REFUND",
                    "testa-bill-1",
                    "99.90",
                    交易时间="2026-11-23 13:00:00",
                    微信退款单号="50001",
                    商户退款单号="refund-1",
                    退款金额="20.00",
                    申请退款金额="20.00",
                ),
                bill_row("REVOKED", "testa-bill-2", "1.00"),
            ]
        )
    )
    lines = bill.splitlines()
    assert lines[1].startswith("`2026-11-23 00:00:05,`wx1,") and lines[-2].startswith("总交易单数,")
    assert lines[-1] == "`3,`99.90,`20.00,`0.00,`0.00,`99.90,`20.00"  # REVOKED moved no money
    rows = await rows_of(bill)  # in 7-byte pieces: lines and UTF-8 characters split across them
    assert [(r.kind, r.order_id, r.trade_no, r.refund_no, r.amount_minor) for r in rows] == [
        ("payment", "testa-bill-1", "4200000001", "", 9990),
        ("refund", "testa-bill-1", "4200000001", "refund-1", 2000),
    ]
    assert rows[0].at == datetime(2026, 11, 22, 16, 0, 5, tzinfo=timezone.utc)  # China time -> UTC
    assert rows[1].at == datetime(2026, 11, 23, 5, 0, 0, tzinfo=timezone.utc)

    with pytest.raises(BillFormatError, match="summary"):
        await rows_of("\n".join(lines[:-2]))  # cut short: no summary
    with pytest.raises(BillFormatError, match="counts 2 rows"):
        await rows_of("\n".join(lines[:-1] + ["`2,`99.90,`20.00,`0.00,`0.00,`99.90,`20.00"]))
    with pytest.raises(BillFormatError, match="退款总金额"):
        await rows_of("\n".join(lines[:-1] + ["`3,`99.90,`21.00,`0.00,`0.00,`99.90,`20.00"]))
    with pytest.raises(BillFormatError, match="lacks"):
        await rows_of("交易时间,商户订单号\n`2026-11-23 00:00:05,`x\n")
    with pytest.raises(BillFormatError, match="not an amount"):
        await rows_of(bill.replace("`99.90", "`9x.90", 2))
    with pytest.raises(BillFormatError, match="not a time"):
        await rows_of(bill.replace("`2026-11-23 00:00:05", "`yesterday", 1))
    with pytest.raises(BillFormatError, match="empty"):
        await rows_of("")
    with pytest.raises(BillFormatError, match="UTF-8"):
        [r async for r in parse_bill(lines_of([b"\xff\xfe\x00"]))]


# --- Interop with the reference library (wechatpayv3) -----------------------------------------


def test_reference_library_accepts_our_request_signatures(keys):
    from wechatpayv3 import utils

    private = utils.load_private_key(keys["merchant_private_pem"])
    body = json.dumps({"mchid": "1900009191"})
    while True:  # the reference stamps the current second: build both within one
        before = int(time.time())
        ours = sign.authorization(
            mchid="1900009191",
            serial_no=keys["serial"],
            key=sign.load_private_key(keys["merchant_private_pem"]),
            method="POST",
            path="/v3/pay/transactions/out-trade-no/testa-x-123456/close",
            body=body.encode(),
            nonce="ABC123",
        )
        reference = utils.build_authorization(
            "/v3/pay/transactions/out-trade-no/testa-x-123456/close",
            "POST",
            "1900009191",
            keys["serial"],
            private,
            data=body,
            nonce_str="ABC123",
        )
        if int(time.time()) == before:
            break
    assert ours == reference
    params = sign.parse_authorization(ours)
    message = f"POST\n/v3/pay/transactions/out-trade-no/testa-x-123456/close\n{params['timestamp']}\nABC123\n{body}\n"
    assert utils.rsa_sign(private, message) == params["signature"]


def test_reference_library_verifies_and_decrypts_the_fakes_notifications(keys, tmp_path):
    from wechatpayv3 import WeChatPay, WeChatPayType, utils

    fake_keys = fake_module.Keys(
        mchid=keys["env"]["PAYSENTINEL_WECHATPAY_MCHID"],
        appid=keys["env"]["PAYSENTINEL_WECHATPAY_APPID"],
        merchant_serial=keys["serial"],
        public_key_id=keys["key_id"],
        merchant_public=sign.load_public_key(keys["merchant_public_pem"]),
        platform_private=sign.load_private_key(keys["platform_private_pem"]),
        apiv3_key=keys["apiv3_key"],
    )
    fake = fake_module.WeChatPayFake(fake_keys, {"port": 1})
    body = fake.notification("TRANSACTION.SUCCESS", "支付成功", transaction(keys), "transaction", "transaction")
    headers = sign.signed_headers(fake_keys.platform_private, fake_keys.public_key_id, body)
    reference = WeChatPay(
        wechatpay_type=WeChatPayType.NATIVE,
        mchid=fake_keys.mchid,
        private_key=keys["merchant_private_pem"],
        cert_serial_no=keys["serial"],
        appid=fake_keys.appid,
        apiv3_key=keys["apiv3_key"],
        public_key=keys["platform_public_pem"],
        public_key_id=keys["key_id"],
    )
    result = reference.callback(headers, body.decode())
    assert result is not None and result["resource"]["out_trade_no"] == "testa-unit-000001"
    assert result["resource"]["trade_state"] == "SUCCESS"
    assert reference.callback(headers, body.decode().replace("支付成功", "支付失败")) is None  # tampered
    # The reference's primitives agree with ours on the same answer.
    answer = fake.answer(200, {"code_url": "weixin://x"})
    assert utils.rsa_verify(
        answer.headers["wechatpay-timestamp"],
        answer.headers["wechatpay-nonce"],
        answer.body.decode(),
        answer.headers["wechatpay-signature"],
        utils.load_public_key(keys["platform_public_pem"]),
    )
    resource = json.loads(body)["resource"]
    assert (
        json.loads(utils.aes_decrypt(resource["nonce"], resource["ciphertext"], resource["associated_data"], keys["apiv3_key"]))[
            "mchid"
        ]
        == fake_keys.mchid
    )


def reference_client(stack: Stack):
    from wechatpayv3 import WeChatPay, WeChatPayType

    env = stack.env
    public_pem = sign.pem_text(env["PAYSENTINEL_WECHATPAY_PUBLIC_KEY"])
    client = WeChatPay(
        wechatpay_type=WeChatPayType.NATIVE,
        mchid=env["PAYSENTINEL_WECHATPAY_MCHID"],
        private_key=Path(env["PAYSENTINEL_WECHATPAY_PRIVATE_KEY_FILE"]).read_text(),
        cert_serial_no=env["PAYSENTINEL_WECHATPAY_CERT_SERIAL"],
        appid=env["PAYSENTINEL_WECHATPAY_APPID"],
        apiv3_key=Path(env["PAYSENTINEL_WECHATPAY_APIV3_KEY_FILE"]).read_text().strip(),
        notify_url=f"{stack.webhook_url}/webhooks/wechatpay",
        public_key=public_pem,
        public_key_id=env["PAYSENTINEL_WECHATPAY_PUBLIC_KEY_ID"],
        timeout=10,
    )
    client._core._gate_way = stack.provider_urls[PROVIDER]  # the fake instead of api.mch.weixin.qq.com
    return client


async def test_reference_client_talks_to_the_fake(stack, wxfake, books):
    """The reference library as the merchant: the fake accepts its signatures, it verifies the
    fake's answers (it raises when an answer's signature fails), and its notification reaches
    our receiver, which verifies and decrypts it like WeChat Pay's."""
    client = reference_client(stack)
    order = provider_order(new_order("ref"))
    code, message = await asyncio.to_thread(
        client.pay, description="reference", out_trade_no=order, amount={"total": 123, "currency": "CNY"}
    )
    assert code == 200 and json.loads(message)["code_url"].startswith("weixin://wxpay/bizpayurl")
    code, message = await asyncio.to_thread(client.query, out_trade_no=order)
    assert code == 200 and json.loads(message)["trade_state"] == "NOTPAY"
    assert (await wxfake.post(f"/control/pay/{order}")).status_code == 200
    code, message = await asyncio.to_thread(client.query, out_trade_no=order)
    assert json.loads(message)["trade_state"] == "SUCCESS"
    # The notification went to our receiver: verified and decrypted (an order we do not know), acknowledged.
    trade = await wait_for(lambda: _delivered(wxfake, order), what="the notification answered")
    assert (trade["deliveries"][0]["status_code"], trade["deliveries"][0]["answer"]) == (204, ""), trade["deliveries"]
    code, _ = await asyncio.to_thread(client.close, out_trade_no=order)
    assert code == 400  # ORDERPAID
    assert (await wxfake.get("/control/signature-failures")).json()["failures"] == []


def adapter_for(stack: Stack, http: httpx.AsyncClient) -> wx.WeChatPayProvider:
    """Our adapter, configured as the running system is (the stack's settings)."""
    env = stack.env
    return wx.WeChatPayProvider(
        http,
        api_url=env["PAYSENTINEL_WECHATPAY_API_URL"],
        mchid=env["PAYSENTINEL_WECHATPAY_MCHID"],
        appid=env["PAYSENTINEL_WECHATPAY_APPID"],
        serial_no=env["PAYSENTINEL_WECHATPAY_CERT_SERIAL"],
        private_key=Path(env["PAYSENTINEL_WECHATPAY_PRIVATE_KEY_FILE"]).read_text(),
        apiv3_key=Path(env["PAYSENTINEL_WECHATPAY_APIV3_KEY_FILE"]).read_text().strip(),
        public_key=env["PAYSENTINEL_WECHATPAY_PUBLIC_KEY"],
        public_key_id=env["PAYSENTINEL_WECHATPAY_PUBLIC_KEY_ID"],
    )


async def test_adapter_refuses_altered_answers_and_a_bill_that_fails_its_hash(stack, wxfake):
    from paysentinel.models import CreateTradeInput
    from paysentinel.providers.base import ProviderUnavailable

    async with httpx.AsyncClient(timeout=10) as http:
        provider = adapter_for(stack, http)
        order = provider_order(new_order("wxadapt"))
        created = await provider.create_trade(
            CreateTradeInput(
                provider=PROVIDER,
                order_id=order,
                amount_minor=4321,
                currency="CNY",
                subject="adapter",
                notify_url=f"{stack.webhook_url}/webhooks/wechatpay",
                expires_at=datetime.now(timezone.utc) + timedelta(minutes=10),
                idempotency_key="k",
            )
        )
        assert created.trade_no is None and created.status is TradeStatus.WAIT_BUYER_PAY
        assert (await wxfake.post(f"/control/pay/{order}")).status_code == 200
        assert (await wxfake.post("/control/tamper", json={"answers": 1})).status_code == 200
        with pytest.raises(ProviderUnavailable, match="signature does not verify"):
            await provider.query_trade(order)  # an answer we cannot trust is not an answer
        paid = await provider.query_trade(order)
        assert (paid.status, paid.amount_minor) == (TradeStatus.TRADE_SUCCESS, 4321)
        closed = await provider.close_trade(order, "k")  # a paid trade stays paid
        assert closed.status is TradeStatus.TRADE_SUCCESS and closed.trade_no == paid.trade_no

        today = datetime.now(CHINA).date()
        assert (await wxfake.post("/control/tamper", json={"bill_hash": 1})).status_code == 200
        with pytest.raises(BillFormatError, match="SHA1"):
            [row async for row in provider.bill_rows(today, CHINA)]
        rows = [row async for row in provider.bill_rows(today, CHINA)]  # gzip, hash checked, then read
        assert [(r.kind, r.trade_no, r.amount_minor) for r in rows if r.order_id == order] == [("payment", paid.trade_no, 4321)]
    assert (await wxfake.get("/control/signature-failures")).json()["failures"] == []


async def _delivered(wxfake, order: str):
    trade = (await wxfake.get(f"/control/trades/{order}")).json()
    return trade if trade["deliveries"] else None


# --- End to end ----------------------------------------------------------------------------


@pytest.fixture
async def wxfake(stack: Stack):
    assert PROVIDER in stack.provider_urls, "tests/fakes/wechatpay.py was not started by the stack fixture"
    async with httpx.AsyncClient(base_url=stack.provider_urls[PROVIDER], timeout=30) as http:
        yield http


async def script(wxfake, order: str, **behaviour) -> None:
    response = await wxfake.put(f"/control/scripts/{provider_order(order)}", json=behaviour)
    assert response.status_code == 200, response.text


async def trade_at(wxfake, order: str) -> dict:
    response = await wxfake.get(f"/control/trades/{provider_order(order)}")
    assert response.status_code == 200, response.text
    return response.json()


async def pay_with_wechat(api, order: str, amount: int = 9990, **extra) -> str:
    response = await start_payment(api, order, amount, provider=PROVIDER, **extra)
    assert response.status_code == 201, response.text
    assert response.json()["pay_url"].startswith("weixin://wxpay/bizpayurl?pr=")
    return response.json()["payment_id"]


async def refund(api, payment_id: str, key: str, amount: int) -> httpx.Response:
    return await api.post(
        f"/payments/{payment_id}/refunds", json={"amount_minor": amount, "reason": "returned"}, headers={"Idempotency-Key": key}
    )


async def test_paid_via_notification(api, wxfake, sessions):
    order = new_order("wxpaid")
    await script(wxfake, order, pay="immediately")
    payment_id = await pay_with_wechat(api, order)
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert "confirmed by callback" in events(view, "paid")[0]["detail"]
    trade = await trade_at(wxfake, order)
    assert trade["trade"]["trade_state"] == "SUCCESS"
    row = await payment_row(sessions, payment_id, "SUCCEEDED")
    assert (row.paid_amount_minor, row.trade_no) == (9990, trade["trade"]["transaction_id"])
    callbacks = await callback_rows(sessions, order)
    assert [(c.delivery, c.signature_verified, c.trade_status) for c in callbacks] == [("delivered", True, "TRADE_SUCCESS")]
    delivered = await wait_for(lambda: _answered(wxfake, order), what="the notification acknowledged")
    assert delivered[-1]["status_code"] == 204 and delivered[-1]["answer"] == ""  # WeChat Pay's way: 204, no body


async def _answered(wxfake, order: str):
    deliveries = (await trade_at(wxfake, order))["deliveries"]
    return deliveries if deliveries and deliveries[-1].get("status_code") in (200, 204) else None


async def test_lost_notification_is_found_by_query(api, wxfake, sessions):
    order = new_order("wxlost")
    await script(wxfake, order, pay="immediately", notify="drop")
    payment_id = await pay_with_wechat(api, order)
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert "confirmed by query" in events(view, "paid")[0]["detail"]
    assert await callback_rows(sessions, order) == []


async def test_never_paid_is_closed_at_the_time_to_live(api, wxfake, sessions):
    order = new_order("wxnever")
    await script(wxfake, order, pay="never")
    payment_id = await pay_with_wechat(api, order, expires_in_seconds=5)
    view = await wait_status(api, payment_id, "CLOSED", timeout=30)
    assert events(view, "expired")
    trade = await trade_at(wxfake, order)
    assert trade["trade"]["trade_state"] == "CLOSED" and "transaction_id" not in trade["trade"]
    assert trade["calls"]["close"] == 1 and trade["calls"]["query"] >= 1
    assert trade["trade"]["amount"] == {"total": 9990, "currency": "CNY"}


async def test_userpaying_at_the_time_to_live_is_not_closed_as_unpaid(api, wxfake, sessions, books):
    order = new_order("wxuserpay")
    books.allow_review(order, "the payer was still entering the password at the time to live: status_unknown review")
    await script(wxfake, order, pay="immediately", userpaying=True, userpaying_then="pay", userpaying_seconds=9)
    payment_id = await pay_with_wechat(api, order, expires_in_seconds=5)
    await asyncio.sleep(7)  # past the time to live: the close found the payer paying
    trade = await trade_at(wxfake, order)
    assert trade["trade"]["trade_state"] == "USERPAYING" and trade["calls"]["close"] >= 1
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert view["status"] != "CLOSED", view
    view = await wait_status(api, payment_id, "SUCCEEDED", timeout=30)  # the payer finished
    assert (await trade_at(wxfake, order))["trade"]["trade_state"] == "SUCCESS"
    assert not any(e["event"] == "closed" for e in view["timeline"])


async def test_payer_pays_while_we_close(api, wxfake, sessions):
    order = new_order("wxrace")
    await script(wxfake, order, pay="never", pay_while_closing=True, notify="drop")
    payment_id = await pay_with_wechat(api, order, expires_in_seconds=5)
    view = await wait_status(api, payment_id, "SUCCEEDED", timeout=30)
    assert "confirmed by close" in events(view, "paid")[0]["detail"]
    trade = await trade_at(wxfake, order)
    assert trade["trade"]["trade_state"] == "SUCCESS" and trade["calls"]["close"] == 1


async def test_partial_refunds_a_retried_submission_refunds_once(api, wxfake, sessions):
    order = new_order("wxpartial")
    # The first refund is taken but its answer is lost (500): the retry with the same
    # out_refund_no gets the same refund back.
    await script(wxfake, order, pay="immediately", errors={"refund": {"code": "SYSTEM_ERROR", "times": 1, "after": True}})
    payment_id = await pay_with_wechat(api, order)
    await wait_status(api, payment_id, "SUCCEEDED")
    first = await refund(api, payment_id, "ret-1", 3000)
    assert first.status_code == 202, first.text
    await wait_for(lambda: _refund_status(api, payment_id, "SUCCEEDED", 1), what="the first refund")
    second = await refund(api, payment_id, "ret-2", 2000)
    assert second.status_code == 202, second.text
    view = await wait_status(api, payment_id, "PARTIALLY_REFUNDED")
    await wait_for(lambda: _refund_status(api, payment_id, "SUCCEEDED", 2), what="both refunds")
    trade = await trade_at(wxfake, order)
    assert trade["calls"]["refund"] >= 3  # two refunds, one of them submitted twice
    assert sorted(r["amount"]["refund"] for r in trade["refunds"]) == [2000, 3000]
    assert trade["trade"]["trade_state"] == "REFUND"
    ledger = (await wxfake.get(f"/control/ledger/{provider_order(order)}")).json()
    assert (ledger["captured_minor"], ledger["refunded_minor"]) == (9990, 5000)
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert view["refunded_minor"] == 5000


async def _refund_status(api, payment_id: str, status: str, count: int):
    refunds = (await api.get(f"/payments/{payment_id}")).json()["refunds"]
    return len(refunds) >= count and all(r["status"] == status for r in refunds[:count])


async def test_refund_processing_then_success_and_processing_then_abnormal(api, wxfake, sessions, books):
    ok, bad = new_order("wxrefok"), new_order("wxrefbad")
    books.allow_review(bad, "an abnormal refund goes to a person")
    await script(wxfake, ok, pay="immediately", refund_processing_seconds=2)
    await script(wxfake, bad, pay="immediately", refund="abnormal", refund_processing_seconds=1)
    ok_id, bad_id = await pay_with_wechat(api, ok), await pay_with_wechat(api, bad)
    await wait_status(api, ok_id, "SUCCEEDED")
    await wait_status(api, bad_id, "SUCCEEDED")
    assert (await refund(api, ok_id, "r-ok", 9990)).status_code == 202
    assert (await refund(api, bad_id, "r-bad", 9990)).status_code == 202

    async def processing_at_wechat():
        return [r["status"] for r in (await trade_at(wxfake, ok))["refunds"]] == ["PROCESSING"]

    await wait_for(processing_at_wechat, what="the refund PROCESSING at WeChat Pay (for 2 s)")
    assert (await api.get(f"/payments/{ok_id}")).json()["refunds"][0]["status"] == "PROCESSING"
    await wait_status(api, ok_id, "REFUNDED", timeout=30)
    assert [r["status"] for r in (await trade_at(wxfake, ok))["refunds"]] == ["SUCCESS"]
    view = await wait_status(api, bad_id, "IN_REVIEW", timeout=30)
    assert view["review_reason"] == "refund_failed"
    assert view["refunds"][0]["status"] == "FAILED" and "abnormal" in (view["refunds"][0].get("detail") or "")
    assert [r["status"] for r in (await trade_at(wxfake, bad))["refunds"]] == ["ABNORMAL"]


async def test_forged_stale_and_replayed_notifications_change_nothing(api, wxfake, sessions):
    order = new_order("wxforged")
    await script(wxfake, order, pay="never")
    payment_id = await pay_with_wechat(api, order, expires_in_seconds=6)
    internal = provider_order(order)
    for craft, status in (
        ({"tamper": True}, 401),
        ({"wrong_key": True}, 401),
        ({"stale": True}, 401),
        ({"wrong_serial": True}, 401),
        ({"wrong_apiv3_key": True}, 400),
    ):
        sent = (await wxfake.post(f"/control/notify/{internal}", json=craft)).json()
        assert sent["status_code"] == status, (craft, sent)
        assert json.loads(sent["answer"])["code"] == "FAIL", sent
    assert (await api.get(f"/payments/{payment_id}")).json()["status"] == "PENDING"
    assert [c for c in await callback_rows(sessions, order) if c.delivery == "delivered"] == []
    await wait_status(api, payment_id, "CLOSED", timeout=30)  # nobody paid: closed as unpaid

    paid = new_order("wxreplay")
    await script(wxfake, paid, pay="immediately")
    paid_id = await pay_with_wechat(api, paid)
    await wait_status(api, paid_id, "SUCCEEDED")
    await wait_for(lambda: _answered(wxfake, paid), what="the notification acknowledged")
    replay = (await wxfake.post(f"/control/notify/{provider_order(paid)}", json={"replay": True})).json()
    assert replay["status_code"] == 204, replay  # acknowledged, so WeChat Pay stops, and deduplicated
    view = (await api.get(f"/payments/{paid_id}")).json()
    assert len(events(view, "paid")) == 1
    assert len([c for c in await callback_rows(sessions, paid) if c.delivery == "delivered"]) == 1


async def test_transient_codes_are_retried_and_final_codes_are_not(api, wxfake, sessions, books):
    flaky, limited, refused = new_order("wxflaky"), new_order("wxlimit"), new_order("wxparam")
    await script(wxfake, flaky, pay="immediately", errors={"create": {"code": "SYSTEM_ERROR", "times": 2}})
    await script(wxfake, limited, pay="immediately", notify="drop", errors={"query": {"code": "FREQUENCY_LIMITED", "times": 2}})
    await script(wxfake, refused, errors={"create": {"code": "PARAM_ERROR", "times": -1}})
    flaky_id = await pay_with_wechat(api, flaky)
    limited_id = await pay_with_wechat(api, limited)
    refused_response = await start_payment(api, refused, provider=PROVIDER)
    await wait_status(api, flaky_id, "SUCCEEDED")
    assert (await trade_at(wxfake, flaky))["calls"]["create"] == 3
    await wait_status(api, limited_id, "SUCCEEDED")
    assert (await trade_at(wxfake, limited))["calls"]["query"] >= 3
    view = await wait_status(api, refused_response.json()["payment_id"], "FAILED")
    assert "PARAM_ERROR" in (view["reason"] or ""), view
    assert (await trade_at(wxfake, refused))["calls"]["create"] == 1  # never retried

    broke = new_order("wxbroke")
    books.allow_review(broke, "a refund WeChat Pay refuses (NOT_ENOUGH) goes to a person")
    await script(wxfake, broke, pay="immediately", errors={"refund": {"code": "NOT_ENOUGH", "times": -1}})
    broke_id = await pay_with_wechat(api, broke)
    await wait_status(api, broke_id, "SUCCEEDED")
    assert (await refund(api, broke_id, "r-1", 100)).status_code == 202
    view = await wait_status(api, broke_id, "IN_REVIEW", timeout=30)
    assert view["review_reason"] == "refund_failed"
    # one call per submission (PAYSENTINEL_REFUND_SUBMISSIONS=2), no retries within one
    assert (await trade_at(wxfake, broke))["calls"]["refund"] <= 2


async def test_a_days_bill_reconciles_and_an_injected_difference_is_found(api, wxfake, stack, client, books):
    today = datetime.now(CHINA).date()
    orders = {}
    for name in ("clean", "refunded", "differs"):
        order = new_order(f"wxrc{name[:3]}")
        await script(wxfake, order, pay="immediately")
        payment_id = await pay_with_wechat(api, order)
        await wait_status(api, payment_id, "SUCCEEDED")
        orders[name] = (provider_order(order), payment_id, order)
    books.allow_review(orders["differs"][2], "the bill reports another amount: a settlement_mismatch review")
    assert (await refund(api, orders["refunded"][1], "r-1", 1990)).status_code == 202
    await wait_status(api, orders["refunded"][1], "PARTIALLY_REFUNDED")
    adjust = {"amounts": {orders["differs"][0]: 100}}
    assert (await wxfake.put(f"/control/bills/{today}/adjustments", json=adjust)).status_code == 200

    async with httpx.AsyncClient(base_url=stack.operator_url, headers=OPERATOR_HEADERS, timeout=60) as finance:
        before = await finance.get(f"/operator/reconciliations/{today}", params={"provider": PROVIDER})
        passes = before.json()["report"]["passes"] if before.status_code == 200 else 0
        started = await finance.post(f"/operator/reconciliations/{today}", params={"provider": PROVIDER})
        assert started.status_code == 202, started.text

        async def done():
            view = await finance.get(f"/operator/reconciliations/{today}", params={"provider": PROVIDER})
            if view.status_code != 200:
                return None
            body = view.json()
            finished = body["report"]["status"] in ("DONE", "PROVISIONAL")
            return body if finished and body["report"]["passes"] == passes + 1 else None

        report = await wait_for(done, timeout=90, what="the wechatpay reconciliation")
    assert report["report"]["status"] != "FAILED", report["report"]
    assert report["bill_rows_loaded"] >= 4  # three payments and a refund
    mine = {d["order_id"]: d for d in report["discrepancies"] if d["order_id"] in {o for o, _, _ in orders.values()}}
    assert set(mine) == {orders["differs"][0]}, report["discrepancies"]
    assert mine[orders["differs"][0]]["kind"] == "amount_differs"
