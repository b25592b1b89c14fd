"""schemathesis against the OpenAPI schema the real server publishes, with the admin key.

Every operation in the schema is driven, none excluded, with a bounded number
of examples each (:data:`EXAMPLES`, positive and negative data), so the run
stays short on two cores. Checks: no 5xx, and the status code, content type
and body of every answer match what the schema declares.

Behind the server are SmolLM2 (embedded) and the ``cloud`` fault upstream; pulls go
to the hub and registry stand-ins, which hold no model.
Generated model names almost never exist, so a positive example that names a
model gets one that does, in turn SmolLM2 and the upstream's, and its token
budget is cut to :data:`MAX_TOKENS`: the requests then reach the engine and
the upstream, and generation on two cores stays short.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from litestar.exceptions import LitestarDeprecationWarning
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from locopilot.app import create_app
from locopilot.settings import load_settings
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.fakes.hubs import ModelHubs
from tests.security.conftest import ADMIN, ADMIN_KEY

EXAMPLES = 25
MAX_TOKENS = 2
SERVED = itertools.cycle([SMOL, "cloud:fault-small"])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Cases sent, by operation, for the report.
SENT: dict[str, int] = {}


@pytest.fixture(scope="module")
def hubs() -> Iterator[ModelHubs]:
    with ModelHubs() as running:
        yield running


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, cloud: FaultUpstream, hubs: ModelHubs
) -> Iterator[Server]:
    # Pulls never leave the machine: their sources are stand-ins that know no model (a 404 for any ref).
    env = {
        "LOCOPILOT_ADMIN_KEY": ADMIN_KEY,
        "LOCOPILOT_REMOTE_URL": cloud.url,
        "LOCOPILOT_HF_ENDPOINT": hubs.hub_url,
        "LOCOPILOT_OLLAMA_REGISTRY": hubs.hub_url,
    }
    running = Server(tmp_path_factory.mktemp("schemathesis"), {SMOL: smollm2_path}, env).start(path="/health")
    # Until llama.cpp's probe ends, engine health is a 503 (as documented); a fuzzer would call it a server error.
    deadline = time.monotonic() + 120
    while httpx.get(f"{running.url}/v1/engine/health", headers=ADMIN, timeout=10).status_code != 200:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.2)
    yield running
    running.stop()
    print(f"\nschemathesis: {len(SENT)} operations, {sum(SENT.values())} cases: {SENT}")


def app_schema() -> dict[str, Any]:
    """The OpenAPI schema of the app, as the server publishes it (checked below)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LitestarDeprecationWarning)
        app = create_app(load_settings({"LOCOPILOT_DATA_DIR": "/nonexistent"}))
    document: dict[str, Any] = app.openapi_schema.to_schema()
    return document


# Loaded when the module is, as parametrize needs: schemathesis's loader from a fixture
# (schemathesis.pytest.from_fixture) fails on pytest 9 (it sets Function._nodeid, gone there).
# Fuzzing, positive and negative, EXAMPLES cases each; the coverage phase (every boundary of
# every field, hundreds of cases per operation) would take minutes on two cores.
CONFIG = f"""
[generation]
max-examples = {EXAMPLES}
[phases.coverage]
enabled = false
"""
schema = schemathesis.openapi.from_dict(app_schema(), config=schemathesis.Config.from_str(CONFIG))


def test_the_server_publishes_this_schema(server: Server) -> None:
    published = httpx.get(f"{server.url}/openapi/openapi.json", headers=ADMIN, timeout=30)
    assert published.status_code == 200
    assert published.json() == json.loads(json.dumps(app_schema()))


def served_model(case: Any) -> None:
    """A positive example that names a model names a served one, with a small token budget."""
    body = case.body
    if case._meta is None or case._meta.generation.mode != GenerationMode.POSITIVE or not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and {"messages", "prompt", "input"} & set(body):
        body["model"] = next(SERVED)
        # Without a budget a chat reply runs to the end of the context: minutes on two cores.
        if case.path.startswith("/api/"):  # Ollama's API: the budget is an option
            options = body["options"] if isinstance(body.get("options"), dict) else {}
            body["options"] = {**options, "num_predict": MAX_TOKENS}
            return
        body["max_tokens"] = min(body.get("max_tokens") or MAX_TOKENS, MAX_TOKENS)
        if body.get("max_completion_tokens") is not None:
            body["max_completion_tokens"] = min(body["max_completion_tokens"], MAX_TOKENS)
        if case.operation.path == "/v1/responses":
            body["max_output_tokens"] = min(body.get("max_output_tokens") or MAX_TOKENS, MAX_TOKENS)


def streams(path: str, body: dict[str, Any]) -> bool:
    """Whether the answer streams: OpenAI's when asked to, Ollama's generation unless asked not to."""
    if path in ("/api/chat", "/api/generate"):
        return body.get("stream", True) is not False
    return body.get("stream") is True


@schema.parametrize()
# No shrinking: a failure is reported as found (schemathesis prints a curl line to replay it).
@settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run
    database=None,
    phases=[Phase.generate],
)
def test_the_schema_holds(case: Any, server: Server) -> None:
    served_model(case)
    SENT[case.operation.label] = SENT.get(case.operation.label, 0) + 1
    checks = CHECKS
    if isinstance(case.body, dict) and streams(case.path, case.body):
        # A stream is text/event-stream (or NDJSON), and an OpenAPI response names one media type per
        # status: the schema shows the JSON answer. Streams are still checked for 5xx and status codes.
        checks = [not_a_server_error, status_code_conformance]
    case.call_and_validate(base_url=server.url, headers=ADMIN, checks=checks, timeout=60)


# What the fuzzer found, kept as plain cases


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        # SmolLM2 adds no BOS, so these have no tokens: the embedding failed with a 500 (and llama-cpp-python
        # corrupted its heap), the empty prompt never finished.
        ("/v1/embeddings", {"input": ["\u0013", "\u0013"]}, "input"),
        ("/v1/embeddings", {"input": ["a", "\u0013"]}, "input"),
        ("/v1/completions", {"prompt": "", "max_tokens": 2}, "prompt"),
    ],
)
def test_inputs_without_tokens_are_refused(server: Server, route: str, body: dict[str, Any], param: str) -> None:
    reply = httpx.post(f"{server.url}{route}", json={"model": SMOL, **body}, headers=ADMIN, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    both = {"model": SMOL, "input": ["a", "b"]}
    again = httpx.post(f"{server.url}/v1/embeddings", json=both, headers=ADMIN, timeout=60)
    assert again.status_code == 200, again.text
