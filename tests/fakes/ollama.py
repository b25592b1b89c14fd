"""An Ollama stand-in: Ollama's documented HTTP API on a real loopback socket.

Routes: ``GET /``, ``GET /api/version``, ``GET /api/tags``, ``POST /api/show``,
``POST /api/chat``, ``POST /api/generate`` (NDJSON streamed in HTTP chunks by
default, one JSON object with ``"stream": false``) and ``POST /api/embed``, with
Ollama's field names, status codes and error shape (``{"error": "..."}``; an
unknown model is 404, an unknown route a plain-text ``404 page not found``).

Every generation answers with the words of :data:`SENTENCE`, one chunk per
word (later words carry their leading space, as Ollama's tokens do), cut before
a word listed in ``options.stop`` (``done_reason`` "stop") or after
``options.num_predict`` chunks (``done_reason`` "length"). With ``format`` "json"
the answer is the JSON text ``{"reply": SENTENCE}``; with a JSON schema, an object that
follows it, as Ollama's constrained sampling makes one (:func:`schema_answer`). ``prompt_eval_count`` is
the number of whitespace-separated words in the prompt or messages.

Tools, as Ollama answers them: a chat request with ``tools`` whose last message is
not a tool result gets a call of the first tool (or of each tool named in
``call_tools``), arguments made from its schema by :func:`sample_arguments` as a
JSON object, in one chunk with empty content and ``tool_calls`` (an ``id`` of
the form ``call_xxxxxxxx`` and ``function.index``, as Ollama 0.12 and later send;
none when ``call_ids`` is False, as older versions did), then the final chunk with
``done_reason`` "stop". A request whose last message is a tool result is answered
in words: ``The tool <tool_name> said: <content>``.

Thinking, logprobs and keep_alive, as Ollama 0.12 and later answer them: a model listed in
``thinkers`` thinks unless ``think`` is false (Ollama's default for a thinking model), sending
the words of :data:`THOUGHT` as ``message.thinking`` (``thinking`` on ``/api/generate``) before
its answer; ``think`` true (or an effort) for any other model is a 400 ``"NAME" does not support
thinking``. ``logprobs`` true gives each chunk ``logprobs: [{token, logprob, bytes, top_logprobs}]``
(:func:`word_logprob`; the whole reply carries them all); ``top_logprobs`` outside 0-20 is a 400.
``keep_alive`` (seconds or a Go duration) sets how long a model stays in ``loaded`` (shown by
``GET /api/ps``); an empty prompt or message list loads the model (``done_reason`` "load"), or
with ``keep_alive`` 0 unloads it ("unload"); an empty ``/api/embed`` input loads it too.

``/api/show`` answers as Ollama does for a GGUF model: a generated modelfile naming a blob
path, ``parameters`` in Ollama's ``%-30s %#v`` layout, the template, details, ``model_info``
(arrays longer than 5 emptied unless ``verbose``), ``tensors``, ``license``, ``capabilities``
(``completion``, ``tools``, and ``thinking`` for a thinker) and ``modified_at``; an unknown
model is a 404 ``model 'NAME' not found``.

Faults, for tests: :meth:`OllamaStandIn.fail_next` answers the next API
request with a given status and body; ``endless`` streams words until the
client goes away (each such disconnect sets ``disconnected``); ``error_after``
sends an ``{"error": ...}`` line after that many chunks, as Ollama does when a
runner fails mid-generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import select
import socket
import string
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SENTENCE = "Hello from the Ollama stand-in"
THOUGHT = "The user greets me so I greet back"
LICENSE = "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT"
TEMPLATE = "{{ if .System }}<|start_header_id|>system<|end_header_id|>{{ .System }}<|eot_id|>{{ end }}{{ .Prompt }}"
CONTEXT_LENGTH = 131072
EMBEDDING_SIZE = 8

JSONObject = dict[str, Any]


def pieces(text: str) -> list[str]:
    """``text`` split into word chunks, each word after the first carrying its leading space."""
    first, *rest = text.split(" ")
    return [first, *(" " + word for word in rest)]


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def sample_value(schema: Any) -> Any:
    """A value of the JSON type ``schema`` declares (its first enum value when it has one)."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    return {
        "string": "Paris",
        "integer": 3,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "object": sample_arguments(schema),
    }.get(schema.get("type"))


def sample_arguments(schema: Any) -> JSONObject:
    """An object with a value for each property of the object schema ``schema``."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return {name: sample_value(sub) for name, sub in (properties or {}).items()}


def schema_answer(schema: JSONObject) -> JSONObject:
    """An object with every property of the object schema ``schema``: strings are SENTENCE."""
    properties = schema.get("properties") or {}
    return {
        name: SENTENCE
        if isinstance(sub, dict) and sub.get("type") == "string" and not sub.get("enum")
        else sample_value(sub)
        for name, sub in properties.items()
    }


def word_logprob(word: str, position: int, top: int) -> JSONObject:
    """One token's logprobs as Ollama writes them: the word itself most likely, then ``top - 1`` others."""
    logprob = -0.125 * (position + 1)

    def entry(token: str, value: float) -> JSONObject:
        return {"token": token, "logprob": value, "bytes": list(token.encode())}

    item = entry(word, logprob)
    if top > 0:
        item["top_logprobs"] = [entry(word, logprob), *(entry(f" alt{n}", logprob - n) for n in range(1, top))]
    return item


_DURATION = re.compile(r"(-?[0-9.]+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: Any) -> float:
    """A ``keep_alive`` as Ollama reads it (a number of seconds or a Go duration); negative: forever."""
    if value is None:
        return 300.0
    if isinstance(value, int | float) or value.strip() in ("0", "-1"):
        seconds = float(value)
    else:
        seconds = sum(float(number) * _UNITS[unit] for number, unit in _DURATION.findall(value))
    return math.inf if seconds < 0 else seconds


def call_id() -> str:
    """An id as Ollama makes one: ``call_`` and eight lowercase letters or digits."""
    return "call_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))


def word_count(body: JSONObject, chat: bool) -> int:
    if chat:
        return sum(len(str(message.get("content", "")).split()) for message in body.get("messages") or [])
    return len(str(body.get("prompt", "")).split())


def embedding(text: str) -> list[float]:
    """A unit vector that depends only on ``text`` (Ollama's /api/embed returns normalized vectors)."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [byte - 127.5 for byte in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(value * value for value in raw))
    return [value / norm for value in raw]


class Fault:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, stand_in: OllamaStandIn) -> None:
        self.stand_in = stand_in
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End idle keep-alive connections so their handler threads finish and can be joined."""
        with self.connections_lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client may reset a keep-alive connection at any time; that is not the stand-in's error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    # Routing and plain answers.

    def dispatch(self, method: str) -> None:
        stand_in = self.server.stand_in
        path = urlsplit(self.path).path
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        routes = {
            ("GET", "/"): self.root,
            ("GET", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/show"): self.show,
            ("POST", "/api/chat"): self.chat,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/embed"): self.embed,
        }
        route = routes.get((method, path))
        if route is None:
            self.send(404, b"404 page not found", "text/plain")
            return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            self.error(400, "invalid character in request body")
            return
        if not isinstance(body, dict):
            self.error(400, "json: cannot unmarshal into Go value of type api.Request")
            return
        stand_in.requests.append((path, body))
        fault = stand_in.take_fault()
        if fault is not None:
            self.send(fault.status, fault.body, "application/json", fault.headers)
            return
        route(body)

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: JSONObject) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})

    def known_model(self, body: JSONObject) -> str | None:
        """The model's full name (``:latest`` added when no tag is given); None after answering 400/404."""
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            self.error(400, "model is required")
            return None
        full = name if ":" in name else f"{name}:latest"
        if full not in self.server.stand_in.models:
            self.error(404, f'model "{name}" not found, try pulling it first')
            return None
        return full

    def root(self, body: JSONObject) -> None:
        self.send(200, b"Ollama is running", "text/plain; charset=utf-8")

    def version(self, body: JSONObject) -> None:
        self.send_json(200, {"version": "0.12.0"})

    def tags(self, body: JSONObject) -> None:
        self.send_json(200, {"models": [self.server.stand_in.tag(name) for name in self.server.stand_in.models]})

    def show(self, body: JSONObject) -> None:
        stand_in = self.server.stand_in
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            self.error(400, "model is required")
            return
        model = name if ":" in name else f"{name}:latest"
        if model not in stand_in.models:
            self.error(404, f"model '{name}' not found")
            return
        verbose = body.get("verbose") is True
        tokens = ["<|begin_of_text|>", "<|end_of_text|>", "a", "b", "c", "d"]
        blob = "/root/.ollama/models/blobs/sha256-" + hashlib.sha256(model.encode()).hexdigest()
        stops = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        parameters = "\n".join(f"{'stop':<30} {json.dumps(stop)}" for stop in stops)
        self.send_json(
            200,
            {
                "license": LICENSE,
                "modelfile": '# Modelfile generated by "ollama show"\n'
                "# To build a new Modelfile based on this, replace FROM with:\n"
                f"# FROM {model}\n\nFROM {blob}\nTEMPLATE {json.dumps(TEMPLATE)}\n"
                + "".join(f"PARAMETER stop {json.dumps(stop)}\n" for stop in stops),
                "parameters": parameters,
                "template": TEMPLATE,
                "details": stand_in.details(),
                "model_info": {
                    "general.architecture": "llama",
                    "general.file_type": 15,
                    "general.parameter_count": 1235814432,
                    "general.quantization_version": 2,
                    "llama.context_length": stand_in.context_length,
                    "llama.embedding_length": 2048,
                    "tokenizer.ggml.model": "gpt2",
                    "tokenizer.ggml.tokens": tokens if verbose else [],
                },
                "tensors": [{"name": "token_embd.weight", "type": "Q6_K", "shape": [2048, 128256]}],
                "capabilities": stand_in.capabilities(model),
                "modified_at": "2025-01-01T00:00:00.123456789Z",
            },
        )

    def ps(self, body: JSONObject) -> None:
        stand_in = self.server.stand_in
        with stand_in.loaded_lock:
            loaded = dict(stand_in.loaded)
        models = []
        for name, until in loaded.items():
            expires = "2318-01-01T00:00:00Z" if until == math.inf else datetime.fromtimestamp(until, UTC).isoformat()
            models.append(stand_in.tag(name) | {"expires_at": expires, "size_vram": 0, "context_length": 4096})
        self.send_json(200, {"models": models})

    def embed(self, body: JSONObject) -> None:
        model = self.known_model(body)
        if model is None:
            return
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        self.server.stand_in.keep(model, body.get("keep_alive"))
        if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
            self.error(400, "invalid input type")
            return
        self.send_json(
            200,
            {
                "model": model,
                "embeddings": [embedding(text) for text in inputs],
                "total_duration": 1_000_000,
                "load_duration": 100_000,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            },
        )

    # Generation.

    def chat(self, body: JSONObject) -> None:
        self.generation(body, chat=True)

    def generate(self, body: JSONObject) -> None:
        self.generation(body, chat=False)

    def generation(self, body: JSONObject, *, chat: bool) -> None:
        model = self.known_model(body)
        if model is None:
            return
        stand_in = self.server.stand_in
        options = body.get("options") or {}
        started = time.monotonic_ns()
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            self.error(400, "top_logprobs must be between 0 and 20")
            return
        think = body.get("think")
        if think not in (None, False, True, "high", "medium", "low", "max"):
            self.error(400, f'invalid think value: "{think}" (must be "high", "medium", "low", "max", true, or false)')
            return
        thinks = model in stand_in.thinkers and think is not False
        if model not in stand_in.thinkers and think not in (None, False):
            self.error(400, f"{json.dumps(body['model'])} does not support thinking")
            return

        def chunk(text: str, thinking: str = "") -> JSONObject:
            if chat:
                message = {"role": "assistant", "content": text} | ({"thinking": thinking} if thinking else {})
                return {"model": model, "created_at": now(), "message": message}
            return {"model": model, "created_at": now(), "response": text} | (
                {"thinking": thinking} if thinking else {}
            )

        def final(text: str, reason: str, count: int) -> JSONObject:
            elapsed = time.monotonic_ns() - started
            obj = chunk(text) | {
                "done": True,
                "done_reason": reason,
                "total_duration": elapsed,
                "load_duration": stand_in.load_duration,
                "prompt_eval_count": word_count(body, chat),
                "prompt_eval_duration": elapsed // 2,
                "eval_count": count,
                "eval_duration": elapsed // 2,
            }
            if not chat and not body.get("raw"):
                obj["context"] = list(range(word_count(body, chat) + count))
            return obj

        empty = not body.get("messages") if chat else not body.get("prompt")
        if empty:
            # Ollama loads the model, or with keep_alive 0 unloads it, and answers at once.
            kept = stand_in.keep(model, body.get("keep_alive"))
            self.send_json(200, chunk("") | {"done": True, "done_reason": "load" if kept else "unload"})
            return
        stand_in.keep(model, body.get("keep_alive"))

        if stand_in.endless:
            self.stream_lines(chunk(piece) | {"done": False} for piece in itertools.cycle(pieces(SENTENCE)))
            return

        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        if chat and body.get("tools") and last.get("role") != "tool":
            self.call_tools(body, final)
            return
        if chat and last.get("role") == "tool":
            text = f"The tool {last.get('tool_name', '')} said: {last.get('content', '')}"
        else:
            format = body.get("format")
            text = (
                SENTENCE
                if not format
                else json.dumps(schema_answer(format) if isinstance(format, dict) else {"reply": SENTENCE})
            )
        words, reason = self.limit(pieces(text), options)
        thoughts = pieces(THOUGHT) if thinks else []
        logprobs = [word_logprob(word, n, top) for n, word in enumerate(words)] if body.get("logprobs") else []

        if body.get("stream", True) is False:
            whole = final("".join(words), reason, len(words))
            if thoughts:
                (whole["message"] if chat else whole)["thinking"] = "".join(thoughts)
            if logprobs:
                whole["logprobs"] = logprobs
            self.send_json(200, whole)
            return

        lines: list[JSONObject] = [chunk("", thought) | {"done": False} for thought in thoughts]
        for n, word in enumerate(words):
            lines.append(chunk(word) | {"done": False} | ({"logprobs": [logprobs[n]]} if logprobs else {}))
        if stand_in.error_after is not None:
            count, message = stand_in.error_after
            self.stream_lines([*lines[:count], {"error": message}])
            return
        self.stream_lines([*lines, final("", reason, len(words))])

    def call_tools(self, body: JSONObject, final: Any) -> None:
        """Answer with calls, streamed or not, as Ollama does: one chunk holding every call."""
        stand_in = self.server.stand_in
        tools = {tool["function"]["name"]: tool["function"] for tool in body["tools"]}
        names = stand_in.call_tools or [next(iter(tools))]
        calls: list[JSONObject] = []
        for index, name in enumerate(names):
            function = {"index": index, "name": name, "arguments": sample_arguments(tools[name].get("parameters"))}
            calls.append({"id": call_id(), "function": function} if stand_in.call_ids else {"function": function})
        if body.get("stream", True) is False:
            done = final("", "stop", 15)
            done["message"]["tool_calls"] = calls
            self.send_json(200, done)
            return
        model = body["model"] if ":" in body["model"] else f"{body['model']}:latest"
        message = {"role": "assistant", "content": "", "tool_calls": calls}
        self.stream_lines(
            [{"model": model, "created_at": now(), "message": message, "done": False}, final("", "stop", 15)]
        )

    @staticmethod
    def limit(words: list[str], options: JSONObject) -> tuple[list[str], str]:
        """Apply ``options.stop`` and ``options.num_predict`` (negative means no limit, as in Ollama)."""
        stops = options.get("stop") or []
        for index, word in enumerate(words):
            if word.strip() in stops:
                return words[:index], "stop"
        num_predict = options.get("num_predict")
        if isinstance(num_predict, int) and 0 <= num_predict < len(words):
            return words[:num_predict], "length"
        return words, "stop"

    def stream_lines(self, lines: Iterable[JSONObject]) -> None:
        """Write NDJSON in HTTP chunks, one line per chunk, stopping early if the client goes away."""
        stand_in = self.server.stand_in
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for line in lines:
                data = json.dumps(line).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                if stand_in.endless and self.client_gone(stand_in.chunk_interval):
                    stand_in.disconnected.set()
                    self.close_connection = True
                    return
                if stand_in.stopping.is_set():
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            stand_in.disconnected.set()
            self.close_connection = True

    def client_gone(self, wait: float) -> bool:
        """True when the client closed its end, watching the socket for up to ``wait`` seconds."""
        readable, _, _ = select.select([self.connection], [], [], wait)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True


class OllamaStandIn:
    """An Ollama stand-in serving ``models`` on a free loopback port; also a context manager.

    ``requests`` holds every API request received, as ``(path, JSON body)``.
    ``thinkers`` are the models that think; ``loaded`` the models keep_alive keeps loaded.
    ``call_tools`` names the tools a tool request calls (the first declared when empty);
    ``call_ids`` False leaves the calls without ids, as Ollama before 0.12 did.
    """

    def __init__(
        self,
        models: Sequence[str] = ("llama3.2:1b", "qwen2.5:0.5b"),
        *,
        context_length: int = CONTEXT_LENGTH,
        thinkers: Iterable[str] = (),
    ) -> None:
        self.models = list(models)
        self.context_length = context_length
        self.requests: list[tuple[str, JSONObject]] = []
        self.endless = False
        self.chunk_interval = 0.01
        self.error_after: tuple[int, str] | None = None
        self.call_tools: list[str] = []
        self.call_ids = True
        self.thinkers = set(thinkers)
        self.loaded: dict[str, float] = {}
        """Model → when it unloads (time.time(); math.inf: never), as keep_alive set it."""
        self.loaded_lock = threading.Lock()
        self.load_duration = 0
        """Nanoseconds the last object of a generation says loading the model took."""
        self.disconnected = threading.Event()
        self.stopping = threading.Event()
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the Ollama stand-in is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OllamaStandIn:
        self.stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="ollama-stand-in"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> OllamaStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail_next(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Answer the next API request (after recording it) with ``status`` and ``body`` instead."""
        with self._faults_lock:
            self._faults.append(Fault(status, body, headers or {}))

    def take_fault(self) -> Fault | None:
        with self._faults_lock:
            return self._faults.pop(0) if self._faults else None

    def bodies(self, path: str) -> Iterator[JSONObject]:
        """The bodies of the requests received on ``path``, in order."""
        return (body for received, body in self.requests if received == path)

    def keep(self, model: str, keep_alive: Any) -> bool:
        """Apply a request's ``keep_alive`` to ``model``; whether it is loaded now."""
        seconds = duration_seconds(keep_alive)
        with self.loaded_lock:
            if seconds == 0:
                self.loaded.pop(model, None)
                return False
            self.loaded[model] = time.time() + seconds
            return True

    def capabilities(self, model: str) -> list[str]:
        return ["completion", "tools", "thinking"] if model in self.thinkers else ["completion", "tools"]

    def details(self) -> JSONObject:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "1.2B",
            "quantization_level": "Q4_K_M",
        }

    def tag(self, name: str) -> JSONObject:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 807_000_000,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": self.details(),
        }
