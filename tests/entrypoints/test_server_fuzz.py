"""Schemathesis fuzzing of the server from its own OpenAPI schema (FastAPI publishes it).

Bounded: a fixed number of generated requests, valid by the schema and not, against the
shared tiny-model server over a real socket. No response may be a 5xx, every response
must match the schema (status code, content type, body), and the server must still
answer a normal request after, with every KV block back in the pool.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from helpers import assert_pool_free, check_normal_request

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 150, schemathesis.GenerationMode.NEGATIVE: 100}


def _cap_generation(case) -> None:
    """Valid requests may ask for up to max_model_len tokens; keep the engine's part short
    (the server is what is fuzzed), without touching what makes a request invalid."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 8:
                body[key] = 8
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None \
                and "messages" in body:
            body["max_tokens"] = 8


@pytest.mark.parametrize("mode", list(MAX_EXAMPLES), ids=lambda m: m.value)
def test_fuzz_openapi(tiny_server, client, mode):  # noqa: F811
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")
    failures = []

    @settings(max_examples=MAX_EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        _cap_generation(case)
        response = case.call(base_url=tiny_server.url, timeout=60)
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as e:  # noqa: BLE001 - collected, reported together below
            failures.append(f"{case.method} {case.path} {case.body!r:.300}: {e}"[:1500])

    fuzz()
    assert not failures, "\n\n".join(failures[:5]) + f"\n\n({len(failures)} failures)"
    check_normal_request(client)
    assert_pool_free(tiny_server)
