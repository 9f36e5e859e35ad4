"""The Alipay adapter: its signatures (and python-alipay-sdk's agreement with them), its reading
of answers, notifications and bills, and end to end through the checkout API, Temporal,
PostgreSQL and the fake Alipay gateway (tests/fakes/alipay.py) over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.parse
import zipfile
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from paysentinel.config import Settings
from paysentinel.providers import CallbackIgnored, MalformedCallback, ProviderUnavailable
from paysentinel.providers import alipay as alipay_module
from paysentinel.providers import alipay_bill
from paysentinel.providers.alipay import AlipayProvider, classify
from paysentinel.providers.alipay_sign import notification_content, request_content, rsa2_verify, signed_part
from paysentinel.settlement import BillFormatError
from paysentinel.signing import SignatureError
from tests.conftest import Stack, new_order
from tests.fakes import alipay as fake
from tests.fakes.alipay_bills import Adjustments, BillRow, bill_zip
from tests.helpers import (
    reconcile,
    allow_review,
    callback_rows,
    events,
    payment_row,
    provider_order,
    start_payment,
    wait_for,
    wait_status,
)

CHINA = ZoneInfo("Asia/Shanghai")

# --- Keys for the unit tests (made once per module) ------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    app, ali, stranger = fake.new_key(), fake.new_key(), fake.new_key()
    return {
        "app_private": fake.private_pem(app),
        "app_public": fake.public_pem(app),
        "alipay_private": fake.private_pem(ali),
        "alipay_public": fake.public_pem(ali),
        "stranger_private": fake.private_pem(stranger),
        "stranger_public": fake.public_pem(stranger),
    }


def adapter_for(keys: dict[str, str], http: httpx.AsyncClient | None = None) -> AlipayProvider:
    return AlipayProvider(
        http or httpx.AsyncClient(),
        app_id=fake.APP_ID,
        gateway_url="https://openapi.example/gateway.do",
        private_key=keys["app_private"],
        alipay_public_key=keys["alipay_public"],
    )


def private(pem: str):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(pem.encode(), password=None)


def public(pem: str):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(pem.encode())


def sdk(app_private: str, alipay_public: str, gateway: str | None = None):
    """python-alipay-sdk's client, the reference implementation of Alipay's signatures."""
    from alipay import AliPay

    client = AliPay(
        appid=fake.APP_ID,
        app_notify_url=None,
        app_private_key_string=app_private,
        alipay_public_key_string=alipay_public,
        sign_type="RSA2",
    )
    if gateway:
        client._gateway = gateway  # the library has no public setting for its server URL
    return client


def sample_notification(key_pem: str, **override: str) -> dict[str, str]:
    params = {
        "gmt_create": "2026-01-12 10:00:00",
        "charset": "utf-8",
        "seller_email": "shop@example.com",
        "subject": "测试订单 a&b=c",
        "buyer_id": "2088102177846880",
        "invoice_amount": "99.90",
        "notify_id": "2026011200222100000000000001",
        "notify_type": "trade_status_sync",
        "trade_status": "TRADE_SUCCESS",
        "receipt_amount": "99.90",
        "app_id": fake.APP_ID,
        "buyer_pay_amount": "99.90",
        "sign_type": "RSA2",
        "seller_id": fake.PID,
        "gmt_payment": "2026-01-12 10:00:05",
        "notify_time": "2026-01-12 10:00:06",
        "version": "1.0",
        "out_trade_no": "testa-o-1",
        "total_amount": "99.90",
        "trade_no": "2026011222001400000000000001",
        "auth_app_id": fake.APP_ID,
        "fund_bill_list": '[{"amount":"99.90","fundChannel":"ALIPAYACCOUNT"}]',
    }
    params.update(override)
    return fake.sign_notification(private(key_pem), params)


# --- Unit: signatures ---------------------------------------------------------------------------------


def test_request_is_signed_over_sorted_non_empty_parameters(keys):
    adapter = adapter_for(keys)
    moment = datetime(2026, 1, 12, 2, 3, 4, tzinfo=timezone.utc)
    params = adapter.signed_request(
        "alipay.trade.query", {"out_trade_no": "testa-o-1", "trade_no": None}, notify_url="", now=moment
    )
    assert params["timestamp"] == "2026-01-12 10:03:04"  # China time
    assert "notify_url" not in params and "return_url" not in params  # empty values are left out
    assert json.loads(params["biz_content"]) == {"out_trade_no": "testa-o-1"}
    content = request_content(params)
    assert content == "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "sign")
    assert "sign_type=RSA2" in content and "sign=" not in content
    assert rsa2_verify(public(keys["app_public"]), content, params["sign"])
    assert not rsa2_verify(public(keys["app_public"]), content.replace("testa-o-1", "testa-o-2"), params["sign"])


def test_reference_library_makes_the_same_request_signature(keys):
    """PKCS#1 v1.5 signatures are deterministic: python-alipay-sdk signing the same parameters
    with the same key must produce our signature byte for byte."""
    adapter = adapter_for(keys)
    params = adapter.signed_request(
        "alipay.trade.refund",
        {"out_trade_no": "testa-o-1", "refund_amount": "10.00", "out_request_no": "r-1", "refund_reason": "退货 & 换货"},
        notify_url="https://example.com/webhooks/alipay?x=1",
    )
    unsigned = {k: v for k, v in params.items() if k != "sign"}
    signed_string = sdk(keys["app_private"], keys["alipay_public"]).sign_data(dict(unsigned))
    theirs = dict(urllib.parse.parse_qsl(signed_string))["sign"]
    assert theirs == params["sign"]


def test_reference_library_verifies_notifications_and_so_do_we(keys):
    params = sample_notification(keys["alipay_private"])
    sign = params["sign"]
    reference = sdk(keys["app_private"], keys["alipay_public"])
    assert reference.verify({k: v for k, v in params.items() if k != "sign"}, sign)
    adapter = adapter_for(keys)
    event = adapter.parse_callback({}, urllib.parse.urlencode(params).encode())
    assert (event.event_id, event.order_id, event.trade_no, event.trade_status.value, event.amount_minor) == (
        "2026011200222100000000000001",
        "testa-o-1",
        "2026011222001400000000000001",
        "TRADE_SUCCESS",
        9990,
    )
    assert event.paid_at == datetime(2026, 1, 12, 2, 0, 5, tzinfo=timezone.utc)
    # The content both sides sign: without sign and sign_type, decoded values, sorted.
    assert notification_content(params).startswith("app_id=") and "sign_type" not in notification_content(params)
    # A notification the reference library rejects (tampered) is refused by us too.
    tampered = {**params, "total_amount": "0.01"}
    assert not reference.verify({k: v for k, v in tampered.items() if k != "sign"}, sign)
    with pytest.raises(SignatureError):
        adapter.parse_callback({}, urllib.parse.urlencode(tampered).encode())


def test_notification_checks(keys):
    adapter = adapter_for(keys)
    encode = lambda params: urllib.parse.urlencode(params).encode()  # noqa: E731
    with pytest.raises(SignatureError, match="does not verify"):
        adapter.parse_callback({}, encode(sample_notification(keys["stranger_private"])))  # a wrong key
    with pytest.raises(SignatureError, match="not ours"):
        adapter.parse_callback({}, encode(sample_notification(keys["alipay_private"], app_id="2021000000000000")))
    with pytest.raises(SignatureError, match="no sign"):
        adapter.parse_callback({}, encode({k: v for k, v in sample_notification(keys["alipay_private"]).items() if k != "sign"}))
    with pytest.raises(SignatureError, match="RSA2"):
        adapter.parse_callback({}, encode({**sample_notification(keys["alipay_private"]), "sign_type": "RSA"}))
    with pytest.raises(SignatureError):
        adapter.parse_callback({}, b"\xff\xfe not a form")
    with pytest.raises(CallbackIgnored):
        adapter.parse_callback({}, encode(sample_notification(keys["alipay_private"], notify_type="batch_trans_notify")))
    broken = sample_notification(keys["alipay_private"], total_amount="99.999")
    with pytest.raises(MalformedCallback):
        adapter.parse_callback({}, encode(broken))
    unknown = sample_notification(keys["alipay_private"], trade_status="TRADE_PENDING")
    with pytest.raises(MalformedCallback):
        adapter.parse_callback({}, encode(unknown))
    # A refund's notification carries the trade's status: delivered as that status.
    refund = sample_notification(
        keys["alipay_private"], refund_fee="10.00", out_biz_no="r-1", gmt_refund="2026-01-12 11:00:00.123"
    )
    assert adapter.parse_callback({}, encode(refund)).trade_status.value == "TRADE_SUCCESS"
    ok, refused = adapter.callback_reply(200, {"result": "delivered"}), adapter.callback_reply(401, "bad signature")
    assert (ok.status, ok.body, ok.media_type) == (200, b"success", "text/plain")
    assert (refused.status, refused.body) == (401, b"fail")
    assert adapter.callback_reply(503, "later").body == b"fail"


def test_answer_is_verified_over_its_exact_text(keys):
    adapter = adapter_for(keys)
    inner = {
        "code": "10000",
        "msg": "Success",
        "out_trade_no": "testa-o-1",
        "trade_no": "2026011222001400000000000001",
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "99.90",
        "buyer_logon_id": "159****5620",
        "fund_bill_list": [{"amount": "99.90", "fund_channel": "ALIPAYACCOUNT"}],
        "sub_note": "备注 {x}",
    }
    body = fake.render("alipay.trade.query", inner, private(keys["alipay_private"])).body.decode()
    assert '"code": "10000"' in body  # written with spaces: a compact re-serialization differs
    assert adapter.verify_answer("alipay.trade.query", body)["trade_status"] == "TRADE_SUCCESS"
    # The reference library finds the same signed text and accepts it.
    assert (
        sdk(keys["app_private"], keys["alipay_public"])._verify_and_return_sync_response(body, "alipay_trade_query_response")[
            "total_amount"
        ]
        == "99.90"
    )
    # One changed byte anywhere in the signed object fails.
    with pytest.raises(ProviderUnavailable, match="does not verify"):
        adapter.verify_answer("alipay.trade.query", body.replace("99.90", "99.91", 1))
    # The same object re-serialized (what a verifier that re-encodes would check) fails too.
    raw, decoded, sign = signed_part(body, "alipay.trade.query")
    assert raw != json.dumps(decoded, ensure_ascii=False, separators=(",", ":"))
    compact = json.dumps({"alipay_trade_query_response": decoded, "sign": sign}, ensure_ascii=False, separators=(",", ":"))
    with pytest.raises(ProviderUnavailable, match="does not verify"):
        adapter.verify_answer("alipay.trade.query", compact)
    # Signed with another key; a success without a signature; an unreadable body.
    stranger = fake.render("alipay.trade.query", inner, private(keys["stranger_private"])).body.decode()
    with pytest.raises(ProviderUnavailable, match="does not verify"):
        adapter.verify_answer("alipay.trade.query", stranger)
    with pytest.raises(ProviderUnavailable, match="unsigned"):
        adapter.verify_answer("alipay.trade.query", fake.render("alipay.trade.query", inner, None).body.decode())
    with pytest.raises(ProviderUnavailable, match="unreadable"):
        adapter.verify_answer("alipay.trade.query", "<html>502 Bad Gateway</html>")
    # A gateway-level error may come unsigned, as Alipay sends it.
    error = fake.render(
        "alipay.trade.query",
        {"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-signature", "sub_msg": "验签出错"},
        None,
    )
    with pytest.raises(alipay_module.GatewayError) as caught:
        adapter.verify_answer("alipay.trade.query", error.body.decode())
    assert caught.value.sub_code == "isv.invalid-signature"


@pytest.mark.parametrize(
    ("code", "sub_code", "verdict"),
    [
        ("10000", "", "ok"),
        ("20000", "isp.unknow-error", "transient"),
        ("20000", "", "transient"),
        ("40004", "ACQ.SYSTEM_ERROR", "transient"),
        ("40004", "aop.ACQ.SYSTEM_ERROR", "transient"),
        ("40004", "isp.rop.service.unavailable", "transient"),
        ("40004", "ACQ.TRADE_HAS_SUCCESS", "final"),
        ("40004", "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "final"),
        ("40004", "ACQ.SELLER_BALANCE_NOT_ENOUGH", "final"),
        ("40004", "ACQ.TRADE_HAS_CLOSE", "final"),
        ("40004", "ACQ.INVALID_PARAMETER", "final"),
        ("40004", "ACQ.REASON_TRADE_REFUND_FEE_ERR", "final"),
        ("40002", "isv.invalid-signature", "final"),
        ("40001", "isv.missing-signature", "final"),
        ("20001", "aop.invalid-auth-token", "final"),
    ],
)
def test_error_classification(code, sub_code, verdict):
    assert classify(code, sub_code) == verdict


def test_settings_and_orders(keys):
    with pytest.raises(ValueError, match="PAYSENTINEL_ALIPAY_APP_ID"):
        alipay_module.build(
            Settings(alipay_private_key=keys["app_private"], alipay_public_key=keys["alipay_public"]), httpx.AsyncClient()
        )
    with pytest.raises(ValueError, match="PAYSENTINEL_ALIPAY_PUBLIC_KEY"):
        alipay_module.build(Settings(alipay_app_id=fake.APP_ID, alipay_private_key=keys["app_private"]), httpx.AsyncClient())
    # Keys pasted with literal \n escapes, or as the bare base64 the key tool prints, are read too.
    bare = "".join(keys["alipay_public"].strip().splitlines()[1:-1])
    built = alipay_module.build(
        Settings(alipay_app_id=fake.APP_ID, alipay_private_key=keys["app_private"].replace("\n", "\\n"), alipay_public_key=bare),
        httpx.AsyncClient(),
    )
    assert built.name == "alipay"
    assert built.check_order("testa-o-1", 100, "CNY") is None
    assert "CNY only" in built.check_order("testa-o-1", 100, "USD")
    assert "at most 64" in built.check_order("x" * 65, 100, "CNY")


def test_page_pay_url_is_signed(keys):
    adapter = adapter_for(keys)
    url = adapter.page_pay_url(
        "testa-o-9",
        12345,
        "一件商品",
        datetime(2026, 1, 12, 2, 30, tzinfo=timezone.utc),
        notify_url="https://pay.example/webhooks/alipay",
        return_url="https://shop.example/done",
    )
    assert url.startswith("https://openapi.example/gateway.do?")
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert params["method"] == "alipay.trade.page.pay" and params["return_url"] == "https://shop.example/done"
    biz = json.loads(params["biz_content"])
    assert biz == {
        "out_trade_no": "testa-o-9",
        "product_code": "FAST_INSTANT_TRADE_PAY",
        "total_amount": "123.45",
        "subject": "一件商品",
        "time_expire": "2026-01-12 10:30:00",
    }
    assert rsa2_verify(public(keys["app_public"]), request_content(params), params["sign"])


# --- Unit: bills ---------------------------------------------------------------------------------------

REAL_LAYOUT = (
    "#支付宝业务明细查询\r\n"
    "#账号：[20886219876543210156]\r\n"
    "#起始日期：[2026年01月12日 00:00:00]   终止日期：[2026年01月13日 00:00:00]\r\n"
    "#-----------------------------------------业务明细列表----------------------------------------\r\n"
    "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,对方账户,订单金额（元）,"
    "商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,"
    "商家红包消费金额（元）,卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注\r\n"
    '2026011222001400000000000001\t,testa-o-1\t,交易\t,"茶叶, 500g"\t,2026-01-12 09:59:00,2026-01-12 10:00:05,\t,\t,'
    "\t,\t,159******20\t,99.90,99.90,0.00,0.00,0.00,0.00,0.00,\t,0.00,0.00,\t,-0.60,0.00,\t\r\n"
    '2026011222001400000000000001\t,testa-o-1\t,退款\t,"茶叶, 500g"\t,2026-01-12 09:59:00,2026-01-12 23:59:59,\t,\t,'
    "\t,\t,159******20\t,-10.00,-10.00,0.00,0.00,0.00,0.00,0.00,\t,0.00,0.00,testa-r-1\t,0.06,0.00,\t\r\n"
    "#-----------------------------------------业务明细列表结束------------------------------------\r\n"
    "#交易合计：1笔，商家实收共99.90元，商家优惠共0.00元\r\n"
    "#退款合计：1笔，商家实收共-10.00元，商家优惠共0.00元\r\n"
    "#导出时间：[2026年01月13日 09:12:31]\r\n"
)


def gbk_zip(members: dict[str, bytes]) -> bytes:
    """A zip whose member names are GBK bytes without the UTF-8 flag, as Alipay's are."""

    class GbkName(zipfile.ZipInfo):
        def _encodeFilenameFlags(self):  # zipfile's hook for the name's bytes and flags
            return self.filename.encode("gbk"), self.flag_bits & ~0x800

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = GbkName(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def rows_of(data: bytes) -> list:
    return list(alipay_bill.zip_rows(io.BytesIO(data)))


def test_bill_in_the_real_layout_is_read():
    data = gbk_zip(
        {
            "20886219876543210156_20260112_业务明细.csv": REAL_LAYOUT.encode("gbk"),
            "20886219876543210156_20260112_业务明细(汇总).csv": "#支付宝业务汇总查询\r\n合计,,1,1\r\n".encode("gbk"),
        }
    )
    assert all(not info.flag_bits & 0x800 for info in zipfile.ZipFile(io.BytesIO(data)).infolist())
    payment, refund = rows_of(data)
    assert (payment.kind, payment.trade_no, payment.order_id, payment.amount_minor, payment.currency) == (
        "payment",
        "2026011222001400000000000001",
        "testa-o-1",
        9990,
        "CNY",
    )
    assert payment.at == datetime(2026, 1, 12, 2, 0, 5, tzinfo=timezone.utc)
    assert (refund.kind, refund.refund_no, refund.amount_minor) == ("refund", "testa-r-1", 1000)
    assert refund.at == datetime(2026, 1, 12, 15, 59, 59, tzinfo=timezone.utc)  # still the 12th in China


def test_bill_written_by_the_fake_reads_back_in_small_pieces(monkeypatch):
    monkeypatch.setattr(alipay_bill, "CHUNK", 7)  # GBK characters split between pieces stay whole
    moment = datetime(2026, 1, 12, 3, 0, tzinfo=timezone.utc)
    rows = [
        BillRow(
            "交易",
            f"20260112220014{n:014d}",
            f"testa-o-{n}",
            "商品「特价」",
            moment,
            moment + timedelta(seconds=n),
            Decimal("12.30"),
        )
        for n in range(30)
    ]
    rows.append(
        BillRow(
            "退款",
            rows[0].trade_no,
            rows[0].out_trade_no,
            "商品",
            moment,
            moment + timedelta(hours=1),
            Decimal("2.30"),
            "testa-r-0",
        )
    )
    data = bill_zip(fake.PID, date(2026, 1, 12), rows, Adjustments(), moment)
    read = rows_of(data)
    assert len(read) == 31 and read[-1].kind == "refund" and read[-1].amount_minor == 230
    assert {r.amount_minor for r in read[:-1]} == {1230}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"<html>not a zip</html>", "not a zip"),
        (lambda: gbk_zip({"x_20260112_业务明细(汇总).csv": b"#"}), "detail files"),
        (
            lambda: gbk_zip({"x_20260112_业务明细.csv": REAL_LAYOUT.replace("商户订单号,", "订单号,", 1).encode("gbk")}),
            "lacks 商户订单号",
        ),
        (
            lambda: gbk_zip({"x_20260112_业务明细.csv": REAL_LAYOUT.replace("#交易合计：1笔", "#交易合计：2笔").encode("gbk")}),
            "incomplete",
        ),
        (lambda: gbk_zip({"x_20260112_业务明细.csv": REAL_LAYOUT.replace(",交易\t,", ",冻结\t,").encode("gbk")}), "冻结"),
        (lambda: gbk_zip({"x_20260112_业务明细.csv": REAL_LAYOUT.replace("99.90,99.90", "9.9x,99.90").encode("gbk")}), "9.9x"),
        (lambda: gbk_zip({"x_20260112_业务明细.csv": REAL_LAYOUT.encode("gbk")[:400] + b"\xff\xff\xff"}), "not GBK"),
    ],
)
def test_bad_bill_raises_bill_format_error(make, message):
    with pytest.raises(BillFormatError, match=message):
        rows_of(make())


# --- End to end ----------------------------------------------------------------------------------------


@pytest.fixture
def alipay_url(stack: Stack) -> str:
    url = stack.provider_urls.get("alipay")
    if not url:
        pytest.fail(
            "the fake Alipay gateway is not running: tests/fakes/alipay.py was not started by the stack "
            "fixture (tests/conftest.py starts every module in tests.fakes.FAKES)",
            pytrace=False,
        )
    return url


@pytest.fixture
async def ali(alipay_url: str):
    async with httpx.AsyncClient(base_url=alipay_url, timeout=30) as http:
        yield http


def stack_keys(stack: Stack) -> dict[str, str]:
    folder = Path(stack.env["PAYSENTINEL_ALIPAY_PRIVATE_KEY_FILE"]).parent
    return {
        name: (folder / f"{name}.pem").read_text() for name in ("app_private", "app_public", "alipay_private", "alipay_public")
    }


async def start(api, order: str, amount: int = 9990, **extra) -> dict:
    response = await start_payment(api, order, amount, provider="alipay", **extra)
    assert response.status_code == 201, response.text
    return response.json()


async def script(ali, order: str, **behaviour) -> None:
    response = await ali.put(f"/control/scripts/{provider_order(order)}", json=behaviour)
    assert response.status_code == 200, response.text


async def fake_trade(ali, order: str) -> dict:
    response = await ali.get(f"/control/trades/{provider_order(order)}")
    assert response.status_code == 200, response.text
    return response.json()


async def precreated(ali, order: str) -> dict:
    async def found():
        view = await fake_trade(ali, order)
        return view if view["trade"] else None

    return await wait_for(found, what=f"the precreated trade of {order}")


async def pay(ali, order: str, **body) -> dict:
    await precreated(ali, order)
    response = await ali.post(f"/control/pay/{provider_order(order)}", json=body)
    assert response.status_code == 200, response.text
    return response.json()["trade"]


async def refund(api, payment_id: str, key: str, amount: int) -> dict:
    response = await api.post(
        f"/payments/{payment_id}/refunds", json={"amount_minor": amount, "reason": "退货"}, headers={"Idempotency-Key": key}
    )
    assert response.status_code == 202, response.text
    return response.json()


async def refunds_done(api, payment_id: str, count: int) -> dict | None:
    view = (await api.get(f"/payments/{payment_id}")).json()
    done = [r for r in view["refunds"] if r["status"] == "SUCCEEDED"]
    return view if len(done) >= count and view["status"] not in ("REFUNDING",) else None


async def test_paid_by_notification(api, ali, sessions):
    order = new_order("ali-paid")
    created = await start(api, order)
    assert created["pay_url"].startswith("https://qr.alipay.com/") and created["trade_no"] is None
    trade = await pay(ali, order)
    view = await wait_status(api, created["payment_id"], "SUCCEEDED")
    assert "confirmed by callback" in events(view, "paid")[0]["detail"]
    row = await payment_row(sessions, created["payment_id"], "SUCCEEDED")
    assert (row.paid_amount_minor, row.trade_no) == (9990, trade["trade_no"])
    callbacks = await callback_rows(sessions, order)
    assert [(c.delivery, c.signature_verified, c.trade_status) for c in callbacks] == [("delivered", True, "TRADE_SUCCESS")]
    assert "notify_type=trade_status_sync" in callbacks[0].raw_body
    deliveries = (await fake_trade(ali, order))["deliveries"]
    assert [(d["status_code"], d["answer"]) for d in deliveries] == [(200, "success")]
    assert callbacks[0].event_id == deliveries[0]["notify_id"]


async def test_lost_notification_is_found_by_query(api, ali, sessions):
    order = new_order("ali-lost")
    await script(ali, order, notify="drop")
    created = await start(api, order)
    await pay(ali, order)
    view = await wait_status(api, created["payment_id"], "SUCCEEDED")
    assert "confirmed by query" in events(view, "paid")[0]["detail"]
    assert await callback_rows(sessions, order) == []
    trade = await fake_trade(ali, order)
    assert trade["calls"]["alipay.trade.query"] >= 1
    assert [d["error"] for d in trade["deliveries"]] == ["lost (scripted)"]


async def test_never_scanned_is_closed_at_its_time_to_live(api, ali, sessions):
    order = new_order("ali-never")
    created = await start(api, order, expires_in_seconds=5)
    view = await wait_status(api, created["payment_id"], "CLOSED", timeout=30)
    assert events(view, "expired")
    trade = await fake_trade(ali, order)
    # Never scanned: Alipay had no trade to find or close (ACQ.TRADE_NOT_EXIST), and nothing was paid.
    assert trade["trade"]["trade_status"] == "NOT_SCANNED" and trade["trade"]["trade_no"] is None
    assert trade["calls"]["alipay.trade.query"] >= 1 and trade["calls"]["alipay.trade.close"] >= 1
    assert (await payment_row(sessions, created["payment_id"], "CLOSED")).paid_amount_minor in (None, 0)
    # The QR code died with the payment's time to live: the buyer can no longer pay.
    late = await ali.post(f"/control/pay/{provider_order(order)}", json={})
    assert late.status_code == 409 and "expired" in late.json()["error"]


async def test_scanned_but_unpaid_is_closed(api, ali):
    order = new_order("ali-scan")
    created = await start(api, order, expires_in_seconds=5)
    scanned = await pay(ali, order, scan_only=True)
    assert scanned["trade_status"] == "WAIT_BUYER_PAY" and scanned["trade_no"]
    await wait_status(api, created["payment_id"], "CLOSED", timeout=30)
    assert (await fake_trade(ali, order))["trade"]["trade_status"] == "TRADE_CLOSED"


async def test_payer_pays_while_we_close(api, ali):
    order = new_order("ali-race")
    await script(ali, order, notify="drop", pay_on_close=True)
    created = await start(api, order, expires_in_seconds=5)
    view = await wait_status(api, created["payment_id"], "SUCCEEDED", timeout=40)
    assert "close" in events(view, "paid")[0]["detail"], view["timeline"]
    trade = await fake_trade(ali, order)
    assert trade["trade"]["trade_status"] == "TRADE_SUCCESS" and trade["calls"]["alipay.trade.close"] >= 1


async def test_partial_refunds_and_a_retried_submission_refunds_nothing_twice(api, ali):
    order = new_order("ali-refund")
    # The first refund is made at Alipay but its answer is lost (ACQ.SYSTEM_ERROR after the work):
    # the retry with the same out_request_no answers fund_change "N", the refund query says done.
    await script(
        ali,
        order,
        failures=[{"method": "alipay.trade.refund", "code": "40004", "sub_code": "ACQ.SYSTEM_ERROR", "times": 1, "after": True}],
    )
    created = await start(api, order)
    await pay(ali, order)
    await wait_status(api, created["payment_id"], "SUCCEEDED")
    first = await refund(api, created["payment_id"], "r1", 3000)
    await wait_for(lambda: refunds_done(api, created["payment_id"], 1), what="the first refund")
    second = await refund(api, created["payment_id"], "r2", 2000)
    view = await wait_for(lambda: refunds_done(api, created["payment_id"], 2), what="the second refund")
    assert view["status"] == "PARTIALLY_REFUNDED" and view["refunded_minor"] == 5000
    books = (await ali.get(f"/control/ledger/{provider_order(order)}")).json()
    assert (books["captured_minor"], books["refunded_minor"]) == (9990, 5000)
    by_id = {r["out_request_no"]: r for r in books["refunds"]}
    assert set(by_id) == {first["refund_id"], second["refund_id"]}
    assert by_id[first["refund_id"]]["submissions"] == 2 and by_id[second["refund_id"]]["submissions"] == 1
    assert (await fake_trade(ali, order))["calls"]["alipay.trade.fastpay.refund.query"] >= 1


async def test_refund_processing_then_successful(api, ali):
    order = new_order("ali-slow")
    await script(ali, order, refund="processing", refund_processing_seconds=2.5)
    created = await start(api, order)
    await pay(ali, order)
    await wait_status(api, created["payment_id"], "SUCCEEDED")
    await refund(api, created["payment_id"], "all", 9990)
    view = await wait_status(api, created["payment_id"], "REFUNDED", timeout=40)
    assert view["refunds"][0]["status"] == "SUCCEEDED"
    trade = await fake_trade(ali, order)
    assert trade["trade"]["trade_status"] == "TRADE_CLOSED"  # fully refunded
    assert [r["refund_status"] for r in trade["trade"]["refunds"]] == ["REFUND_SUCCESS"]


async def test_forged_and_replayed_notifications_change_nothing(api, ali, stack, sessions):
    keys = stack_keys(stack)
    hook = f"{stack.webhook_url}/webhooks/alipay"
    form = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    # An unpaid payment: forged notifications claim it was paid.
    unpaid = new_order("ali-forged")
    created = await start(api, unpaid, expires_in_seconds=6)
    forged = sample_notification(keys["alipay_private"], out_trade_no=provider_order(unpaid), notify_id="forged-1")
    tampered = {**forged, "total_amount": "0.01"}
    wrong_key = sample_notification(fake.private_pem(fake.new_key()), out_trade_no=provider_order(unpaid), notify_id="forged-2")
    other_app = sample_notification(
        keys["alipay_private"], out_trade_no=provider_order(unpaid), notify_id="forged-3", app_id="2021000000000000"
    )
    async with httpx.AsyncClient(timeout=10) as http:
        for params in (tampered, wrong_key, other_app):
            answer = await http.post(hook, content=urllib.parse.urlencode(params), headers=form)
            assert (answer.status_code, answer.text) == (401, "fail"), answer.text
        assert await callback_rows(sessions, unpaid) == []
        assert (await api.get(f"/payments/{created['payment_id']}")).json()["status"] == "PENDING"
        await wait_status(api, created["payment_id"], "CLOSED", timeout=30)

        # A paid payment: its genuine notification sent again is acknowledged and deduplicated.
        paid = new_order("ali-replay")
        payment = await start(api, paid)
        await pay(ali, paid)
        await wait_status(api, payment["payment_id"], "SUCCEEDED")
        [sent] = [n for n in (await fake_trade(ali, paid))["notifications"] if n["trade_status"] == "TRADE_SUCCESS"]
        for _ in range(2):
            answer = await http.post(hook, content=sent["body"], headers=form)
            assert (answer.status_code, answer.text) == (200, "success")
    assert len(await callback_rows(sessions, paid)) == 1
    view = (await api.get(f"/payments/{payment['payment_id']}")).json()
    assert len(events(view, "paid")) == 1 and view["status"] == "SUCCEEDED"


async def test_transient_codes_are_retried_and_final_codes_are_not(api, ali):
    order = new_order("ali-busy")
    await script(
        ali,
        order,
        notify="drop",
        failures=[
            {"method": "alipay.trade.query", "code": "20000", "sub_code": "isp.unknow-error", "times": 1},
            {"method": "alipay.trade.query", "code": "40004", "sub_code": "ACQ.SYSTEM_ERROR", "times": 1},
            {"method": "alipay.trade.query", "http_status": 502, "times": 1},
            {"method": "alipay.trade.precreate", "code": "40004", "sub_code": "aop.ACQ.SYSTEM_ERROR", "times": 1},
        ],
    )
    created = await start(api, order)
    await pay(ali, order)
    view = await wait_status(api, created["payment_id"], "SUCCEEDED", timeout=40)
    assert "confirmed by query" in events(view, "paid")[0]["detail"]
    calls = (await fake_trade(ali, order))["calls"]
    assert calls["alipay.trade.precreate"] == 2 and calls["alipay.trade.query"] >= 4

    refused = new_order("ali-refused")
    await script(
        ali,
        refused,
        failures=[
            {
                "method": "alipay.trade.precreate",
                "code": "40004",
                "sub_code": "ACQ.INVALID_PARAMETER",
                "sub_msg": "参数无效",
                "times": -1,
            }
        ],
    )
    created = await start(api, refused)
    view = await wait_status(api, created["payment_id"], "FAILED", timeout=30)
    assert "ACQ.INVALID_PARAMETER" in json.dumps(view["timeline"], ensure_ascii=False)
    calls = (await fake_trade(ali, refused))["calls"]
    assert calls["alipay.trade.precreate"] == 1  # a final answer is not retried


async def test_a_final_refund_answer_is_not_retried(api, ali):
    order = new_order("ali-broke")
    await script(
        ali,
        order,
        failures=[
            {
                "method": "alipay.trade.refund",
                "code": "40004",
                "sub_code": "ACQ.SELLER_BALANCE_NOT_ENOUGH",
                "sub_msg": "卖家余额不足",
                "times": 1,
            }
        ],
    )
    created = await start(api, order)
    await pay(ali, order)
    await wait_status(api, created["payment_id"], "SUCCEEDED")
    await refund(api, created["payment_id"], "r1", 1000)

    async def failed():
        view = (await api.get(f"/payments/{created['payment_id']}")).json()
        return view if view["refunds"] and view["refunds"][0]["status"] == "FAILED" else None

    view = await wait_for(failed, timeout=30, what="the refund refused by Alipay")
    assert "ACQ.SELLER_BALANCE_NOT_ENOUGH" in view["refunds"][0]["detail"]
    assert (await fake_trade(ali, order))["calls"]["alipay.trade.refund"] == 1  # one submission, no retries
    books = (await ali.get(f"/control/ledger/{provider_order(order)}")).json()
    assert books["refunded_minor"] == 0
    # Nothing was refunded on either side: the books agree while a person reviews the failed refund.


async def test_checkout_refuses_what_alipay_cannot_take(api):
    response = await start_payment(api, new_order("ali-usd"), 100, provider="alipay", currency="USD")
    assert response.status_code == 422 and "CNY only" in response.text


async def test_reference_client_and_page_pay_against_the_fake(api, ali, stack, alipay_url):
    keys = stack_keys(stack)
    order = new_order("ali-sdk")
    created = await start(api, order)
    await pay(ali, order)
    await wait_status(api, created["payment_id"], "SUCCEEDED")
    # python-alipay-sdk signs its GET request; the fake verifies it, and the library verifies the
    # fake's signed answer.
    client = sdk(keys["app_private"], keys["alipay_public"], f"{alipay_url}/gateway.do")
    answer = await asyncio.to_thread(client.api_alipay_trade_query, out_trade_no=provider_order(order))
    assert (answer["code"], answer["trade_status"], answer["total_amount"]) == ("10000", "TRADE_SUCCESS", "99.90")
    from alipay.exceptions import AliPayException

    intruder = sdk(fake.private_pem(fake.new_key()), keys["alipay_public"], f"{alipay_url}/gateway.do")
    with pytest.raises(AliPayException) as caught:
        await asyncio.to_thread(intruder.api_alipay_trade_query, out_trade_no=provider_order(order))
    assert "isv.invalid-signature" in str(caught.value)
    # The page-pay URL we build locally opens the fake's cashier; a changed amount does not.
    async with httpx.AsyncClient(timeout=10) as http:
        adapter = AlipayProvider(
            http,
            app_id=fake.APP_ID,
            gateway_url=f"{alipay_url}/gateway.do",
            private_key=keys["app_private"],
            alipay_public_key=keys["alipay_public"],
        )
        url = adapter.page_pay_url(
            provider_order(new_order("ali-page")), 4200, "桌面支付", datetime.now(timezone.utc) + timedelta(minutes=10)
        )
        page = await http.get(url)
        assert page.status_code == 200 and "收银台" in page.text and "42.00" in page.text
        forged = await http.get(url.replace("42.00", "0.01"))
        assert "invalid-signature" in forged.text and "收银台" not in forged.text


# --- Reconciliation -----------------------------------------------------------------------------------


async def test_a_days_bill_reconciles_and_differences_are_found(api, ali, finance, client):
    today = datetime.now(CHINA).date()
    orders: dict[str, str] = {}
    for name in ("rc-a", "rc-b", "rc-refunded"):
        order = new_order(f"ali-{name}")
        created = await start(api, order, 12300)
        await pay(ali, order)
        await wait_status(api, created["payment_id"], "SUCCEEDED")
        orders[name] = created["payment_id"]
        if name == "rc-refunded":
            await refund(api, created["payment_id"], "r1", 2300)
            payment_id = created["payment_id"]
            await wait_for(lambda pid=payment_id: refunds_done(api, pid, 1), what="the refund")
    internal = {name: payment_id.removeprefix("payment-") for name, payment_id in orders.items()}

    first = await reconcile(finance, client, today, passes=1, provider="alipay")
    mine = [d for d in first["discrepancies"] if d["order_id"] in internal.values()]
    assert mine == [], mine
    assert first["report"]["rows"] >= 4 and first["bill_rows_loaded"] >= 4

    # Differences: the bill shows another amount for one order, and Alipay took money for an
    # order we never had.
    differs = new_order("ali-rc-differs")
    created = await start(api, differs, 5000)
    await pay(ali, differs)
    await wait_status(api, created["payment_id"], "SUCCEEDED")
    allow_review(differs, "the injected bill difference opens a settlement review")
    orphan = f"ali-orphan-{new_order('x')[2:]}"
    assert (await ali.post("/control/orphans", json={"out_trade_no": orphan, "total_amount": "12.30"})).status_code == 200
    adjust = {"amounts": {provider_order(differs): "49.00"}}
    assert (await ali.put(f"/control/bills/{today}/adjustments", json=adjust)).status_code == 200

    second = await reconcile(finance, client, today, passes=2, provider="alipay")
    found = {d["order_id"]: d for d in second["discrepancies"]}
    assert found[provider_order(differs)]["kind"] == "amount_differs", found.get(provider_order(differs))
    assert found[orphan]["kind"] == "unknown_order", found.get(orphan)
    assert not any(order in found for order in internal.values())

    async def orphan_refunded():
        books = (await ali.get(f"/control/ledger/{orphan}")).json()
        return books if books["net_minor"] == 0 and books["refunded_minor"] == 1230 else None

    await wait_for(orphan_refunded, timeout=60, what="the unknown order's money returned at Alipay")
    view = await wait_for(
        lambda: _review_opened(api, created["payment_id"]), timeout=60, what="a settlement review of the differing order"
    )
    assert view["review_reason"] == "settlement_mismatch"


async def _review_opened(api, payment_id: str) -> dict | None:
    view = (await api.get(f"/payments/{payment_id}")).json()
    return view if view.get("review_reason") == "settlement_mismatch" else None
