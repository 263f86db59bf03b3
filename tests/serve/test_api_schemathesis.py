"""schemathesis against `/openapi.json` of a live server: generated requests, valid and
invalid, never get a 5xx, and answers keep to the documented status codes, content types and
schemas. (Driven through hypothesis directly: schemathesis' pytest plugin does not run under
this pytest.)"""

from __future__ import annotations

import pytest

from astrai_serve import InferenceEngine
from astrai_serve.api import ServerConfig, create_app

schemathesis = pytest.importorskip("schemathesis")
from api_helpers import LiveServer  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
              ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("GET", "/health"),
              ("GET", "/metrics")]
EXAMPLES = {"POST": 40, "GET": 10}


@pytest.fixture(scope="module")
def api_schema(model, tokenizer):
    # A short window bounds the work of any generated request (max_tokens is clamped to it).
    with InferenceEngine(model, tokenizer, max_seq_len=48, page_size=8) as engine, \
            LiveServer(create_app(engine, ServerConfig(served_model_name="tiny"))) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_schema_documents_every_route(api_schema):
    documented = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


# Invalid (negative) data only exists where there is input to get wrong: the request bodies.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_generated_requests_never_get_a_server_error(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[method], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"  # else nearly every case stops at 404 unknown model
        case.call_and_validate(checks=CHECKS, timeout=60)

    run()
