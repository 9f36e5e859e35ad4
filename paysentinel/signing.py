"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

``webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>``;
the secret is ``whsec_<base64 key>``. Several space-separated signatures may be sent
(key rotation); any valid one is accepted. Where a secret is taken, a sequence of secrets
may be given instead (the current one and the previous one during a rotation): messages are
then signed with each, and verified against any.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

Secrets = str | Sequence[str]


class SignatureError(Exception):
    """The request is not from the provider (bad or missing signature, stale timestamp)."""


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def _each(secrets: Secrets) -> list[str]:
    """One secret as given; of a sequence, the ones that are set."""
    return [secrets] if isinstance(secrets, str) else [s for s in secrets if s]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: Secrets, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(sign(key, msg_id, ts, body) for key in _each(secret)),
        "content-type": "application/json",
    }


def verify(secret: Secrets, headers: Mapping[str, str], body: bytes, tolerance_seconds: int, now: float | None = None) -> str:
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
    keys = _each(secret)
    if not keys:
        raise SignatureError("no webhook secret is configured")
    expected = [sign(key, msg_id, ts, body).split(",", 1)[1].encode() for key in keys]
    valid = False
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        # compare_digest on every candidate and key: constant time, no early exit on a match.
        for digest in expected:
            if version == "v1" and hmac.compare_digest(value.encode(), digest):
                valid = True
    if not valid:
        raise SignatureError("no valid v1 signature over the body")
    return msg_id
