"""Customer data out of Temporal histories: every payload is encrypted before it leaves the process.

The codec encrypts each payload (workflow and activity inputs and results, signals, updates,
queries, memos, summaries) with AES-256-GCM. The encrypted payload carries
``encoding: binary/encrypted`` and ``encryption-key-id: <id>`` in its metadata; its data is a
12-byte nonce followed by the ciphertext of the serialized original payload.

Keys rotate: ``PAYSENTINEL_PAYLOAD_KEYS`` is ``id:base64key,id:base64key,...``; the first key
encrypts, every listed key decrypts. Put a new key first and keep the old ones as long as any
history encrypted with them may be read (replayed, shown in the Web UI). Payloads that are not
encrypted (histories recorded before encryption) pass through decoding unchanged.

Search attributes are never encoded by a codec: they stay non-personal (order id, status,
amount, provider).

Left empty, the setting means a development key: generated once into the data directory
(``payload-keys``, mode 0600) and reused by every process that shares that directory.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec

if TYPE_CHECKING:
    from paysentinel.config import Settings

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
DEV_KEY_FILE = "payload-keys"


class PayloadKeyError(ValueError):
    """A payload cannot be decrypted (unknown key id, wrong key, damaged data) or a key is invalid."""


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """``id:base64key,...`` -> [(id, 32-byte key)], in order (the first encrypts)."""
    keys: list[tuple[str, bytes]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key_id, sep, encoded = part.partition(":")
        key_id = key_id.strip()
        if not sep or not key_id:
            raise PayloadKeyError("payload keys are 'id:base64key' pairs, comma-separated")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except ValueError as err:
            raise PayloadKeyError(f"payload key {key_id!r} is not valid base64") from err
        if len(key) != 32:
            make_one = 'python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"'
            raise PayloadKeyError(f"payload key {key_id!r} is {len(key)} bytes; AES-256 needs 32 (make one with: {make_one})")
        if any(key_id == known for known, _ in keys):
            raise PayloadKeyError(f"payload key id {key_id!r} is listed twice")
        keys.append((key_id, key))
    if not keys:
        raise PayloadKeyError("no payload keys given")
    return keys


def format_keys(keys: Sequence[tuple[str, bytes]]) -> str:
    return ",".join(f"{key_id}:{base64.b64encode(key).decode()}" for key_id, key in keys)


def dev_keys(data_dir: Path) -> list[tuple[str, bytes]]:
    """The development key in ``data_dir/payload-keys``: created once (mode 0600), then reused.

    Several processes may start at once on a fresh directory: the file appears atomically
    (written aside, then hard-linked into place), and whoever loses the race reads the winner's."""
    data_dir = Path(data_dir)
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        aside = data_dir / f".{DEV_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(format_keys([(f"dev-{secrets.token_hex(3)}", os.urandom(32))]) + "\n")
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # another process made it first: use that one
        finally:
            aside.unlink(missing_ok=True)
    return parse_keys(path.read_text())


def keys_for(settings: "Settings") -> list[tuple[str, bytes]]:
    """The configured keys, or the development key of the data directory when none are set."""
    if settings.payload_keys.strip():
        return parse_keys(settings.payload_keys)
    from paysentinel.temporal import configured_address  # (imports this module)

    if configured_address(settings) or getattr(settings, "env", "development") == "production":
        # Processes on a shared Temporal must share the key: a key per data directory would
        # leave each unable to read what the others wrote.
        raise PayloadKeyError(
            "PAYSENTINEL_PAYLOAD_KEYS is not set: outside the development profile every process needs the "
            "same payload keys ('id:base64key,...'; make a key with "
            'python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())")'
        )
    return dev_keys(settings.data_dir)


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads; the first key encrypts, all keys decrypt."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise PayloadKeyError("the codec needs at least one key")
        self._encrypt_id, key = keys[0]
        self._encrypting = AESGCM(key)
        self._keys = {key_id: AESGCM(k) for key_id, k in keys}

    @property
    def key_id(self) -> str:
        """The id of the key new payloads are encrypted with."""
        return self._encrypt_id

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        key_id = self._encrypt_id.encode()
        sealed = self._encrypting.encrypt(nonce, payload.SerializeToString(), key_id)
        return Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # not encrypted (recorded before encryption): unchanged
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        aead = self._keys.get(key_id)
        if aead is None:
            raise PayloadKeyError(
                f"payload encrypted with key id {key_id!r}, which is not among the configured payload keys "
                f"({', '.join(self._keys)}): add it to PAYSENTINEL_PAYLOAD_KEYS (any position after the first)"
            )
        try:
            plain = aead.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
        except InvalidTag as err:
            raise PayloadKeyError(
                f"payload with key id {key_id!r} does not decrypt: the configured key of that id is not the one "
                "it was encrypted with, or the payload is damaged"
            ) from err
        return Payload.FromString(plain)


def data_converter(keys: Sequence[tuple[str, bytes]]) -> DataConverter:
    """The pydantic data converter with the encryption codec."""
    return dataclasses.replace(pydantic_data_converter, payload_codec=EncryptionCodec(keys))


def data_converter_for(settings: "Settings") -> DataConverter:
    return data_converter(keys_for(settings))
