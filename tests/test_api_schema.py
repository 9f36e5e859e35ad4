"""Schemathesis against the checkout API's own OpenAPI schema, on the running system.

Generated requests (valid and invalid bodies, paths and parameters) for every operation,
with the test's merchant credentials: no answer may be a server error, and every
documented answer must match its schema.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.conftest import Stack

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_the_checkout_api_answers_generated_requests_without_server_errors(stack: Stack, api):
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")
    headers = {k: v for k, v in api.headers.items() if k.lower() == "authorization"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the checkout API publishes no operations"
    tested = []
    for operation in operations:
        if operation.path in ("/metrics",):
            continue  # Prometheus text, not JSON

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=stack.api_url, headers=headers, timeout=30)
            case.validate_response(response, checks=CHECKS)

        check()
        tested.append(f"{operation.method.upper()} {operation.path}")
    assert any(t.startswith("POST /payments") for t in tested), tested
