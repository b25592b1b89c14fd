"""A stand-in for vLLM's OpenAI-compatible server (``vllm serve``), on a real loopback socket.

It answers what locopilot relies on the way vLLM's ``vllm/entrypoints/openai`` answers it
(protocol types in ``engine/protocol.py``, chat streaming in ``chat_completion/serving.py``);
the JSON is pydantic's compact ``model_dump_json`` where vLLM uses it, ``json.dumps`` where vLLM does:

- ``GET /v1/models``: a ``ModelList`` whose card has ``owned_by: "vllm"``, ``root``, ``parent``,
  ``max_model_len`` and one ``model_permission``. ``GET /health``: 200, empty.
- ``POST /v1/chat/completions``, streamed: ``text/event-stream; charset=utf-8``, chunked; a first
  chunk per choice with ``{"role": "assistant", "content": ""}``, content chunks, a last chunk with
  ``finish_reason`` and ``stop_reason``, then (``stream_options.include_usage``) a chunk with
  ``choices: []`` and ``usage`` (``exclude_none``: no ``prompt_tokens_details``), then ``[DONE]``.
  Not streamed: a ``chat.completion`` with vLLM's extra fields (``reasoning_content``,
  ``stop_reason``, ``prompt_logprobs``, ``kv_transfer_params``).
- Tools: with ``tools`` and ``tool_choice`` "auto" (vLLM run with ``--enable-auto-tool-choice``,
  the hermes parser), one call of the first tool: a first delta with ``id`` (``chatcmpl-tool-…``),
  ``type``, ``index`` and ``function.name``, argument pieces with ``index`` only, then
  ``finish_reason: "tool_calls"``. A named ``tool_choice``: the first delta carries the id, name and
  first piece; ``finish_reason`` is "stop" (vLLM says "tool_calls" only for parsed auto calls).
- Errors: ``ErrorResponse`` nested as ``{"error": {message, type, param, code}}`` (current
  releases), or with ``error_style="flat"`` the ``{"object": "error", message, type, param, code}``
  of releases before 0.10 (``code`` is the HTTP status, an int, in both). A prompt that does not
  fit ``max_model_len``: 400 ``BadRequestError`` with vLLM's words for each era; ``max_tokens`` too
  large for what is left: its other 400. An unknown model: 404 ``NotFoundError``.
- A message whose text is ``FAIL MID-STREAM``: two content chunks, then vLLM's streaming error
  (``data: {error body}`` by ``json.dumps``) and ``[DONE]``, as when the engine fails mid-way.

Tokens are counted as words (plus 4 per message), which is not vLLM's tokenizer but is what the
tests compare against: the counts the stand-in reports.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

ErrorStyle = Literal["nested", "flat"]
FAIL = "FAIL MID-STREAM"


def compact(value: object) -> bytes:
    """pydantic's ``model_dump_json``: no spaces, UTF-8 as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class VLLMStandIn:
    """``vllm serve MODEL --max-model-len N`` on 127.0.0.1; ``url`` ends in ``/v1``."""

    def __init__(
        self,
        model: str = "Qwen/Qwen2.5-0.5B-Instruct",
        *,
        max_model_len: int = 256,
        error_style: ErrorStyle = "nested",
        reply: str = "The capital of France is Paris.",
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.error_style = error_style
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.created = int(time.time())
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "uvicorn"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health":
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif self.path == "/v1/models":
                    self.json(200, stand_in.model_list())
                else:
                    self.json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                stand_in.requests.append(body)
                if self.path != "/v1/chat/completions":
                    self.json(404, {"detail": "Not Found"})
                    return
                stand_in.chat(self, body)

            def json(self, status: int, value: object, raw: bytes | None = None) -> None:
                content = raw if raw is not None else compact(value)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def start_stream(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

            def event(self, data: bytes) -> None:
                payload = b"data: " + data + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                self.wfile.flush()

            def end_stream(self) -> None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> VLLMStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- answers ---------------------------------------------------------------------------

    def model_list(self) -> dict[str, Any]:
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": self.created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [permission],
        }
        return {"object": "list", "data": [card]}

    def error(self, message: str, kind: str, status: int) -> dict[str, Any]:
        fields = {"message": message, "type": kind, "param": None, "code": status}
        return {"error": fields} if self.error_style == "nested" else {"object": "error", **fields}

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        words = 0
        for message in body.get("messages") or []:
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content or "")
            words += len(text.split()) + 4
        if body.get("tools"):
            words += len(json.dumps(body["tools"])) // 4
        return words

    def too_long(self, prompt: int, asked: int | None) -> str | None:
        """vLLM's words for a request that does not fit ``max_model_len``, or None."""
        window = self.max_model_len
        if self.error_style == "flat":  # before 0.10
            if prompt >= window:
                return (
                    f"This model's maximum context length is {window} tokens. However, you requested {prompt} "
                    "tokens in the messages, Please reduce the length of the messages."
                )
            total = prompt + (asked or 0)
            if asked is not None and total > window:
                return (
                    f"This model's maximum context length is {window} tokens. However, you requested {total} "
                    f"tokens ({prompt} in the messages, {asked or 0} in the completion). Please reduce the length "
                    "of the messages or completion."
                )
            return None
        if prompt >= window:
            return (
                f"This model's maximum context length is {window} tokens. However, your request has {prompt} "
                "input tokens. Please reduce the length of the input messages."
            )
        if asked is not None and prompt + asked > window:
            return (
                f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum context "
                f"length is {window} tokens and your request has {prompt} input tokens ({asked} > {window} - {prompt})."
            )
        return None

    def chat(self, handler: Any, body: dict[str, Any]) -> None:
        if body.get("model") != self.model:
            message = f"The model `{body.get('model')}` does not exist."
            handler.json(404, self.error(message, "NotFoundError", 404))
            return
        prompt = self.prompt_tokens(body)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if (refusal := self.too_long(prompt, asked)) is not None:
            handler.json(400, self.error(refusal, "BadRequestError", 400))
            return
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = body.get("tools") or []
        choice = body.get("tool_choice", "auto" if tools else "none")
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        call = None
        if tools and choice != "none" and last.get("role") != "tool":
            call = named or tools[0]["function"]["name"]
        words = self.reply.split(" ")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        arguments = ['{"city', '": "', "Par", 'is"}']
        completion = len(arguments) if call else len(pieces)
        if asked is not None and not call:
            pieces = pieces[:asked]
            completion = len(pieces)
        finish = "length" if asked is not None and not call and asked < len(words) else "stop"
        if call and not named:
            finish = "tool_calls"
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        call_id = f"chatcmpl-tool-{uuid.uuid4().hex}"
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "reasoning_content": None,
                "content": None,
                "tool_calls": [],
            }
            if call:
                message["tool_calls"] = [
                    {"id": call_id, "type": "function", "function": {"name": call, "arguments": "".join(arguments)}}
                ]
            else:
                message["content"] = "".join(pieces)
            answer = {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}
                ],
                "usage": {**usage, "prompt_tokens_details": None},
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            }
            handler.json(200, answer)
            return

        head = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model}

        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            if reason is not None:
                choice["stop_reason"] = None
            return compact({**head, "choices": [choice]})

        handler.start_stream()
        handler.event(chunk({"role": "assistant", "content": ""}))
        if call:
            for i, piece in enumerate(arguments):
                if i == 0:
                    function = {"name": call, "arguments": piece} if named else {"name": call}
                    delta = {"id": call_id, "type": "function", "index": 0, "function": function}
                    handler.event(chunk({"tool_calls": [delta]}))
                    if named:
                        continue
                handler.event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        else:
            for i, piece in enumerate(pieces):
                if i == 2 and FAIL in json.dumps(messages):
                    failure = self.error("Engine loop has died", "InternalServerError", 500)
                    handler.event(json.dumps(failure).encode())
                    handler.event(b"[DONE]")
                    handler.end_stream()
                    return
                handler.event(chunk({"content": piece}))
        handler.event(chunk({"content": ""}, finish))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            handler.event(compact({**head, "choices": [], "usage": usage}))
        handler.event(b"[DONE]")
        handler.end_stream()
