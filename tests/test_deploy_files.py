"""The Prometheus alert rules and the Grafana dashboard: they parse, and every metric
they use is one the running system really serves.

PromQL is checked with `promtool check rules` where promtool is installed, and always
with a PromQL parser (promql-parser)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml

import httpx
from prometheus_client.parser import text_string_to_metric_families

from paysentinel.models import STUCK_KINDS
from tests.conftest import new_order
from tests.helpers import script, start_payment, wait_status

DEPLOY = Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "paysentinel-dashboard.json"
METRIC = re.compile(r"\b((?:paysentinel|temporal)_[a-z0-9_]+)")


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]


def test_alert_rules_are_valid():
    if shutil.which("promtool"):
        result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    names = []
    for rule in rules():
        names.append(rule["alert"])
        promql_parser.parse(rule["expr"])  # raises on a PromQL error
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("page", "warning"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
    assert len(names) == len(set(names))
    # What the payment rules ask for: failure rate, stuck payments, reviews waiting.
    assert {
        "PaymentFailureRateHigh",
        "PaymentsStuckPending",
        "ReviewsWaitingTooLong",
        "RefundOrReviewStuck",
        "RefundProcessingTooLong",
    } <= set(names)
    # Every kind of stuck money pages someone.
    stuck_rules = " ".join(r["expr"] for r in rules() if "paysentinel_stuck_payments" in r["expr"])
    assert all(kind in stuck_rules for kind in STUCK_KINDS), stuck_rules
    failure = next(r for r in rules() if r["alert"] == "PaymentFailureRateHigh")
    assert "> 0.05" in failure["expr"]


def test_a_broken_expression_is_caught():
    with pytest.raises(Exception):  # noqa: B017 - the parser raises a plain Exception
        promql_parser.parse("sum(rate(paysentinel_payments_final_total[5m])")


def test_dashboard_is_valid():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    for expr in dashboard_exprs():
        promql_parser.parse(expr)


SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}


async def served_names(url: str) -> set[str]:
    """Every sample name a /metrics page serves or declares (labelled series appear once used)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
    return names


async def test_every_metric_used_is_served(stack, api, sim):
    order = new_order("deploy")  # one payment, so the worker has run workflow tasks and activities
    await script(sim, order, pay="immediately")
    await wait_status(api, (await start_payment(api, order)).json()["payment_id"], "SUCCEEDED")
    served = await served_names(f"{stack.api_url}/metrics") | await served_names(stack.sdk_metrics_url)
    used = {m for expr in [r["expr"] for r in rules()] + dashboard_exprs() for m in METRIC.findall(expr)}
    missing = sorted(used - served)
    assert not missing, f"used in deploy/ but not served: {missing}"
