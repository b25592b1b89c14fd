"""A fast OpenAI-compatible upstream for gateway benchmarks: raw asyncio, one process.

Answers, over HTTP/1.1 keep-alive on 127.0.0.1:

  POST /v1/chat/completions   JSON, or with ``"stream": true`` SSE: one role chunk,
                              ``--chunks`` content chunks, a finish chunk, a usage
                              chunk when ``include_usage`` is asked for, ``[DONE]``
  POST /v1/completions        the same shapes for text completions
  GET  /v1/models             one model, ``fast-model``

The request body is not decoded: ``"stream": true`` and ``include_usage`` are
found by a byte pattern, so the upstream costs as little as an HTTP server in
Python can. Every answer is built once at start. Streams go out as HTTP chunked
transfer, one HTTP chunk per SSE event, in one write.

Usage: python bench/fast_upstream.py [--port 8000] [--chunks 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal

MODEL = "fast-model"
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = re.compile(rb'"include_usage"\s*:\s*true')


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _chunked(events: list[dict[str, object] | str]) -> bytes:
    parts = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"]
    parts.append(b"transfer-encoding: chunked\r\n\r\n")
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        payload = f"data: {data}\n\n".encode()
        parts.append(b"%x\r\n%s\r\n" % (len(payload), payload))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


class Answers:
    """Every response this upstream can give, encoded once."""

    def __init__(self, chunks: int) -> None:
        words = [f"word{i} " for i in range(chunks)]
        text = "".join(words)
        usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        base = {"id": "chatcmpl-bench", "created": 1700000000, "model": MODEL, "system_fingerprint": "fp_bench"}
        self.chat = self._json(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
        chunk = {**base, "object": "chat.completion.chunk"}
        events: list[dict[str, object] | str] = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        ]
        events += [
            {**chunk, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]} for word in words
        ]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.chat_stream = _chunked([*events, "[DONE]"])
        self.chat_stream_usage = _chunked([*events, {**chunk, "choices": [], "usage": usage}, "[DONE]"])

        base = {"id": "cmpl-bench", "created": 1700000000, "model": MODEL}
        self.text = self._json(
            {
                **base,
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        )
        chunk = {**base, "object": "text_completion"}
        events = [{**chunk, "choices": [{"index": 0, "text": word, "finish_reason": None}]} for word in words]
        events.append({**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
        self.text_stream = _chunked([*events, "[DONE]"])
        self.text_stream_usage = _chunked([*events, {**chunk, "choices": [], "usage": usage}, "[DONE]"])

        self.models = self._json(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}]}
        )
        self.not_found = _response(
            "404 Not Found", "application/json", b'{"error":{"message":"not found","type":"not_found_error"}}'
        )

    @staticmethod
    def _json(body: dict[str, object]) -> bytes:
        return _response("200 OK", "application/json", json.dumps(body, separators=(",", ":")).encode())

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            chat = path == b"/v1/chat/completions"
            if _STREAM.search(body):
                if _USAGE.search(body):
                    return self.chat_stream_usage if chat else self.text_stream_usage
                return self.chat_stream if chat else self.text_stream
            return self.chat if chat else self.text
        if method == b"GET" and path == b"/v1/models":
            return self.models
        return self.not_found


class Connection(asyncio.Protocol):
    """HTTP/1.1 keep-alive with pipelining; bodies by Content-Length only (no chunked requests)."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            length = 0
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = lines[0].split(b" ", 2)
            out.append(self.answers.answer(method, path, body))
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int, chunks: int) -> None:
    answers = Answers(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answers), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"fast upstream on http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per streamed answer")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.chunks))


if __name__ == "__main__":
    main()
