"""The REST API fuzzed from its own OpenAPI description (schemathesis) on a real gateway.

schemathesis reads ``/openapi.json`` from the ``cnnserve serve`` process and, for every
operation, sends requests generated from it — schema-valid ones and deliberately invalid
ones (wrong types, missing bodies, unknown models, undeclared methods) — and checks each
answer: never a 5xx, only documented statuses and content types, bodies that match the
documented schemas, invalid data rejected, a 405 that says which methods are allowed.

One exception: load and unload answer 503 outside explicit model control mode, as Triton does
(documented, not a failure). The fuzzed gateway stays in the default mode so that fuzzing
cannot unload the models the other fuzzers call, so those two operations may answer 503 —
but never 500.

Not checked: that every schema-valid request is accepted. A JSON Schema cannot say that a
tensor's ``data`` must hold as many elements as its ``shape`` declares, so schema-valid
infer bodies are rightly refused with 400.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import CHECKS, not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cnnserve.gateway.openapi import ERROR_MEANINGS
from tests.gateway.bad_input import CALL_TIMEOUT_S
from tests.support import GatewayProcess

#: Every built-in check but the one the docstring explains.
CHECKED = [check for check in CHECKS.get_all() if check is not positive_data_acceptance]
#: What load and unload are checked for in the fuzzed gateway's mode (see the docstring).
CHECKED_REPOSITORY_CONTROL = [check for check in CHECKED if check is not not_a_server_error]
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway: GatewayProcess) -> BaseSchema:
    """The gateway's description, loaded from the running server."""
    url = f"http://127.0.0.1:{fuzz_gateway.http_port}/openapi.json"
    return schemathesis.openapi.from_url(url)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_rest_api_conforms_to_its_description(
    api_schema: BaseSchema, mode: GenerationMode, serving: Callable[[], None]
) -> None:
    """Generated requests, schema-valid (positive) and not (negative), to every operation:
    documented answers only, invalid data rejected, never a 5xx."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    if mode is GenerationMode.NEGATIVE:
        # Only what takes input can be sent invalid input.
        operations = [op for op in operations if any(op.iter_parameters()) or len(op.body)]

    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            control = case.operation.path.startswith("/v2/repository/models/")
            checks = CHECKED_REPOSITORY_CONTROL if control else CHECKED
            response = case.call_and_validate(checks=checks, timeout=CALL_TIMEOUT_S)
            assert response.status_code != 500, response.text

        check()
    serving()


def _document(gateway: GatewayProcess) -> dict:
    reply = httpx.get(f"http://127.0.0.1:{gateway.http_port}/openapi.json", timeout=10)
    reply.raise_for_status()
    return reply.json()  # type: ignore[no-any-return]


def test_description_has_bodies_errors_and_models(fuzz_gateway: GatewayProcess) -> None:
    """What FastAPI cannot infer is described: the infer and image bodies, the error table's
    statuses with the ``{"error"}`` body, the served models — and no 422, never sent."""
    paths = _document(fuzz_gateway)["paths"]
    infer = paths["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert set(infer["responses"]) == {"200", "400", "404", "413", "429", "500", "503", "504"}
    assert infer["responses"]["429"]["description"] == ERROR_MEANINGS["429"]
    model = next(p for p in infer["parameters"] if p["name"] == "model")
    assert model["schema"]["enum"] == ["convnet", "fcn"]
    predict = paths["/predict/{model}"]["post"]
    assert "image/png" in predict["requestBody"]["content"]
    options = {p["name"]: p["schema"] for p in predict["parameters"] if p["in"] == "query"}
    assert options.pop("version")["type"] == "string"
    assert options == {
        "top_k": {"type": "integer", "minimum": 1, "default": 3},
        "format": {"type": "string", "enum": ["png", "json"], "default": "png"},
    }
    assert all("422" not in op["responses"] for ops in paths.values() for op in ops.values())


def test_description_has_the_repository_extensions(fuzz_gateway: GatewayProcess) -> None:
    """Triton's repository, configuration and statistics routes, with their bodies; load and
    unload take any folder's name, not only a served model's."""
    paths = _document(fuzz_gateway)["paths"]
    load = paths["/v2/repository/models/{model}/load"]["post"]
    assert set(load["responses"]) == {"200", "400", "404", "500", "503"}
    assert load["requestBody"]["required"] is False
    (model,) = load["parameters"]
    assert "enum" not in model["schema"]
    index = paths["/v2/repository/index"]["post"]["responses"]["200"]
    assert index["content"]["application/json"]["schema"]["$ref"].endswith("/RepositoryIndex")
    for path in ("/v2/models/stats", "/v2/models/{model}/versions/{version}/stats"):
        ok = paths[path]["get"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"]["$ref"].endswith("/ModelStatistics")
    config = paths["/v2/models/{model}/config"]["get"]
    assert set(config["responses"]) == {"200", "400", "404", "500", "503"}
