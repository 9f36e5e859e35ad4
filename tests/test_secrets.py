"""No published secret outside the development profile; secrets from files; rotation.

Real processes: `python -m paysentinel.cli up --parts webhooks` on the test's Temporal and
PostgreSQL is refused with a development secret and starts with secrets of its own (from
files); callbacks signed with the previous secret are accepted during a rotation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from paysentinel import signing
from paysentinel.config import DEV_WEBHOOK_SECRET, SECRETS, Secret, Settings, new_webhook_secret
from paysentinel.devserver import free_port
from paysentinel.profile import SECRETS_FILE, SecretsRefused, development_secrets, secured
from paysentinel.runner import PARTS
from tests.conftest import Stack, _wait_healthy, new_order, stop_process
from tests.helpers import (
    MERCHANT_PREVIOUS_SECRET,
    MERCHANT_SECRET,
    own_operator_tokens,
    receiver,
    script,
    start_payment,
    wait_for,
    wait_status,
)
from tests.test_webhooks import trade_event


def clean_env(**values: str) -> dict[str, str]:
    """The environment without any paysentinel setting of the caller, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSENTINEL_") and k != "TEMPORAL_ADDRESS"}
    env.update(values)
    return env


def production_env(stack: Stack, tmp_path: Path, *, without: Iterable[Secret] = (), **values: str) -> dict[str, str]:
    """The test stack's environment (its Temporal, its database, its secrets of its own) for
    another process: ``without`` those secrets, with ``values``."""
    env = {
        **stack.env,
        "PAYSENTINEL_DATA_DIR": str(tmp_path / "data"),
        "PAYSENTINEL_WEBHOOK_PORT": str(free_port()),
        "PAYSENTINEL_TRACING": "off",
    }
    for secret in without:
        env.pop(secret.variable, None)
        env.pop(secret.file_variable, None)
    env.update(values)
    return env


def refused(env: dict[str, str], parts: str = "webhooks") -> str:
    """Start parts that must refuse to start: returns what they printed."""
    result = subprocess.run(
        [sys.executable, "-m", "paysentinel.cli", "up", "--parts", parts],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"started without secrets of its own:\n{output}"
    assert "refusing to start" in output, output
    return output


def test_production_start_with_the_development_secret_is_refused(stack, tmp_path):
    output = refused(production_env(stack, tmp_path, PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET=DEV_WEBHOOK_SECRET))
    assert "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET holds a published development value" in output
    assert "PAYSENTINEL_MERCHANT_WEBHOOK_SECRET " not in output and "PAYSENTINEL_OPERATOR_TOKENS " not in output

    # Missing secrets, and the development operator (the default) are refused just the same.
    output = refused(production_env(stack, tmp_path, without=SECRETS))
    for variable in ("PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET", "PAYSENTINEL_MERCHANT_WEBHOOK_SECRET"):
        assert f"{variable} is not set" in output and f"{variable}_FILE" in output
    assert "PAYSENTINEL_OPERATOR_TOKENS holds a published development value" in output
    # A previous secret that is the development one would accept forged callbacks.
    output = refused(production_env(stack, tmp_path, PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET_PREVIOUS=DEV_WEBHOOK_SECRET))
    assert "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET_PREVIOUS holds a published development value" in output


def test_every_start_but_embedded_development_is_production(tmp_path):
    """The whole system on embedded defaults is development, unless PAYSENTINEL_ENV=production;
    `paysentinel up` with PAYSENTINEL_ENV=production refuses before it starts anything."""
    output = refused(clean_env(PAYSENTINEL_ENV="production", PAYSENTINEL_DATA_DIR=str(tmp_path)), ",".join(PARTS))
    assert "PAYSENTINEL_ENV is production" in output and "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET is not set" in output
    assert not (tmp_path / SECRETS_FILE).exists() and not (tmp_path / "temporal.db").exists()
    for settings, parts, why in [
        (Settings(data_dir=tmp_path, env="production"), PARTS, "PAYSENTINEL_ENV"),
        (Settings(data_dir=tmp_path).model_copy(update={"temporal_address": "127.0.0.1:7233"}), PARTS, "TEMPORAL_ADDRESS"),
        (Settings(data_dir=tmp_path, database_url="postgresql+asyncpg://u:p@h/db"), PARTS, "PAYSENTINEL_DATABASE_URL"),
        (Settings(data_dir=tmp_path), ["webhooks"], r"only part\(s\) webhooks"),
    ]:
        with pytest.raises(SecretsRefused, match=why):
            secured(settings, parts, PARTS)


def test_development_profile_generates_its_secrets_once(tmp_path):
    data_dir = tmp_path / "data"
    first = secured(Settings(data_dir=data_dir), PARTS, PARTS)
    stored = data_dir / SECRETS_FILE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    saved = json.loads(stored.read_text())
    assert first.simulator_webhook_secret == saved["simulator_webhook_secret"] != DEV_WEBHOOK_SECRET
    assert first.merchant_webhook_secret == saved["merchant_webhook_secret"] != DEV_WEBHOOK_SECRET
    assert first.simulator_webhook_secret != first.merchant_webhook_secret
    signing.verify(
        first.simulator_webhook_secret,  # a usable Standard Webhooks secret
        signing.signed_headers(first.simulator_webhook_secret, "evt", b"{}"),
        b"{}",
        60,
    )
    # The next start reuses them (the simulator and the receiver read the same settings).
    again = secured(Settings(data_dir=data_dir), PARTS, PARTS)
    assert (again.simulator_webhook_secret, again.merchant_webhook_secret) == (
        first.simulator_webhook_secret,
        first.merchant_webhook_secret,
    )
    assert development_secrets(data_dir) == {k: v for k, v in saved.items()}
    # A secret set explicitly wins over the generated one.
    mine = new_webhook_secret()
    assert secured(Settings(data_dir=data_dir, merchant_webhook_secret=mine), PARTS, PARTS).merchant_webhook_secret == mine
    assert json.loads(stored.read_text()) == saved


def test_secret_files_are_read_and_their_newline_stripped(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PAYSENTINEL_"):
            monkeypatch.delenv(key)
    secret = new_webhook_secret()
    (tmp_path / "s").write_text(secret + "\n")
    for item in SECRETS:
        monkeypatch.setenv(item.file_variable, str(tmp_path / "s")) if item.name.endswith("webhook_secret") else None
    settings = Settings()
    assert settings.simulator_webhook_secret == settings.merchant_webhook_secret == secret
    monkeypatch.setenv("PAYSENTINEL_MERCHANT_WEBHOOK_SECRET", secret)
    with pytest.raises(ValueError, match="PAYSENTINEL_MERCHANT_WEBHOOK_SECRET or PAYSENTINEL_MERCHANT_WEBHOOK_SECRET_FILE"):
        Settings()
    monkeypatch.delenv("PAYSENTINEL_MERCHANT_WEBHOOK_SECRET")
    monkeypatch.setenv("PAYSENTINEL_MERCHANT_WEBHOOK_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="PAYSENTINEL_MERCHANT_WEBHOOK_SECRET_FILE: cannot read"):
        Settings()


@pytest.fixture(scope="module")
def rotating_receiver(stack, tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """`up --parts webhooks` in production, every secret from a file, during a rotation of the
    provider's callback secret: yields (receiver URL, current secret, previous secret)."""
    tmp_path = tmp_path_factory.mktemp("secrets")
    current, previous = new_webhook_secret(), new_webhook_secret()
    files = {
        "simulator_webhook_secret": current,
        "simulator_webhook_secret_previous": previous,
        "merchant_webhook_secret": new_webhook_secret(),
        "operator_tokens": own_operator_tokens(),
    }
    env = production_env(stack, tmp_path, without=[s for s in SECRETS if s.name in files], PAYSENTINEL_ENV="production")
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o600)
        env[f"PAYSENTINEL_{name.upper()}_FILE"] = str(tmp_path / name)
    log_file = tmp_path / "webhooks.log"
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "paysentinel.cli", "up", "--parts", "webhooks"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{env['PAYSENTINEL_WEBHOOK_PORT']}"
    try:
        _wait_healthy([url], process, log_file)
        yield url, current, previous
    finally:
        stop_process(process)


def test_production_start_with_secret_files_starts(rotating_receiver):
    url, _, _ = rotating_receiver
    assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}


@pytest.mark.parametrize("which", ["current", "previous", "both"])
def test_callback_signed_with_current_or_previous_secret_is_accepted(rotating_receiver, which):
    url, current, previous = rotating_receiver
    secrets = {"current": current, "previous": previous, "both": (current, previous)}[which]
    event_id, body = trade_event(new_order("rot"), f"2026{uuid.uuid4().int % 10**12:012d}")
    response = httpx.post(
        url + "/webhooks/simulator", content=body, headers=signing.signed_headers(secrets, event_id, body), timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "unknown_payment"  # verified and stored; no such payment here


def test_callback_signed_with_an_unknown_secret_is_refused(rotating_receiver):
    url, _, _ = rotating_receiver
    event_id, body = trade_event(new_order("rot"), "2026000000000001")
    for secret in (new_webhook_secret(), DEV_WEBHOOK_SECRET):
        response = httpx.post(
            url + "/webhooks/simulator", content=body, headers=signing.signed_headers(secret, event_id, body), timeout=10
        )
        assert response.status_code == 401 and "signature" in response.json()["error"]


def test_signatures_with_each_secret_during_a_rotation():
    body = b'{"id":"evt"}'
    headers = signing.signed_headers((MERCHANT_SECRET, MERCHANT_PREVIOUS_SECRET, ""), "evt", body)
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (MERCHANT_SECRET, MERCHANT_PREVIOUS_SECRET, [MERCHANT_SECRET, MERCHANT_PREVIOUS_SECRET]):
        assert signing.verify(secret, headers, body, 60) == "evt"
    with pytest.raises(signing.SignatureError):
        signing.verify(new_webhook_secret(), headers, body, 60)


async def test_merchant_webhook_verifies_with_the_previous_secret(api, sim):
    """The stack rotates the merchant secret: a merchant still on the previous one accepts our webhooks."""
    order = new_order("rot-merchant")
    await script(sim, order, pay="immediately")
    async with receiver([200], host="localhost", secret=MERCHANT_PREVIOUS_SECRET) as (url, received):
        payment_id = (await start_payment(api, order, notify_url=url)).json()["payment_id"]
        await wait_status(api, payment_id, "SUCCEEDED")

        async def arrived() -> bool:
            return len(received) >= 1

        await wait_for(arrived, what="the merchant webhook signed with the previous secret")
    assert received[0][1] == f"{payment_id}:paid"
