"""`paysentinel demo --provider <name>` as a user runs it from the repository root: it starts
the provider's fake and a system of its own, runs the scenarios, compares the provider's
ledger with our database, stops everything and says so in its exit code and summary line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = float(os.environ.get("PAYSENTINEL_TEST_DEMO_TIMEOUT_SECONDS", "300"))
SUMMARY = re.compile(r"^(\d+) of (\d+) scenarios as expected", re.MULTILINE)


def run_demo(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PAYSENTINEL_", "TEMPORAL_"))}
    if "PAYSENTINEL_CACHE_DIR" in os.environ:
        env["PAYSENTINEL_CACHE_DIR"] = os.environ["PAYSENTINEL_CACHE_DIR"]
    env["COLUMNS"] = "160"
    try:
        return subprocess.run(
            [sys.executable, "-m", "paysentinel.cli", "demo", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"paysentinel demo {' '.join(args)} did not finish in {TIMEOUT_SECONDS:g}s:\n{output[-6000:]}", pytrace=False)


def started_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)]


def assert_all_as_expected(result: subprocess.CompletedProcess, provider: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{output[-8000:]}"
    found = SUMMARY.search(result.stdout)
    assert found and found.group(1) == found.group(2), output[-8000:]
    if provider != "simulator":
        assert f"on the {provider} fake; its ledger agrees with our database for {found.group(2)} of" in result.stdout
    # Every process it started (paysentinel up, the fake) is gone.
    pids = started_pids(result.stdout)
    assert pids, result.stdout[-4000:]
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone
        assert "zombie" in state.lower(), f"pid {pid} still runs:\n{state[:300]}"


@pytest.mark.parametrize("provider", ["alipay", "wechatpay", "stripe"])
def test_demo_runs_the_scenarios_against_the_providers_fake(provider):
    result = run_demo("--provider", provider)
    assert_all_as_expected(result, provider)


def test_demo_on_the_simulator_with_a_system_of_its_own():
    result = run_demo("--provider", "simulator", "--own-system")
    assert_all_as_expected(result, "simulator")
    assert "reconciliation found and refunded the unknown payment" in result.stdout


def test_an_unknown_provider_is_refused():
    result = run_demo("--provider", "paypal")
    assert result.returncode == 2 and "unknown provider paypal" in result.stdout + result.stderr


def test_outside_a_checkout_it_says_to_run_from_the_repository_root(tmp_path):
    # The product's packages without the repository's tests package, run from another directory.
    packages = tmp_path / "packages"
    packages.mkdir()
    for entry in ROOT.iterdir():
        if (entry / "__init__.py").exists() and entry.name != "tests":
            (packages / entry.name).symlink_to(entry)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PAYSENTINEL_", "TEMPORAL_"))}
    env["PYTHONPATH"] = str(packages)
    result = subprocess.run(
        [sys.executable, "-m", "paysentinel.cli", "demo", "--provider", "alipay"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "run it from the repository root" in " ".join(output.split()), output
    assert not any(elsewhere.iterdir())
