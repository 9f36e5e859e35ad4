"""WeChat Pay API v3 signatures and encrypted resources.

Requests: ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid="..",nonce_str="..",
signature="..",timestamp="..",serial_no=".."`` where the signature is SHA256withRSA
(PKCS#1 v1.5, base64) with the merchant's private key over
``METHOD\\nPATH_WITH_QUERY\\nTIMESTAMP\\nNONCE\\nBODY\\n``.

Answers and notifications carry ``Wechatpay-Timestamp``, ``Wechatpay-Nonce``,
``Wechatpay-Signature`` and ``Wechatpay-Serial``: a signature with WeChat Pay's key over
``TIMESTAMP\\nNONCE\\nBODY\\n``. In public-key mode the serial is the key's id
(``PUB_KEY_ID_...``). Notification resources are AEAD_AES_256_GCM with the APIv3 key.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Mapping
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from paysentinel.providers.rsa_keys import key_text, load_private_key, load_public_key, sign_sha256, verify_sha256
from paysentinel.signing import SignatureError

__all__ = ["load_private_key", "load_public_key"]  # the merchant's key; WeChat Pay's key or certificate

SCHEMA = "WECHATPAY2-SHA256-RSA2048"
AEAD = "AEAD_AES_256_GCM"


class DecryptionError(ValueError):
    """A notification resource that the APIv3 key does not open."""


pem_text = key_text  # a PEM given inline may carry literal ``\\n`` escapes


def new_nonce() -> str:
    return secrets.token_hex(16).upper()


def request_message(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def response_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


rsa_sign = sign_sha256
rsa_verify = verify_sha256


def authorization(
    *,
    mchid: str,
    serial_no: str,
    key: rsa.RSAPrivateKey,
    method: str,
    path: str,
    body: bytes,
    timestamp: Optional[int] = None,
    nonce: Optional[str] = None,
) -> str:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or new_nonce()
    signature = rsa_sign(key, request_message(method, path, ts, nonce, body))
    return f'{SCHEMA} mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",timestamp="{ts}",serial_no="{serial_no}"'


_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_authorization(header: str) -> dict[str, str]:
    """The parameters of an Authorization header; ValueError when it is not this schema."""
    schema, _, rest = header.strip().partition(" ")
    if schema != SCHEMA:
        raise ValueError(f"Authorization schema is {schema!r}, not {SCHEMA}")
    params = dict(_PARAM.findall(rest))
    missing = [p for p in ("mchid", "nonce_str", "signature", "timestamp", "serial_no") if not params.get(p)]
    if missing:
        raise ValueError(f"Authorization lacks {', '.join(missing)}")
    return params


def signed_headers(
    key: rsa.RSAPrivateKey, serial: str, body: bytes, *, timestamp: Optional[int] = None, nonce: Optional[str] = None
) -> dict[str, str]:
    """The Wechatpay-* headers WeChat Pay puts on an answer or a notification."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or new_nonce()
    return {
        "Wechatpay-Timestamp": ts,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": rsa_sign(key, response_message(ts, nonce, body)),
        "Wechatpay-Serial": serial,
        "Wechatpay-Signature-Type": SCHEMA,
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value or ""


def verify_signed(
    headers: Mapping[str, str],
    body: bytes,
    keys: Mapping[str, rsa.RSAPublicKey],
    tolerance_seconds: float,
    now: Optional[float] = None,
) -> None:
    """Check the Wechatpay-* headers over the raw body with the key whose id (or certificate
    serial) is Wechatpay-Serial. Raises SignatureError."""
    timestamp = _header(headers, "Wechatpay-Timestamp")
    nonce = _header(headers, "Wechatpay-Nonce")
    signature = _header(headers, "Wechatpay-Signature")
    serial = _header(headers, "Wechatpay-Serial")
    if not (timestamp and nonce and signature and serial):
        raise SignatureError("missing Wechatpay-Timestamp, Wechatpay-Nonce, Wechatpay-Signature or Wechatpay-Serial")
    signature_type = _header(headers, "Wechatpay-Signature-Type")
    if signature_type and signature_type != SCHEMA:
        raise SignatureError(f"Wechatpay-Signature-Type {signature_type!r} is not {SCHEMA}")
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError("Wechatpay-Timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_seconds:
        raise SignatureError(f"Wechatpay-Timestamp is more than {tolerance_seconds:g}s away from now")
    key = keys.get(serial)
    if key is None:
        raise SignatureError(f"Wechatpay-Serial {serial!r} is not the configured WeChat Pay public key id")
    if not rsa_verify(key, response_message(timestamp, nonce, body), signature):
        raise SignatureError("Wechatpay-Signature does not verify over the body")


def encrypt_resource(
    apiv3_key: str, plaintext: bytes, associated_data: str, original_type: str, nonce: Optional[str] = None
) -> dict[str, str]:
    """An encrypt-resource as WeChat Pay puts it in a notification (the fakes use it)."""
    nonce = nonce or secrets.token_hex(6)  # 12 characters
    ciphertext = AESGCM(apiv3_key.encode()).encrypt(nonce.encode(), plaintext, associated_data.encode())
    return {
        "algorithm": AEAD,
        "ciphertext": base64.b64encode(ciphertext).decode(),
        "associated_data": associated_data,
        "nonce": nonce,
        "original_type": original_type,
    }


def decrypt_resource(apiv3_key: str, resource: Mapping[str, object]) -> bytes:
    if resource.get("algorithm") != AEAD:
        raise DecryptionError(f"resource algorithm {resource.get('algorithm')!r} is not {AEAD}")
    try:
        nonce = str(resource["nonce"]).encode()
        ciphertext = base64.b64decode(str(resource["ciphertext"]), validate=True)
        associated = str(resource.get("associated_data") or "").encode()
        return AESGCM(apiv3_key.encode()).decrypt(nonce, ciphertext, associated)
    except (KeyError, ValueError, InvalidTag) as err:
        raise DecryptionError(f"the resource does not decrypt with the APIv3 key ({type(err).__name__})") from err
