"""``paysentinel demo --provider``: the demo against a provider's fake, on a system of its own.

For ``alipay``, ``wechatpay`` and ``stripe`` the demo starts that provider's protocol-faithful
fake (``tests/fakes``, so it runs from a checkout of the repository) and ``paysentinel up`` on
embedded defaults pointed at it: a temporary data dir, the SQLite database, the Temporal dev
server as ``paysentinel up`` starts it, free loopback ports and short timings. It then drives
one payment per scenario, compares our database with the provider's ledger for each order
(captured − refunded against paid − refunded), and stops every process it started.

- ``system``: the fakes and the system the demo starts;
- ``scenarios``: what each scenario does and expects, per provider;
- ``run``: driving the scenarios and printing the results.
"""

from paysentinel.demo_providers.run import run_fake_demo, run_on_own_system, run_providers
from paysentinel.demo_providers.scenarios import ProviderScenario, provider_scenarios
from paysentinel.demo_providers.system import (
    AMOUNT_MINOR,
    DEMO_TIMINGS,
    FAKE_PROVIDERS,
    MERCHANT,
    PROVIDERS,
    DemoUnavailable,
    System,
    load_fake,
)

__all__ = [
    "AMOUNT_MINOR",
    "DEMO_TIMINGS",
    "FAKE_PROVIDERS",
    "MERCHANT",
    "PROVIDERS",
    "DemoUnavailable",
    "ProviderScenario",
    "System",
    "load_fake",
    "provider_scenarios",
    "run_fake_demo",
    "run_on_own_system",
    "run_providers",
]
