"""A fine-tuning dataset from the request log: what a model was asked and what it answered.

With ``LOCOPILOT_LOG_PROMPTS`` on, each inference row of the request log holds the request's
messages and the reply's text. An admin picks rows (by model, provider, key, status and time)
and gets an OpenAI-format dataset, one example per row: the request's messages, then the
reply as the assistant's message. It is validated like an upload and stored as a file that
fine-tuning jobs take, for example to distil a remote model's answers into a local one. Each
line names the log row it came from in its ``metadata`` (``log_id``, ``request_id``), which the
trainers ignore.

Rows that cannot be a chat example are skipped and counted by reason: prompts that are not
messages (``/v1/completions``, embeddings), replies that are empty or were tool calls, messages
with images or tool calls, and turns out of order.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from locopilot.engine.protocol import Message
from locopilot.store.logs import InferenceLog

MAX_ROWS = 100_000

Skip = Literal["not_messages", "no_reply", "tools_or_images", "turn_order"]


class TrafficFilter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which request-log rows become examples; every filter given narrows the choice."""

    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    """The model the request asked for, as logged."""
    provider: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    """The provider that answered (``embedded``, an upstream's name)."""
    key_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    status: Literal["ok", "error", "cancelled"] = "ok"
    since: Annotated[float, Meta(ge=0)] | None = None
    """Unix seconds, inclusive."""
    until: Annotated[float, Meta(ge=0)] | None = None
    """Unix seconds, exclusive."""
    limit: Annotated[int, Meta(ge=1, le=MAX_ROWS)] = 10_000
    """At most this many rows, oldest first."""
    filename: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f/\\]+$")] | None = None


class TrafficDataset(msgspec.Struct, kw_only=True):
    """What :func:`examples` made of the rows: the JSONL lines and what was left out."""

    lines: list[bytes]
    log_ids: list[int]
    skipped: dict[str, int]


_messages = msgspec.json.Decoder(list[Message])


def _example(row: InferenceLog) -> list[dict[str, str]] | Skip:
    try:
        messages = _messages.decode(row.prompt or "")
    except msgspec.DecodeError:
        return "not_messages"
    if not row.completion or not row.completion.strip():
        return "no_reply"
    if any(m.images or m.tool_calls or m.role == "tool" for m in messages):
        return "tools_or_images"
    turns = [{"role": m.role, "content": m.content} for m in messages]
    turns.append({"role": "assistant", "content": row.completion})
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if any(
        t["role"] != ("user" if i % 2 == 0 else "assistant") or not t["content"].strip() for i, t in enumerate(body)
    ):
        return "turn_order"
    return turns


def examples(rows: list[InferenceLog]) -> TrafficDataset:
    """One OpenAI-format line per usable row, naming the row in its ``metadata``."""
    lines, log_ids, skipped = [], [], Counter[str]()
    for row in rows:
        made = _example(row)
        if isinstance(made, str):
            skipped[made] += 1
            continue
        assert row.id is not None  # rows read from the table have their id
        metadata = {"log_id": row.id, "request_id": row.request_id, "model": row.model, "provider": row.provider}
        lines.append(msgspec.json.encode({"messages": made, "metadata": metadata}))
        log_ids.append(row.id)
    return TrafficDataset(lines=lines, log_ids=log_ids, skipped=dict(skipped))
