"""The server against its own OpenAPI document: schemathesis generates valid and invalid requests
for every operation and checks each answer's status, content type, headers and body against
what the document promises, over real HTTP on loopback (the tiny model; a bounded number of
examples, so `make test` stays fast)."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Valid data may still be refused with a 400 the schema cannot express (a prompt longer than the
# context, a tool message answering no call), so `positive_data_acceptance` is not among them.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]
METHODS = {"get", "put", "post", "delete", "patch"}
OPERATIONS = ["GET /v1/models", "GET /v1/models/{model_id}", "GET /health", "GET /v1/kv",
              "POST /v1/completions", "POST /v1/chat/completions"]


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    return schemathesis.openapi.from_url(
        tiny_server.base_url.removesuffix("/v1") + "/openapi.json")


def test_the_document_lists_every_operation(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), [
    *((label, GenerationMode.POSITIVE) for label in OPERATIONS),
    *((label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")),
])
def test_answers_conform_to_the_openapi_document(api_schema, tiny_engine, label, mode):
    operation = api_schema.find_operation_by_label(label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        if mode is GenerationMode.POSITIVE:  # the served model, and short generations
            if isinstance(case.body, dict):
                case.body.update(model=tiny_engine.name, max_tokens=2)
            if case.path_parameters:
                case.path_parameters["model_id"] = tiny_engine.name
        case.call_and_validate(checks=CHECKS, timeout=60)

    check()


@pytest.fixture(scope="module")
def document(tiny_server):
    return httpx.get(tiny_server.base_url.removesuffix("/v1") + "/openapi.json").json()


def test_every_operation_documents_the_500_of_an_unexpected_error(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                error = operation["responses"].get("500")
                assert error, f"{method.upper()} {path} documents no 500"
                assert error["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}


def test_an_unexpected_error_conforms_to_the_document(api_schema, tiny_engine, monkeypatch):
    def crash(_request):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_engine, "encode", crash)
    operation = api_schema.find_operation_by_label("POST /v1/completions")
    case = operation.Case(body={"model": tiny_engine.name, "prompt": "x", "max_tokens": 2},
                          media_type="application/json")
    response = case.call_and_validate(checks=[c for c in CHECKS if c is not not_a_server_error],
                                      timeout=60)
    assert response.status_code == 500


def test_other_methods_are_405s_with_allow_as_the_document_says(document, tiny_server):
    described = document["components"]["responses"]["MethodNotAllowed"]
    assert "Allow" in described["headers"]
    base = tiny_server.base_url.removesuffix("/v1")
    with httpx.Client(base_url=base, timeout=60) as http:
        for path, item in document["paths"].items():
            allowed = sorted(method.upper() for method in item if method in METHODS)
            assert "405" in item["description"] and "MethodNotAllowed" in item["description"]
            url = path.replace("{model_id}", "some-model")
            for method in sorted(METHODS - set(item)):
                response = http.request(method.upper(), url)
                assert response.status_code == 405, (method, path, response.text)
                assert sorted(response.headers["allow"].split(", ")) == allowed
                assert response.json()["error"]["code"] == "method_not_allowed"
