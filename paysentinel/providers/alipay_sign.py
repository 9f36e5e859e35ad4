"""Alipay open platform signatures: RSA2 (SHA256withRSA, PKCS#1 v1.5, base64).

- A request is signed over its parameters sorted by name, ``k=v`` joined with ``&``, the
  empty ones and ``sign`` left out (``sign_type`` is signed).
- A notification is verified the same way with ``sign`` and ``sign_type`` left out.
- A gateway answer ``{"<method>_response": {...}, "sign": "..."}`` is verified over the
  exact characters of the inner object as they appear in the body: never re-serialized
  (Alipay's spacing, key order and escapes are what it signed).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

CHINA = ZoneInfo("Asia/Shanghai")  # Alipay's clock: every time it sends or expects
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _key_text(text: str) -> str:
    return text.strip().replace("\\r", "").replace("\\n", "\n")


def load_private_key(text: str) -> RSAPrivateKey:
    """The app's private key: PEM (PKCS#1 or PKCS#8; literal ``\\n`` escapes accepted) or the
    bare base64 PKCS#8 body Alipay's key tool prints."""
    text = _key_text(text)
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            key = serialization.load_der_private_key(base64.b64decode("".join(text.split())), password=None)
    except (ValueError, TypeError, binascii.Error) as err:
        raise ValueError(f"not an RSA private key: {err}") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public_key(text: str) -> RSAPublicKey:
    """Alipay's public key: PEM (literal ``\\n`` escapes accepted) or the bare base64
    SubjectPublicKeyInfo the open platform console shows."""
    text = _key_text(text)
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(text.split())))
    except (ValueError, TypeError, binascii.Error) as err:
        raise ValueError(f"not an RSA public key: {err}") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def content_to_sign(params: Mapping[str, object], exclude: tuple[str, ...] = ("sign",)) -> str:
    """Sorted ``k=v`` pairs joined with ``&``; empty values and ``exclude`` left out. Values
    are the decoded ones (no URL encoding)."""
    return "&".join(
        f"{key}={value}" for key, value in sorted(params.items()) if key not in exclude and value is not None and value != ""
    )


def request_content(params: Mapping[str, object]) -> str:
    return content_to_sign(params, ("sign",))


def notification_content(params: Mapping[str, object]) -> str:
    return content_to_sign(params, ("sign", "sign_type"))


def rsa2_sign(key: RSAPrivateKey, content: str) -> str:
    return base64.b64encode(key.sign(content.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa2_verify(key: RSAPublicKey, content: str, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature.strip(), validate=False)
        key.verify(raw, content.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        return True
    except (InvalidSignature, binascii.Error, ValueError):
        return False


def sign_params(key: RSAPrivateKey, params: Mapping[str, str]) -> dict[str, str]:
    """The parameters with their ``sign`` added (a request's: ``sign_type`` is signed)."""
    signed = {k: v for k, v in params.items() if v is not None and v != ""}
    signed["sign"] = rsa2_sign(key, request_content(signed))
    return signed


class ResponseFormatError(ValueError):
    """A gateway answer that is not the JSON object Alipay sends."""


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def top_level_spans(text: str) -> dict[str, tuple[int, int]]:
    """Where each top-level member's value lies in the body text: (start, end) offsets, so
    the signed inner object can be taken character for character."""
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    at = _skip(text, 0)
    if not text.startswith("{", at):
        raise ResponseFormatError("the answer is not a JSON object")
    at = _skip(text, at + 1)
    if text.startswith("}", at):
        return spans
    try:
        while True:
            key, at = decoder.raw_decode(text, at)
            if not isinstance(key, str):
                raise ResponseFormatError("a member name is not a string")
            at = _skip(text, at)
            if not text.startswith(":", at):
                raise ResponseFormatError(f"':' expected at offset {at}")
            start = _skip(text, at + 1)
            _, end = decoder.raw_decode(text, start)
            spans[key] = (start, end)
            at = _skip(text, end)
            if text.startswith(",", at):
                at = _skip(text, at + 1)
                continue
            if text.startswith("}", at):
                return spans
            raise ResponseFormatError(f"',' or '}}' expected at offset {at}")
    except json.JSONDecodeError as err:
        raise ResponseFormatError(f"the answer is not valid JSON: {err}") from None


def response_key(method: str) -> str:
    """``alipay.trade.query`` -> ``alipay_trade_query_response``."""
    return method.replace(".", "_") + "_response"


def signed_part(text: str, method: str) -> tuple[str, dict, str | None]:
    """(the inner object's exact text, it decoded, the ``sign``) of a gateway answer; the
    inner object is ``<method>_response`` or, for gateway-level errors, ``error_response``."""
    spans = top_level_spans(text)
    key = response_key(method)
    if key not in spans:
        key = "error_response"
    if key not in spans:
        raise ResponseFormatError(f"the answer has no {response_key(method)} (members: {', '.join(spans) or 'none'})")
    start, end = spans[key]
    raw = text[start:end]
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ResponseFormatError(f"{key} is not an object")
    sign = None
    if "sign" in spans:
        value = json.loads(text[slice(*spans["sign"])])
        sign = value if isinstance(value, str) and value else None
    return raw, body, sign


def china_time(moment: datetime) -> str:
    """An aware time as Alipay writes it: ``yyyy-MM-dd HH:mm:ss`` in China time."""
    return moment.astimezone(CHINA).strftime(TIME_FORMAT)


def parse_china_time(value: str | None) -> datetime | None:
    """``yyyy-MM-dd HH:mm:ss`` China time -> an aware UTC time (None for empty)."""
    if not value:
        return None
    return datetime.strptime(value.strip(), TIME_FORMAT).replace(tzinfo=CHINA).astimezone(timezone.utc)
