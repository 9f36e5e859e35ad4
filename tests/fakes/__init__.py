"""Protocol-faithful fakes of the real providers, for tests only.

Each fake is an HTTP service that speaks its provider's wire format (paths, bodies,
signatures, notifications, bills) with keys generated for the test session, keeps a
ledger, and can be told to misbehave. ``tests/conftest.py`` starts every fake listed in
``FAKES`` as its own process next to the simulator and points the system at it.

A fake module ``tests.fakes.<provider>`` provides:

- ``prepare(directory: Path, port: int, webhook_url: str) -> FakeSetup``: makes the
  session's keys under ``directory`` and returns the settings the system needs
  (``app_env``: PAYSENTINEL_* variables, keys passed as ``_FILE`` paths) and the fake's own
  environment (``fake_env``);
- running it: ``python -m tests.fakes.<provider>`` with ``fake_env`` set serves on ``port``;
- control routes shared by all fakes (and the simulator): ``GET /health``,
  ``GET /control/ledger?order=a&order=b`` -> ``{"orders": {order: {"order", "currency",
  "captured_minor", "refunded_minor", "net_minor", "trades": [...], "refunds": [...]}}}``,
  ``POST /control/pay/{order}`` (the payer pays), ``PUT /control/scripts/{order}``
  (behaviour: failure codes to answer, notifications lost, ...), ``POST /control/fail``
  (answer the next calls of a route with a provider's error code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAKES = ("alipay", "wechatpay", "stripe")


@dataclass
class FakeSetup:
    app_env: dict[str, str] = field(default_factory=dict)
    fake_env: dict[str, str] = field(default_factory=dict)
