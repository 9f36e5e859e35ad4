"""Customer data out of Temporal histories: the payload codec, the codec endpoint, masked logs.

The codec's rules without servers (rotation, pass-through, wrong keys, the development key);
then on the running system: the raw history (``temporal workflow show`` without a codec) of a
payment holds no customer e-mail, the same command with the codec endpoint shows it, and the
endpoint refuses callers without an operator token."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from paysentinel.codec import ENCODING, KEY_ID_METADATA, EncryptionCodec, PayloadKeyError, dev_keys, keys_for, parse_keys
from paysentinel.config import Settings
from paysentinel.logs import MaskingFilter, mask
from tests.conftest import OPERATOR_HEADERS, OPERATORS, TEST_PAYLOAD_KEYS, new_order
from tests.helpers import script, start_payment, wait_status

OLD = ("k-2025", os.urandom(32))
NEW = ("k-2026", os.urandom(32))


def plain(text: str) -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([{"customer": {"email": text}}])[0]


async def test_round_trip_across_a_key_rotation():
    before = EncryptionCodec([OLD])
    [sealed] = await before.encode([plain("li@example.com")])
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata[KEY_ID_METADATA] == b"k-2025"
    assert b"li@example.com" not in sealed.SerializeToString()

    after = EncryptionCodec([NEW, OLD])  # the new key first: it encrypts, the old one still decrypts
    assert await after.decode([sealed]) == [plain("li@example.com")]
    [resealed] = await after.encode([plain("li@example.com")])
    assert resealed.metadata[KEY_ID_METADATA] == b"k-2026"
    assert await after.decode([resealed]) == [plain("li@example.com")]
    with pytest.raises(PayloadKeyError, match="k-2026"):  # the old configuration cannot read the new key
        await before.decode([resealed])


async def test_payloads_that_are_not_encrypted_pass_through():
    codec = EncryptionCodec([NEW])
    recorded_before = [plain("li@example.com"), Payload(metadata={"encoding": b"binary/null"})]
    assert await codec.decode(recorded_before) == recorded_before


async def test_an_unknown_key_id_or_a_wrong_key_is_a_clear_error():
    [sealed] = await EncryptionCodec([OLD]).encode([plain("li@example.com")])
    with pytest.raises(PayloadKeyError) as unknown:
        await EncryptionCodec([NEW]).decode([sealed])
    assert "'k-2025'" in str(unknown.value) and "PAYSENTINEL_PAYLOAD_KEYS" in str(unknown.value)
    with pytest.raises(PayloadKeyError, match="does not decrypt"):
        await EncryptionCodec([("k-2025", os.urandom(32))]).decode([sealed])


def test_key_settings_are_checked():
    assert [k for k, _ in parse_keys(TEST_PAYLOAD_KEYS)] == ["test-2", "test-1"]
    for bad in (
        "",
        "nokey",
        "a:" + base64.b64encode(b"short").decode(),
        "a:!!!",
        f"a:{base64.b64encode(os.urandom(32)).decode()},a:{base64.b64encode(os.urandom(32)).decode()}",
    ):
        with pytest.raises(PayloadKeyError):
            parse_keys(bad)
    # Outside the development profile (a shared Temporal) no key is made up per process.
    with pytest.raises(PayloadKeyError, match="PAYSENTINEL_PAYLOAD_KEYS is not set"):
        keys_for(Settings(TEMPORAL_ADDRESS="temporal:7233", payload_keys=""))


def test_the_development_key_is_made_once_and_private(tmp_path: Path):
    first = dev_keys(tmp_path / "data")
    assert dev_keys(tmp_path / "data") == first and len(first) == 1 and len(first[0][1]) == 32
    mode = stat.S_IMODE((tmp_path / "data" / "payload-keys").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert keys_for(Settings(data_dir=tmp_path / "data", payload_keys="")) == first


def test_log_lines_mask_email_phone_and_ip():
    assert mask("receipt to li@example.com") == "receipt to l***@example.com"
    masked = mask("payer 203.0.113.7 (2001:db8::7) phone +86 138 0013 8000, 13800138000, (555) 123-4567")
    for personal in ("203.0.113.7", "2001:db8::7", "138 0013 8000", "13800138000", "123-4567"):
        assert personal not in masked, masked
    # What the service logs about itself stays readable.
    kept = (
        "trade 2026112322006595274229537062 at 2026-11-23T01:24:20+00:00, 25.99 CNY, listening on 127.0.0.1:8000, order shop-1001"
    )
    assert mask(kept) == kept

    record = logging.LogRecord("t", logging.INFO, __file__, 1, "mail to %s from %s", ("li@example.com", "198.51.100.4"), None)
    assert MaskingFilter().filter(record)
    assert record.getMessage() == "mail to l***@example.com from ***.***.***.***"


# --- On the running system -------------------------------------------------------------------


def temporal_show(temporal_cli: Path, address: str, workflow_id: str, *extra: str) -> str:
    result = subprocess.run(
        [
            str(temporal_cli),
            "workflow",
            "show",
            "--workflow-id",
            workflow_id,
            "--address",
            address,
            "--namespace",
            "default",
            "--output",
            "json",
            "--disable-config-file",
            "--disable-config-env",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def readable(output: str) -> str:
    """The CLI's JSON with every base64 string (payload data, metadata) decoded next to it."""
    found: list[str] = [output]

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            try:
                found.append(base64.b64decode(node, validate=True).decode("utf-8", errors="replace"))
            except ValueError:
                pass

    walk(json.loads(output))
    return "\n".join(found)


async def test_the_raw_history_holds_no_customer_email(api, sim, stack, temporal_server, temporal_cli):
    order = new_order("pii")
    email = f"{order}@example.com"  # start_payment's customer
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")

    raw = readable(await asyncio.to_thread(temporal_show, temporal_cli, temporal_server.address, payment_id))
    assert email not in raw
    assert "binary/encrypted" in raw and "encryption-key-id" in raw  # encrypted, not missing
    assert order in raw  # the order id stays readable (workflow id, search attributes)

    # An operator with a token reads it through the codec endpoint, as `temporal` CLI users do.
    decoded = readable(
        await asyncio.to_thread(
            temporal_show,
            temporal_cli,
            temporal_server.address,
            payment_id,
            "--codec-endpoint",
            f"{stack.operator_url}/codec",
            "--codec-auth",
            OPERATOR_HEADERS["Authorization"],
        )
    )
    assert email in decoded and "binary/encrypted" not in decoded


async def test_the_codec_endpoint_needs_an_operator_token(stack, temporal_server):
    [sealed] = await EncryptionCodec(parse_keys(TEST_PAYLOAD_KEYS)).encode([plain("li@example.com")])
    body = json.loads(
        json.dumps(
            {
                "payloads": [
                    {
                        "metadata": {k: base64.b64encode(v).decode() for k, v in sealed.metadata.items()},
                        "data": base64.b64encode(sealed.data).decode(),
                    }
                ]
            }
        )
    )
    async with httpx.AsyncClient(base_url=f"{stack.operator_url}/codec", timeout=30) as http:
        refused = await http.post("/decode", json=body)
        assert refused.status_code == 401, refused.text
        assert (await http.post("/decode", json=body, headers={"Authorization": "Bearer not-a-token-000"})).status_code == 401
        assert (await http.post("/encode", json=body)).status_code == 401

        answer = await http.post("/decode", json=body, headers=OPERATOR_HEADERS)
        assert answer.status_code == 200, answer.text
        [payload] = answer.json()["payloads"]
        assert "li@example.com" in base64.b64decode(payload["data"]).decode()

        # The browser's way: a sign-in cookie (HttpOnly, only for /codec) stands in for the header.
        signed = await http.post("/session", headers={"Authorization": f"Bearer {OPERATORS['bob']}"})
        assert signed.status_code == 200 and signed.json()["operator"] == "bob"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "path=/codec" in cookie and "samesite=strict" in cookie
        ui = temporal_server.ui_url
        answer = await http.post("/decode", json=body, headers={"Origin": ui, "X-Namespace": "default"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == ui
        assert answer.headers["access-control-allow-credentials"] == "true"

        preflight = await http.options(
            "/decode",
            headers={
                "Origin": ui,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == ui
        elsewhere = await http.options(
            "/decode", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in elsewhere.headers

        http.cookies.clear()
        assert (await http.post("/decode", json=body)).status_code == 401
