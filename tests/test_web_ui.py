"""The operator's view: the real Temporal Web UI, driven by headless Chromium (Debian's).

Finds a payment started by the test by its OrderId, the way an operator does, and opens
its history. Screenshots are kept next to the test log (printed at the end)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from urllib.parse import quote

import pytest

from tests.conftest import OPERATORS, new_order
from tests.helpers import provider_order, script, search_count, start_payment, wait_status


def chromium() -> str:
    path = os.environ.get("PAYSENTINEL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "no Chromium found: run `bash scripts/ensure-chromium.sh` (installs Debian's chromium) or set PAYSENTINEL_CHROMIUM",
            pytrace=False,
        )
    return path


async def test_operator_finds_a_payment_by_order_id_in_the_web_ui(api, sim, client, stack, temporal_server, tmp_path):
    from playwright.async_api import async_playwright

    order = new_order("ui")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order, amount_minor=4200)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    internal = provider_order(order)  # operators search by the internal order number
    await search_count(client, f'OrderId = "{internal}" AND PaymentStatus = "SUCCEEDED"', 1)

    ui = temporal_server.ui_url
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        page = await browser.new_page(viewport={"width": 1440, "height": 900})
        try:
            # Histories hold payloads encrypted: the operator signs in to the codec endpoint once and
            # points the Web UI's codec setting at it, with cross-origin credentials (README).
            await page.goto(f"{stack.operator_url}/codec/login")
            await page.get_by_label("Operator token").fill(OPERATORS["alice"])
            await page.get_by_role("button", name="Sign in").click()
            await page.get_by_text("Signed in as alice").wait_for(timeout=10_000)
            await page.goto(ui)
            await page.evaluate(
                """endpoint => {
                localStorage.setItem("endpoint", JSON.stringify(endpoint));
                localStorage.setItem("includeCredentials", "true");
                localStorage.setItem("overrideRemoteCodecConfiguration", "true");
            }""",
                f"{stack.operator_url}/codec",
            )

            query = f'OrderId="{internal}"'
            await page.goto(f"{ui}/namespaces/default/workflows?query={quote(query)}")
            row = page.get_by_role("link", name=payment_id).first
            await row.wait_for(timeout=30_000)
            await page.screenshot(path=tmp_path / "web-ui-search.png", full_page=True)
            # Only this payment matches its order number: one run, or two once the paid payment
            # continued as new into its refund phase (a slow machine gets there first).
            await page.get_by_text(re.compile(r"^(1 Workflow|2 Workflows)$")).first.wait_for(timeout=30_000)
            listed = await page.get_by_role("link", name=re.compile(r"^payment-")).all_inner_texts()
            assert listed and set(listed) == {payment_id}, listed

            # The payment's first run holds its checkout (and its summary): open that one.
            description = await client.get_workflow_handle(payment_id).describe()
            first_run = description.raw_description.workflow_execution_info.first_run_id
            await page.locator(f'a[href*="{first_run}"]').first.click()
            await page.get_by_text(f"Payment for order {internal}").first.wait_for(timeout=30_000)
            await page.get_by_text("create_trade").first.wait_for(timeout=30_000)
            # The payment's input, decoded by the codec endpoint: the customer's e-mail in clear.
            await page.get_by_text(f"{order}@example.com").first.wait_for(timeout=30_000)
            await page.screenshot(path=tmp_path / "web-ui-history.png", full_page=True)
        finally:
            await browser.close()
    print(f"\n[Web UI screenshots: {tmp_path}]", file=sys.stderr)


async def test_the_readme_filters_are_valid_queries(client):
    """Every list filter the README gives operators is accepted by Temporal's visibility."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Finding payments in the Temporal Web UI", 1)[1].split("\n## ", 1)[0]
    filters = [m for row in section.splitlines() if row.startswith("| ") for m in re.findall(r"`([^`]+)`", row)]
    filters = [f for f in filters if "=" in f or "<" in f or ">" in f]
    assert len(filters) >= 8, filters
    for query in filters:
        await client.count_workflows(query)  # raises on an invalid query
