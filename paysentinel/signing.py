"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

``webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>``;
the secret is ``whsec_<base64 key>``. Several space-separated signatures may be sent
(key rotation); any valid one is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping


class SignatureError(Exception):
    """The request is not from the provider (bad or missing signature, stale timestamp)."""


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_seconds: int, now: float | None = None) -> str:
    """Check the signature over the raw body; return the message id. Raises SignatureError."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not timestamp or not signatures:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_seconds:
        raise SignatureError(f"webhook-timestamp is more than {tolerance_seconds}s away from now")
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1].encode()
    valid = False
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        # compare_digest on every candidate: constant time, no early exit on a match.
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            valid = True
    if not valid:
        raise SignatureError("no valid v1 signature over the body")
    return msg_id
