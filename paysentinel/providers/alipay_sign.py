"""Alipay open platform signatures: RSA2 (SHA256withRSA, PKCS#1 v1.5, base64).

- A request is signed over its parameters sorted by name, ``k=v`` joined with ``&``, the
  empty ones and ``sign`` left out (``sign_type`` is signed).
- A notification is verified the same way with ``sign`` and ``sign_type`` left out.
- A gateway answer ``{"<method>_response": {...}, "sign": "..."}`` is verified over the
  exact characters of the inner object as they appear in the body: never re-serialized
  (Alipay's spacing, key order and escapes are what it signed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from paysentinel.providers.rsa_keys import load_private_key, load_public_key, sign_sha256, verify_sha256

__all__ = ["load_private_key", "load_public_key"]  # the app's and Alipay's keys, as PEM or bare base64

CHINA = ZoneInfo("Asia/Shanghai")  # Alipay's clock: every time it sends or expects
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


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
    return sign_sha256(key, content.encode("utf-8"))


def rsa2_verify(key: RSAPublicKey, content: str, signature: str) -> bool:
    return verify_sha256(key, content.encode("utf-8"), signature)


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
