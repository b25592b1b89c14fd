"""Model names never address a file outside the models folder, on any route or command that takes one.

Outside the models folder sit canaries: a text file holding a secret line, and
``canary.gguf``, a link to SmolLM2, so a name that reached it would load a real
model and show in the engine's health. Inside the folder are planted links
that point out: ``planted.gguf`` to the text file, ``outdir`` to the outside
folder (only a name with a ``/`` could use it) and ``outdir.gguf`` to the same
folder. A link in the folder is the admin's (``models add --link``) and is
followed, by design, when it is a GGUF file; these are not, and none may reach
llama.cpp. Every hostile name gets a clean 4xx in OpenAI's error shape; after
each test the canaries are unchanged, nothing was loaded, and no response or
log line holds the secret.

The routes that take a model name or id: ``GET /v1/models/{id}``, the ``model``
field of chat completions, completions and embeddings, the admin key
routes (``{key_id}`` and a key's model allowlist), and model management
(``/v1/locopilot/models/{id}`` and its ``load``/``unload``, and the pull's ``model``
and ``name``; the pull's sources are loopback addresses where nothing listens).
The CLI's ``models add|rm|show`` are driven here too.
:func:`test_every_route_that_takes_a_name_is_covered` fails when a new route
takes one.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from tests.conftest import SMOL, Server
from tests.security.conftest import ADMIN, ADMIN_KEY, app_routes

SECRET = "CANARY-TRAVERSAL-5f0c2b7e9d41"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
GENERATION_BODIES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/embeddings": {"input": "hi"},
}
#: Routes with a parameter that names something: each is driven by a test below.
#: Routes whose path carries a server-chosen id (method, prefix, parameter, rest of the path).
ID_ROUTES = [
    ("GET", b"/v1/responses/", "response_id", ""),
    ("DELETE", b"/v1/responses/", "response_id", ""),
    ("POST", b"/v1/responses/", "response_id", "/cancel"),
    ("GET", b"/v1/responses/", "response_id", "/input_items"),
    ("GET", b"/v1/files/", "file_id", ""),
    ("DELETE", b"/v1/files/", "file_id", ""),
    ("GET", b"/v1/locopilot/training/jobs/", "job_id", ""),
    ("POST", b"/v1/locopilot/training/jobs/", "job_id", "/cancel"),
    ("GET", b"/v1/locopilot/training/jobs/", "job_id", "/logs"),
    ("GET", b"/v1/fine_tuning/jobs/", "fine_tuning_job_id", ""),
    ("POST", b"/v1/fine_tuning/jobs/", "fine_tuning_job_id", "/cancel"),
    ("GET", b"/v1/fine_tuning/jobs/", "fine_tuning_job_id", "/events"),
]
#: Job creation bodies: ``model`` names the base model, which the job service opens.
TRAINING_BODIES = {
    "/v1/locopilot/training/jobs": {"training_file": "file-missing"},
    "/v1/fine_tuning/jobs": {"training_file": "file-missing"},
}
#: Model management: (method, suffix after the id).
MODEL_ROUTES = [("GET", ""), ("DELETE", ""), ("POST", "/load"), ("POST", "/unload"), ("POST", "/verify")]
COVERED = {
    "GET /v1/models/{model_id}",
    *(f"{method} /v1/locopilot/models/{{model_id}}{suffix}" for method, suffix in MODEL_ROUTES),
    "GET /v1/admin/keys/{key_id}",
    "DELETE /v1/admin/keys/{key_id}",
    "DELETE /v1/admin/hosts/{host}",  # a host name the running server answers to, held in memory
    "GET /openapi/{path}",  # Litestar's OpenAPI viewers, rendered from code, not read from files
    "GET /console/{name}",  # the web console's files, looked up by name among those read at start
    *(f"{method} {prefix.decode()}{{{param}}}{suffix}" for method, prefix, param, suffix in ID_ROUTES),
}
#: The other fronts' bodies that name a ``model`` (each refuses in its own API's shape).
FRONT_BODIES = {
    "/v1/responses": {"input": "hi", "max_output_tokens": 1},
    "/v1/messages": {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "hi"}]},
    "/api/chat": {"messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 1}},
    "/api/generate": {"prompt": "hi", "stream": False, "options": {"num_predict": 1}},
    "/api/embed": {"input": "hi"},
    "/api/embeddings": {"prompt": "hi"},
    "/api/show": {},
    "/api/pull": {"stream": False},
    "/api/delete": {},
}
#: Routes whose body has a ``model`` field or a list of model names.
COVERED_BODIES = {
    *(f"{'DELETE' if path == '/api/delete' else 'POST'} {path}" for path in FRONT_BODIES),
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/admin/keys",
    "POST /v1/locopilot/models/pull",
    "POST /v1/locopilot/datasets/from-logs",  # a filter on the request log's model column
    *(f"POST {path}" for path in TRAINING_BODIES),
}


@dataclass(frozen=True)
class Plant:
    """Canaries outside ``models``, and links planted in it that point out."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    @property
    def text(self) -> Path:
        return self.outside / "canary.txt"

    @property
    def gguf(self) -> Path:
        return self.outside / "canary.gguf"

    def plant(self, smollm2: Path) -> Plant:
        self.outside.mkdir(parents=True)
        self.text.write_text(f"{SECRET}\nroot:x:0:0:root:/root:/bin/bash\n")
        self.gguf.symlink_to(smollm2)
        self.models.mkdir(parents=True, exist_ok=True)
        (self.models / "planted.gguf").symlink_to(self.text)
        (self.models / "outdir").symlink_to(self.outside)
        (self.models / "outdir.gguf").symlink_to(self.outside)
        return self

    def snapshot(self) -> dict[str, object]:
        """What a read, write or delete of a canary would change (access times aside)."""
        found: dict[str, object] = {}
        for path in (self.text, self.gguf, self.models / "planted.gguf", self.models / "outdir"):
            st = path.lstat()
            found[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        target = self.gguf.stat()
        found["gguf target"] = (target.st_ino, target.st_size, target.st_mtime_ns)
        found["text"] = hashlib.sha256(self.text.read_bytes()).hexdigest()
        return found

    def names(self) -> list[str]:
        """Hostile model names; absolute ones point at the canaries."""
        absolute = str(self.outside / "canary")
        return [
            "..",
            "../..",
            "../outside/canary",
            "../outside/canary.gguf",
            "../../etc/passwd",
            "/etc/passwd",
            absolute,
            str(self.gguf),
            "file://" + str(self.text),
            "~/.ssh/id_rsa",
            f"{SMOL}/../../outside/canary",
            "....//....//etc/passwd",
            "outdir/canary",
            "outdir/canary.txt",
            "..\\..\\outside\\canary",
            "outdir\\canary",
            f"{SMOL}\x00../../outside/canary",
            "\x00",
            "%2e%2e%2f%2e%2e%2foutside%2fcanary",
            "%252e%252e%252f%252e%252e%252foutside%252fcanary",
            "..%c0%af..%c0%afoutside",
            "\uff0e\uff0e\uff0f\uff0e\uff0e\uff0foutside",  # fullwidth dots and slash
            "\u2025/outside/canary",  # two-dot leader
            ".hidden",
            "x" * 201,
            "x" * 4000,
        ]


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Plant:
    return Plant(tmp_path_factory.mktemp("traversal")).plant(smollm2_path)


@pytest.fixture(scope="module")
def server(plant: Plant, smollm2_path: Path) -> Iterator[Server]:
    """A keyed server on the planted folder, with SmolLM2 as its one real model."""
    nowhere = "http://127.0.0.1:9"  # pulls of a valid-looking ref must not leave the machine
    env = {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "LOCOPILOT_HF_ENDPOINT": nowhere, "LOCOPILOT_OLLAMA_REGISTRY": nowhere}
    running = Server(plant.root, {SMOL: smollm2_path}, env).start(path="/health")
    yield running
    running.stop()


@pytest.fixture
def untouched(plant: Plant, server: Server) -> Iterator[None]:
    """After the test: the canaries unchanged, no model loaded, the secret not in the server's log."""
    before = plant.snapshot()
    yield
    assert plant.snapshot() == before
    health = httpx.get(f"{server.url}/v1/engine/health", headers=ADMIN, timeout=10).json()["engine"]
    assert health["loaded_models"] == [] and health["runners"] == []
    assert SECRET not in server.log_path.read_text(errors="replace")


def assert_clean_refusal(status: int, body: bytes, what: str) -> dict[str, Any]:
    """A 4xx whose body is OpenAI's error object, without the canary."""
    assert 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    assert SECRET.encode() not in body, what
    assert b"root:x:0:0" not in body, what
    error: dict[str, Any] = httpx.Response(status, content=body).json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, what
    assert error["type"] == "invalid_request_error", what
    return error


class _Recorded(io.BytesIO):
    def makefile(self, *_: object, **__: object) -> io.BytesIO:
        return self


def raw_request(server: Server, method: str, target: bytes) -> tuple[int, bytes]:
    """Send ``target`` byte for byte (no client normalizes its dot segments or encodings) and read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        headers = f"Host: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n"
        sock.sendall(f"{method} ".encode() + target + b" HTTP/1.1\r\n" + headers.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    response = http.client.HTTPResponse(_Recorded(received))  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read()


def path_forms(name: str) -> list[bytes]:
    """``name`` in a URL path: as is (where the request line can carry it), percent-encoded, and twice encoded."""
    forms = [quote(name, safe="").encode(), quote(quote(name, safe=""), safe="").encode()]
    raw = name.encode()
    if all(32 < byte < 127 for byte in raw):
        forms.append(raw)
    return forms


def test_every_route_that_takes_a_name_is_covered(server: Server) -> None:
    """A route with a path parameter, or a body naming a model, must be listed here and driven below."""
    with_params = {str(route) for route in app_routes() if "{" in route.template}
    assert with_params == COVERED
    schema = httpx.get(f"{server.url}/openapi/openapi.json", headers=ADMIN, timeout=10).json()
    schemas = schema["components"]["schemas"]
    naming = set()
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            body = schemas.get(ref.get("$ref", "").rsplit("/", 1)[-1], ref)
            if {"model", "models"} & set(body.get("properties", {})):
                naming.add(f"{method.upper()} {path}")
    assert naming == COVERED_BODIES


@pytest.mark.usefixtures("untouched")
@pytest.mark.parametrize("route", sorted(GENERATION_BODIES))
def test_model_fields(server: Server, plant: Plant, route: str) -> None:
    """Each name as is, and forced onto the embedded engine (``embedded:`` and ``embedded/``), which opens files."""
    refused = 0
    for name in plant.names():
        for model in (name, f"embedded:{name}", f"embedded/{name}"):
            body = {**GENERATION_BODIES[route], "model": model}
            response = httpx.post(f"{server.url}{route}", json=body, headers=ADMIN, timeout=60)
            error = assert_clean_refusal(response.status_code, response.content, f"{route} {model[:60]!r}")
            assert error["param"] == "model", error
            refused += 1
    assert refused == 3 * len(plant.names())


@pytest.mark.usefixtures("untouched")
def test_model_ids_in_the_path(server: Server, plant: Plant) -> None:
    for name in plant.names():
        for prefix in (b"", b"embedded:", b"embedded/"):
            for form in path_forms(name):
                status, body = raw_request(server, "GET", b"/v1/models/" + prefix + form)
                assert_clean_refusal(status, body, f"GET /v1/models/{(prefix + form)[:80]!r}")
    # The route does answer for a real model, so the refusals above are not a broken route's.
    status, body = raw_request(server, "GET", f"/v1/models/{SMOL}".encode())
    assert status == 200 and httpx.Response(200, content=body).json()["id"] == SMOL


@pytest.mark.usefixtures("untouched")
@pytest.mark.parametrize(("method", "suffix"), MODEL_ROUTES)
def test_model_management_paths(server: Server, plant: Plant, method: str, suffix: str) -> None:
    for name in plant.names():
        for form in path_forms(name):
            target = b"/v1/locopilot/models/" + form + suffix.encode()
            status, body = raw_request(server, method, target)
            assert_clean_refusal(status, body, f"{method} {target[:80]!r}")
    # The planted links are refused before a runner could open their targets.
    for name in ("planted", "outdir"):
        status, body = raw_request(server, "POST", f"/v1/locopilot/models/{name}/load".encode())
        assert assert_clean_refusal(status, body, f"load {name}")["code"] == "model_not_found"


@pytest.mark.usefixtures("untouched")
@pytest.mark.parametrize("route", sorted(FRONT_BODIES))
def test_model_fields_of_the_other_fronts(server: Server, plant: Plant, route: str) -> None:
    """The Responses, Anthropic and Ollama routes: each name, as is and forced onto the embedded
    engine, is refused (a pull of a valid-looking name fails from nowhere) and never opened."""
    method = "DELETE" if route == "/api/delete" else "POST"
    for name in plant.names():
        for model in (name, f"embedded:{name}"):
            body = {**FRONT_BODIES[route], "model": model}
            response = httpx.request(method, f"{server.url}{route}", json=body, headers=ADMIN, timeout=60)
            what = f"{route} {model[:60]!r}: {response.status_code} {response.content[:300]!r}"
            assert 400 <= response.status_code < 500 or (route == "/api/pull" and response.status_code == 502), what
            assert SECRET.encode() not in response.content, what
            assert b"root:x:0:0" not in response.content, what


@pytest.mark.usefixtures("untouched")
def test_pull_names_and_refs(server: Server, plant: Plant) -> None:
    url = "http://127.0.0.1:9/model.gguf"
    for name in plant.names():
        body = {"model": url, "sha256": "0" * 64, "name": name}
        response = httpx.post(f"{server.url}/v1/locopilot/models/pull", json=body, headers=ADMIN, timeout=30)
        error = assert_clean_refusal(response.status_code, response.content, f"pull name {name[:60]!r}")
        assert error["param"] == "name", error
        # As a ref: refused, or (a valid registry name such as outdir/canary) a failed pull from nowhere.
        response = httpx.post(f"{server.url}/v1/locopilot/models/pull", json={"model": name}, headers=ADMIN, timeout=30)
        if response.status_code != 502:
            assert_clean_refusal(response.status_code, response.content, f"pull ref {name[:60]!r}")
        assert SECRET.encode() not in response.content
    assert not list(plant.models.glob("*/*.partial"))


@pytest.mark.usefixtures("untouched")
@pytest.mark.parametrize(
    ("method", "prefix"),
    [
        ("GET", b"/v1/admin/keys/"),
        ("DELETE", b"/v1/admin/keys/"),
        ("DELETE", b"/v1/admin/hosts/"),
        ("GET", b"/openapi/"),
        ("GET", b"/console/"),
    ],
)
def test_other_path_parameters(server: Server, plant: Plant, method: str, prefix: bytes) -> None:
    for name in plant.names():
        for form in path_forms(name):
            status, body = raw_request(server, method, prefix + form)
            assert_clean_refusal(status, body, f"{method} {(prefix + form)[:80]!r}")


@pytest.mark.usefixtures("untouched")
@pytest.mark.parametrize(("method", "prefix", "param", "suffix"), ID_ROUTES)
def test_server_chosen_ids_in_the_path(
    server: Server, plant: Plant, method: str, prefix: bytes, param: str, suffix: str
) -> None:
    for name in plant.names():
        for form in path_forms(name):
            target = prefix + form + suffix.encode()
            status, body = raw_request(server, method, target)
            assert_clean_refusal(status, body, f"{method} {param} {target[:80]!r}")


@pytest.mark.usefixtures("untouched")
@pytest.mark.parametrize("route", sorted(TRAINING_BODIES))
def test_training_base_models(server: Server, plant: Plant, route: str) -> None:
    for name in plant.names():
        body = {**TRAINING_BODIES[route], "model": name}
        response = httpx.post(f"{server.url}{route}", json=body, headers=ADMIN, timeout=30)
        assert_clean_refusal(response.status_code, response.content, f"{route} model {name[:60]!r}")


@pytest.mark.usefixtures("untouched")
def test_traffic_dataset_model_filters(server: Server, plant: Plant) -> None:
    """The traffic dataset's ``model`` is compared with the request log's column, never opened."""
    for name in plant.names():
        body = {"model": name}
        response = httpx.post(f"{server.url}/v1/locopilot/datasets/from-logs", json=body, headers=ADMIN, timeout=60)
        assert_clean_refusal(response.status_code, response.content, f"from-logs {name[:60]!r}")


@pytest.mark.usefixtures("untouched")
def test_key_model_allowlists(server: Server, plant: Plant) -> None:
    """A hostile allowlist entry is refused, or stored as a name that serves nothing."""
    for index, name in enumerate(plant.names()):
        spec = {"name": f"traversal-{index}", "models": [name]}
        response = httpx.post(f"{server.url}/v1/admin/keys", json=spec, headers=ADMIN, timeout=10)
        if response.status_code != 201:
            assert_clean_refusal(response.status_code, response.content, f"allowlist {name[:60]!r}")
            continue
        key = {"Authorization": f"Bearer {response.json()['secret']}"}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": name}, headers=key, timeout=30)
        assert_clean_refusal(reply.status_code, reply.content, f"allowed {name[:60]!r}")


@pytest.mark.usefixtures("untouched")
def test_planted_links_out_of_the_folder_never_reach_llama_cpp(server: Server, plant: Plant) -> None:
    """The links are listed, with their error and not their target's bytes, and refused before any load."""
    listed = httpx.get(f"{server.url}/v1/models", headers=ADMIN, timeout=10)
    assert listed.status_code == 200 and SECRET not in listed.text
    cards = {card["id"]: card for card in listed.json()["data"]}
    assert cards["planted"]["error"] and cards["outdir"]["error"]
    assert cards[SMOL]["error"] is None
    for name in ("planted", "outdir"):
        card = httpx.get(f"{server.url}/v1/models/{name}", headers=ADMIN, timeout=10)
        assert card.status_code == 200 and SECRET not in card.text
        for route, body in GENERATION_BODIES.items():
            for model in (name, f"embedded:{name}"):
                reply = httpx.post(f"{server.url}{route}", json={**body, "model": model}, headers=ADMIN, timeout=60)
                error = assert_clean_refusal(reply.status_code, reply.content, f"{route} {model}")
                assert error["code"] == "model_not_found", error


def test_cli_model_commands(tmp_path: Path, smollm2_path: Path) -> None:
    """``models show|rm|add --name`` refuse every hostile name; ``rm`` of a planted link removes the link alone."""
    own = Plant(tmp_path).plant(smollm2_path)
    env = {k: None for k in os.environ if k.startswith("LOCOPILOT_")} | {
        "LOCOPILOT_DATA_DIR": str(tmp_path / "data"),
        "LOCOPILOT_MODELS_DIR": str(own.models),
    }
    runner = CliRunner()

    def run(*args: str) -> int:
        result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        assert SECRET not in result.output and "root:x:0:0" not in result.output, args
        return result.exit_code

    before = own.snapshot()
    for name in own.names():
        assert run("models", "show", name) == 1, name
        assert run("models", "rm", name) == 1, name
        assert run("models", "add", str(smollm2_path), "--name", name) == 1, name
    assert run("models", "add", str(own.text), "--name", "text") == 1
    assert run("models", "show", "planted") == 1
    assert own.snapshot() == before
    assert sorted(p.name for p in own.models.iterdir()) == ["outdir", "outdir.gguf", "planted.gguf"]

    assert run("models", "rm", "planted") == 0
    assert not (own.models / "planted.gguf").is_symlink()
    assert SECRET in own.text.read_text()
