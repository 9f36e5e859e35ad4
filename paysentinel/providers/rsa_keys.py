"""RSA keys and SHA256withRSA signatures (PKCS#1 v1.5, base64), as Alipay (RSA2) and WeChat
Pay (WECHATPAY2-SHA256-RSA2048) both use them.

Keys come from settings or files: PEM (a one-line environment variable may carry literal
``\\n`` escapes), the bare base64 DER body that providers' consoles and key tools print, or,
for a public key, an X.509 certificate (WeChat Pay's platform-certificate mode).
"""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey


def key_text(text: str) -> str:
    """The key as PEM text: literal ``\\n`` escapes become line breaks."""
    return text.strip().replace("\\r", "").replace("\\n", "\n").strip() + "\n"


def _der(text: str) -> bytes:
    return base64.b64decode("".join(text.split()))


def load_private_key(text: str) -> RSAPrivateKey:
    """A private key: PEM (PKCS#1 or PKCS#8) or the bare base64 PKCS#8 body."""
    text = key_text(text)
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            key = serialization.load_der_private_key(_der(text), password=None)
    except (ValueError, TypeError, binascii.Error) as err:
        raise ValueError(f"not an RSA private key: {err}") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public_key(text: str) -> RSAPublicKey:
    """A public key: PEM, an X.509 certificate (PEM), or the bare base64 SubjectPublicKeyInfo."""
    text = key_text(text)
    key: object
    try:
        if "BEGIN CERTIFICATE" in text:
            key = x509.load_pem_x509_certificate(text.encode()).public_key()
        elif "-----BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(_der(text))
    except (ValueError, TypeError, binascii.Error) as err:
        raise ValueError(f"not an RSA public key: {err}") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def sign_sha256(key: RSAPrivateKey, message: bytes) -> str:
    """SHA256withRSA (PKCS#1 v1.5) over ``message``, base64."""
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify_sha256(key: RSAPublicKey, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``key``'s SHA256withRSA signature over ``message``."""
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), message, padding.PKCS1v15(), hashes.SHA256())
        return True
    except (InvalidSignature, binascii.Error, ValueError):
        return False
