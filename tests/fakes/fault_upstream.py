"""A scripted OpenAI-compatible upstream that fails on purpose, on a real loopback socket.

Raw sockets and one thread per connection, so every byte on the wire is the
script's: an HTTP/1.1 answer with ``Connection: close``, chunked SSE as
OpenAI sends it (``data: {...}`` events, a usage chunk when
``stream_options.include_usage`` asks for it, ``data: [DONE]``).

``mode`` can be changed at any time; it applies to the next request:

    ok            answers normally (SSE when ``stream`` is true, JSON otherwise)
    refuse        nothing listens on the port: connections are refused
    hang          reads the request, then never answers (until ``stop``)
    status_500    500 with an OpenAI error body
    status_429    429 with ``Retry-After: 7``
    status_401    401 with :data:`PRO_REQUIRED_BODY`
    status_403    403 with :data:`PRO_REQUIRED_BODY`
  generations only (``/v1/models`` and ``/v1/embeddings`` answer as in ok):
    context_length  400 with code ``context_length_exceeded``
    echo_400        400 whose message quotes the request's messages or prompt, as pydantic's errors do
    die_after_3     200, three content chunks, then the socket closes mid-body
    die_after_finish  200, the answer up to its finish_reason chunk, then the socket closes mid-body
    end_early       200, two content chunks, then a clean end without finish_reason or [DONE]
    malformed       200, ``data: {not json``
    malformed_late  200, one content chunk, then ``data: {not json``
    error_event     200, one content chunk, then ``data: {"error": {...}}`` and [DONE] (as vLLM does)
    error_field     200, llama-server's ``error: {...}`` field for an oversized prompt, then [DONE]
    no_usage        200, the answer with finish_reason "length" and no usage chunk
    stall_after_1   200, one content chunk, then waits until the client hangs up (``client_gone`` is set)

Tools, in ok mode, as OpenAI answers them: a chat request with ``tools`` (and a
``tool_choice`` other than "none") whose last message is not a tool result gets
``calls`` calls (1 by default) of the named tool, or else of the declared tools in
turn, with arguments made from each tool's schema (:func:`tests.fakes.ollama.sample_arguments`).
Streamed, each call's first delta carries its ``index``, ``id``, ``type`` and name with
empty arguments, then the arguments come in pieces of :data:`ARGUMENT_PIECE` characters,
then a chunk with ``finish_reason`` "tool_calls" (content is null throughout). A request
whose last message is a tool result is answered ``The tool said: <its content>``.

With ``n`` above 1, each choice streams the same words under its own ``index``;
with ``logprobs`` asked for, each word carries :func:`word_logprobs`.

``delay`` (seconds, 0 by default) holds every generation's answer back that
long before its first byte, whatever the mode: a slow but healthy upstream.

The model :data:`FaultUpstream.MISSING_MODEL` gets a 404 ``model_not_found``
in ok mode. Every request is recorded in ``requests``, whatever the mode.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from dataclasses import dataclass
from typing import Any

from tests.fakes.ollama import sample_arguments

ARGUMENT_PIECE = 7
PRO_REQUIRED_BODY = (
    b'{"error": {"message": "Pro plan required", "type": "invalid_request_error",'
    b' "code": "pro_subscription_required", "upgrade_url": "https://example.invalid/upgrade"}}'
)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-case names."""
    body: Any
    """The parsed JSON body, or None."""


class FaultUpstream:
    MODELS = ("fault-small", "fault-large")
    MISSING_MODEL = "no-such-model"
    WORDS = ("Hello", " from", " fault", " upstream")
    PROMPT_TOKENS = 12
    PRO_REQUIRED_BODY = PRO_REQUIRED_BODY

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.client_gone = threading.Event()
        self.delay = 0.0
        self.calls = 1
        self._mode = "ok"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._accepting = False
        self._connections: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        with self._lock:
            self._mode = mode
            listening = self._listener is not None
        if mode == "refuse" and listening:
            self._close_listener()
        elif mode != "refuse" and not listening and self.port and not self._stopping.is_set():
            self._listen()

    def start(self) -> FaultUpstream:
        self._listen()
        if self._mode == "refuse":
            self._close_listener()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._close_listener()
        with self._lock:
            connections = list(self._connections)
            handlers = list(self._handlers)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)
        for handler in handlers:
            handler.join(timeout=10)

    # Listening

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)  # so the accept loop sees a request to stop
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepting = True
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self._accept_thread.start()

    def _close_listener(self) -> None:
        """Stop accepting and close the port, so that new connections are refused."""
        thread, self._accept_thread = self._accept_thread, None
        self._accepting = False
        if thread is not None:
            thread.join()
        with self._lock:
            self._listener = None

    def _accept_loop(self, listener: socket.socket) -> None:
        with listener:
            while self._accepting:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                handler = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                with self._lock:
                    self._connections.add(conn)
                    self._handlers.append(handler)
                handler.start()

    # One connection, one request

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = self._read_request(conn)
            if request is not None:
                with self._lock:
                    self.requests.append(request)
                self._answer(conn, request, self._mode)
        except OSError:
            pass  # the client went away, or stop() shut the socket
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _read_request(self, conn: socket.socket) -> RecordedRequest | None:
        data = b""
        while b"\r\n\r\n" not in data:
            part = conn.recv(65536)
            if not part:
                return None
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            part = conn.recv(65536)
            if not part:
                return None
            rest += part
        try:
            body = json.loads(rest) if rest else None
        except ValueError:
            body = None
        return RecordedRequest(method, target.split("?", 1)[0], headers, body)

    def _answer(self, conn: socket.socket, request: RecordedRequest, mode: str) -> None:
        body = request.body if isinstance(request.body, dict) else {}
        generation = request.method == "POST" and request.path in ("/v1/chat/completions", "/v1/completions")
        if generation and self.delay:
            self._stopping.wait(self.delay)
        match mode:
            case "hang":
                self._stopping.wait()
            case "status_500":
                send_json(conn, 500, error("The server had an error while processing your request.", "server_error"))
            case "status_429":
                body_429 = error("Rate limit reached.", "rate_limit_error", "rate_limit_exceeded")
                send_json(conn, 429, body_429, extra_headers="Retry-After: 7\r\n")
            case "status_401" | "status_403":
                send_raw(conn, int(mode[-3:]), PRO_REQUIRED_BODY)
            case "echo_400" if generation:
                quoted = json.dumps(body.get("messages") or body.get("prompt"))
                send_json(conn, 400, error(f"Input should be a valid string, input: {quoted}", "invalid_request_error"))
            case "context_length" if generation:
                message = "This model's maximum context length is 2048 tokens."
                send_json(conn, 400, error(message, "invalid_request_error", "context_length_exceeded"))
            case _ if generation and body.get("model") == self.MISSING_MODEL:
                message = f"The model `{self.MISSING_MODEL}` does not exist."
                send_json(conn, 404, error(message, "invalid_request_error", "model_not_found"))
            case _ if generation and body.get("stream"):
                self._stream(conn, request.path == "/v1/chat/completions", body, mode)
            case _ if generation:
                send_json(conn, 200, self._whole_answer(request.path == "/v1/chat/completions", body))
            case _ if request.method == "GET" and request.path == "/v1/models":
                models = [{"id": m, "object": "model", "created": 0, "owned_by": "fault"} for m in self.MODELS]
                send_json(conn, 200, {"object": "list", "data": models})
            case _ if request.method == "POST" and request.path == "/v1/embeddings":
                send_json(conn, 200, embeddings(body))
            case _:
                send_json(conn, 404, error(f"Unknown path {request.path}", "invalid_request_error", "not_found"))

    def _stream(self, conn: socket.socket, chat: bool, body: dict[str, Any], mode: str) -> None:
        model = body.get("model", "")
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )

        def event(payload: str, field: str = "data") -> None:
            data = f"{field}: {payload}\n\n".encode()
            conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))

        def content(i: int) -> None:
            event(json.dumps(chunk(chat, model, self.WORDS[i], None, first=i == 0)))

        match mode:
            case "die_after_3":
                for i in range(3):
                    content(i)
                return  # _serve closes the socket: no terminating chunk
            case "die_after_finish":
                for i in range(len(self.WORDS)):
                    content(i)
                event(json.dumps(chunk(chat, model, "", "stop")))
                return
            case "end_early":
                content(0)
                content(1)
            case "malformed":
                event("{not json")
            case "malformed_late":
                content(0)
                event("{not json")
            case "error_event":
                content(0)
                event(json.dumps(error("The upstream lost its GPU mid-stream.", "server_error", "internal_error")))
                event("[DONE]")
            case "error_field":
                message = "the request exceeds the available context size, try increasing it"
                event(json.dumps({"code": 400, "message": message, "type": "exceed_context_size_error"}), "error")
                event("[DONE]")
            case "stall_after_1":
                content(0)
                try:
                    while conn.recv(4096):
                        pass
                except OSError:
                    pass  # a reset is a hang-up too
                self.client_gone.set()
                return
            case _ if (calls := self._calls(chat, body)) is not None:
                for call in calls:
                    arguments = call["function"]["arguments"]
                    opening = {**call, "function": {**call["function"], "arguments": ""}}
                    event(json.dumps(call_chunk(model, opening, first=call["index"] == 0)))
                    for start in range(0, len(arguments), ARGUMENT_PIECE):
                        piece = {
                            "index": call["index"],
                            "function": {"arguments": arguments[start : start + ARGUMENT_PIECE]},
                        }
                        event(json.dumps(call_chunk(model, piece)))
                event(json.dumps(chunk(chat, model, "", "tool_calls")))
                if (body.get("stream_options") or {}).get("include_usage"):
                    event(json.dumps({**chunk(chat, model, "", None), "choices": [], "usage": self._usage()}))
                event("[DONE]")
            case _:
                words = self._words(chat, body)
                choices = body.get("n") or 1
                logprobs = body.get("logprobs") if chat else isinstance(body.get("logprobs"), int)
                for i, word in enumerate(words):
                    for index in range(choices):
                        piece = chunk(chat, model, word, None, first=i == 0, index=index)
                        if logprobs:
                            piece["choices"][0]["logprobs"] = word_logprobs(chat, word, i)
                        event(json.dumps(piece))
                reason = "length" if mode == "no_usage" else "stop"
                for index in range(choices):
                    event(json.dumps(chunk(chat, model, "", reason, index=index)))
                include_usage = (body.get("stream_options") or {}).get("include_usage")
                if include_usage and mode != "no_usage":
                    usage_chunk = {**chunk(chat, model, "", None), "choices": [], "usage": self._usage()}
                    event(json.dumps(usage_chunk))
                event("[DONE]")
        conn.sendall(b"0\r\n\r\n")

    def _calls(self, chat: bool, body: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The calls OpenAI would answer ``body`` with, or None for a text answer."""
        tools = [tool["function"] for tool in body.get("tools") or [] if tool.get("type") == "function"]
        messages = body.get("messages") or [{}]
        if not chat or not tools or body.get("tool_choice") == "none" or messages[-1].get("role") == "tool":
            return None
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            tools = [tool for tool in tools if tool["name"] == choice["function"]["name"]]
        return [
            {
                "index": i,
                "id": f"call_fault{i}",
                "type": "function",
                "function": {
                    "name": tools[i % len(tools)]["name"],
                    "arguments": json.dumps(sample_arguments(tools[i % len(tools)].get("parameters"))),
                },
            }
            for i in range(self.calls)
        ]

    def _words(self, chat: bool, body: dict[str, Any]) -> list[str]:
        """The text answer, in pieces: the tool's result when the last message is one."""
        last = (body.get("messages") or [{}])[-1] if chat else {}
        if last.get("role") == "tool":
            said = f"The tool said: {last.get('content')}"
            first, *rest = said.split(" ")
            return [first, *(" " + word for word in rest)]
        return list(self.WORDS)

    def _usage(self) -> dict[str, int]:
        completion = len(self.WORDS)
        return {
            "prompt_tokens": self.PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": self.PROMPT_TOKENS + completion,
        }

    def _whole_answer(self, chat: bool, body: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self._words(chat, body))
        calls = self._calls(chat, body)
        if calls is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{key: value for key, value in call.items() if key != "index"} for call in calls],
            }
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            kind, prefix = "chat.completion", "chatcmpl"
        elif chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            kind, prefix = "text_completion", "cmpl"
        choice.setdefault("finish_reason", "stop")
        return {
            "id": f"{prefix}-fault",
            "object": kind,
            "created": 1700000000,
            "model": body.get("model", ""),
            "choices": [choice],
            "usage": self._usage(),
        }


def chunk(
    chat: bool, model: str, text: str, finish_reason: str | None, first: bool = False, index: int = 0
) -> dict[str, Any]:
    if chat:
        delta: dict[str, str] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind, prefix = "chat.completion.chunk", "chatcmpl"
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        kind, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-fault",
        "object": kind,
        "created": 1700000000,
        "model": model,
        "choices": [choice],
        "usage": None,
    }


def word_logprobs(chat: bool, word: str, position: int) -> dict[str, Any]:
    """The logprobs of one word as OpenAI writes them: -0.5 times its position, one alternative."""
    logprob = -0.5 * position
    if chat:
        item = {
            "token": word,
            "logprob": logprob,
            "bytes": list(word.encode()),
            "top_logprobs": [{"token": "x", "logprob": logprob - 1, "bytes": [120]}],
        }
        return {"content": [item], "refusal": None}
    return {"tokens": [word], "token_logprobs": [logprob], "top_logprobs": [{"x": logprob - 1}], "text_offset": [0]}


def call_chunk(model: str, call: dict[str, Any], first: bool = False) -> dict[str, Any]:
    """A chunk with one piece of a tool call; the first of the reply also says the role."""
    delta: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
    delta["tool_calls"] = [call]
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [choice],
        "usage": None,
    }


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """One small vector per input ([characters, index, 0.5]), listed in reverse: ``index`` says the order."""
    inputs = body.get("input", [])
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    data = [
        {"object": "embedding", "index": i, "embedding": [float(len(text)), float(i), 0.5]}
        for i, text in enumerate(inputs)
    ]
    tokens = sum(len(str(text).split()) for text in inputs)
    return {
        "object": "list",
        "data": data[::-1],
        "model": body.get("model", ""),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def send_json(conn: socket.socket, status: int, payload: dict[str, Any], extra_headers: str = "") -> None:
    send_raw(conn, status, json.dumps(payload).encode(), extra_headers)


def send_raw(conn: socket.socket, status: int, content: bytes, extra_headers: str = "") -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n{extra_headers}Connection: close\r\n\r\n"
    )
    conn.sendall(head.encode() + content)
