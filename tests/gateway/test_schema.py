"""schemathesis against a live gateway's own /openapi.json (real cluster, tiny-random).

Every operation gets a few generated requests (Hypothesis, derandomized) and every schemathesis check runs on
each (`--checks all`): no 5xx, a declared status, the declared schema, media type and headers, schema-valid
data accepted and invalid data rejected, 405 with Allow for undeclared methods. Generation is bounded: few examples, no
Hypothesis deadline, and max_tokens clamped to a few tokens (the gateway also
defaults to 2) so the model's time stays small.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import CHECKS as ALL_CHECKS

from tests.gateway.conftest import Gateway

pytestmark = pytest.mark.multiproc
CHECKS = list(ALL_CHECKS.get_all())  # `--checks all`: positive data accepted, negative rejected, headers, ...
MAX_TOKENS = 3
MAX_EXAMPLES = 6


@pytest.fixture(scope="module")
def schema_gateway(gw_tmp, tiny_dir, cluster):
    g = Gateway(gw_tmp, tiny_dir, cluster.cfg.prefix, "--default-max-tokens", "2", "--request-timeout", "60",
                name="schema")
    yield g
    g.close()


@pytest.fixture(scope="module")
def api_schema(schema_gateway):
    return schemathesis.openapi.from_url(schema_gateway.url + "/openapi.json")


def bounded(case) -> None:
    """Keep generation requests short: max_tokens / max_completion_tokens at most MAX_TOKENS."""
    if isinstance(case.body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(name), int) and not isinstance(case.body[name], bool):
                case.body[name] = max(1, min(case.body[name], MAX_TOKENS))


def _check_operation(operation) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def run(case) -> None:
        bounded(case)
        case.call_and_validate(checks=CHECKS, timeout=60)

    run()


def test_gateway_conforms_to_its_openapi(api_schema) -> None:
    """Each operation in turn (schemathesis' pytest plugin does not support this pytest); all failures reported."""
    failures, operations = [], [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 18
    for operation in operations:
        try:
            _check_operation(operation)
        except Exception as exc:  # noqa: BLE001 - schemathesis raises a FailureGroup / check failure with the reproduction
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_spec_declares_openai_errors_and_no_422(api_schema) -> None:
    raw = api_schema.raw_schema
    chat = raw["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    assert chat["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert not any("422" in op["responses"] for item in raw["paths"].values() for op in item.values())
    metrics = raw["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert {"text/plain", "application/openmetrics-text"} <= set(metrics)
    assert "499" in chat


def test_405_allow_header_lists_the_methods_the_document_declares(schema_gateway, api_schema) -> None:
    """schemathesis' allow_header_conformance, for every path: Allow = the path's methods in the document."""
    for path, item in api_schema.raw_schema["paths"].items():
        declared = {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
        url = schema_gateway.url + path.replace("{model}", "m").replace("{", "").replace("}", "")
        undeclared = next(m for m in ("PUT", "PATCH", "DELETE", "POST") if m not in declared)
        r = httpx.request(undeclared, url, timeout=30)
        assert r.status_code == 405, (path, undeclared, r.status_code)
        assert set(r.headers["allow"].split(", ")) == declared, (path, r.headers["allow"])
