"""The README's first command: `paysentinel up` on embedded defaults starts every part.

Embedded defaults (the development profile): no TEMPORAL_ADDRESS, the SQLite application
database in a fresh data dir. Only the ports are moved off the well-known ones, so the
test runs next to a user's own instance.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from paysentinel.config import DEV_OPERATOR_TOKEN
from paysentinel.devserver import free_port
from tests.conftest import new_order, stop_process


def test_paysentinel_up_on_embedded_defaults_serves_a_payment(tmp_path):
    ports = {
        name: free_port()
        for name in ("temporal", "temporal_ui", "api", "operator", "webhook", "simulator", "sdk_metrics", "metrics")
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PAYSENTINEL_", "TEMPORAL_"))}
    env.update({f"PAYSENTINEL_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    env["PAYSENTINEL_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "paysentinel.cli", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        api, operator = f"http://127.0.0.1:{ports['api']}", f"http://127.0.0.1:{ports['operator']}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"paysentinel up exited with {process.returncode}:\n{log.read_text()}"
            try:
                if all(httpx.get(f"{url}/health", timeout=1).status_code == 200 for url in (api, operator)):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not healthy after 90s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        printed = log.read_text()
        assert "paysentinel is running" in printed and f"127.0.0.1:{ports['operator']}" in printed
        assert (tmp_path / "data" / "secrets.json").exists()  # the development profile made its secrets
        # ... and merchant demo's key, with every scope: in the data dir (0600) and printed whole.
        key_file = tmp_path / "data" / "merchant-key"
        key = key_file.read_text().strip()
        assert key.startswith("psk_") and key_file.stat().st_mode & 0o777 == 0o600
        assert f"Merchant key: {key}\n" in printed

        order = new_order("quick")
        body = {"order_id": order, "amount_minor": 2599, "currency": "CNY", "subject": "Coffee beans"}
        refused = httpx.post(f"{api}/payments", json=body, timeout=30)
        assert refused.status_code == 401 and "paysentinel key create" in refused.json()["error"]
        created = httpx.post(f"{api}/payments", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert created.status_code == 201, created.text
        assert created.json()["order_id"] == order and created.json()["payment_id"] == f"payment-demo-{order}"
        assert created.json()["status"] == "PENDING" and created.json()["pay_url"]
        reviews = httpx.get(f"{operator}/operator/reviews", timeout=10, headers={"Authorization": f"Bearer {DEV_OPERATOR_TOKEN}"})
        assert reviews.status_code == 200, reviews.text
    finally:
        stop_process(process)
