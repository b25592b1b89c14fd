"""Fine-tuning datasets: JSONL files of chat examples, validated whole, one line at a time.

Three forms are accepted, one per file (the first example decides)::

    alpaca    {"instruction": "...", "input": "...", "output": "..."}      (input optional)
    sharegpt  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
    openai    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Every form becomes the same :class:`Example`: a list of ``{"role", "content"}`` messages, an
optional system message first, then user and assistant turns alternating, starting with the user
and ending with the assistant. :func:`validate` reads the whole file, never more than one line
(:data:`MAX_LINE_BYTES`) in memory at a time, and raises :class:`DatasetInvalid` listing each
problem with its line number: invalid UTF-8, a line that is not a JSON object, JSON nested deeper
than :data:`MAX_JSON_DEPTH` (refused before anything recurses into it), a second format, missing
or mistyped fields, a wrong role or turn order, fewer than :data:`MIN_DATASET_EXAMPLES` examples,
and (given a :class:`~locopilot.training.tokenizer.ChatTokenizer`) an example longer than the
training context once the model's chat template is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import msgspec

Format = Literal["alpaca", "sharegpt", "openai"]

MIN_DATASET_EXAMPLES = 10
#: One example's line; a chat example of a few thousand tokens is tens of KB.
MAX_LINE_BYTES = 1 << 20
#: An example is three levels deep (object, list of messages, message); a little room beyond.
MAX_JSON_DEPTH = 16
#: Problems listed before the rest are only counted.
MAX_REPORTED = 20

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant"})
FORMAT_KEYS: dict[Format, str] = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instruction"}


class Example(msgspec.Struct, frozen=True):
    """One training conversation in OpenAI's message form, the line it came from (1-based), its file's form."""

    line: int
    messages: list[dict[str, str]]
    format: Format


class DatasetIssue(msgspec.Struct, frozen=True):
    """One problem; ``line`` is None for the file as a whole (too few examples, say)."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


class DatasetInvalid(ValueError):
    """The dataset cannot be trained on; ``issues`` says why, ``more`` counts the ones not listed."""

    def __init__(self, issues: list[DatasetIssue], more: int = 0) -> None:
        self.issues = issues
        self.more = more
        lines = [str(issue) for issue in issues]
        if more:
            lines.append(f"... and {more} more")
        super().__init__("\n".join(lines))


class DatasetSummary(msgspec.Struct, frozen=True):
    """What :func:`validate` found. Token counts are None when no tokenizer was given."""

    format: Format
    examples: int
    tokens: int | None
    longest_tokens: int | None
    longest_line: int | None
    context: int | None


class TokenCounter(Protocol):
    def count(self, messages: list[dict[str, str]]) -> int:
        """Tokens of ``messages`` rendered with the model's chat template."""
        ...


class _Refused(Exception):
    """A problem with one line; becomes a DatasetIssue with that line's number."""


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(number, bytes) per line; bytes is None for a line over MAX_LINE_BYTES, whose rest is skipped."""
    number = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        else:
            yield number, raw


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        value = msgspec.json.decode(text)
    except RecursionError:
        raise _Refused(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except msgspec.DecodeError as exc:
        raise _Refused(f"not valid JSON ({exc})") from None
    _check_depth(value)
    if not isinstance(value, dict):
        raise _Refused(f"expected a JSON object, got {type(value).__name__}")
    return value


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Refused(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def detect_format(record: dict[str, Any]) -> Format:
    found = [name for name, key in FORMAT_KEYS.items() if key in record]
    if len(found) > 1:
        raise _Refused(f"ambiguous example: has {', '.join(repr(FORMAT_KEYS[f]) for f in found)}")
    if not found:
        raise _Refused(
            "unknown format: expected 'messages' (openai), 'conversations' (sharegpt) or 'instruction' (alpaca)"
        )
    return found[0]


def _text(record: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise _Refused(f"{where}'{key}' is {kind}")
    if required and not value.strip():
        raise _Refused(f"{where}'{key}' is empty")
    return value


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _text(record, "instruction", "")
    extra = _text(record, "input", "", required=False)
    output = _text(record, "output", "")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise _Refused("'conversations' must be a list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]: "
        if not isinstance(turn, dict):
            raise _Refused(f"{where}expected an object with 'from' and 'value'")
        speaker = _text(turn, "from", where)
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise _Refused(f"{where}unknown 'from' {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": _text(turn, "value", where)})
    return messages


def _openai(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["messages"]
    if not isinstance(turns, list):
        raise _Refused("'messages' must be a list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]: "
        if not isinstance(turn, dict):
            raise _Refused(f"{where}expected an object with 'role' and 'content'")
        role = _text(turn, "role", where)
        if role not in OPENAI_ROLES:
            raise _Refused(f"{where}role {role!r} is not one of {', '.join(sorted(OPENAI_ROLES))}")
        content = turn.get("content")
        if not isinstance(content, str):
            # Tool calls and content parts (images) are not trained on yet.
            raise _Refused(f"{where}'content' must be a string")
        if not content.strip():
            raise _Refused(f"{where}'content' is empty")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}


def _check_turns(messages: list[dict[str, str]]) -> None:
    """An optional system message, then user/assistant alternating, from user to assistant."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise _Refused("no user or assistant messages")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + len(messages) - len(turns)
            raise _Refused(
                f"message {position} has role {message['role']!r} where {expected!r} belongs "
                "(an optional system message first, then user and assistant alternating)"
            )
    if turns[-1]["role"] != "assistant":
        raise _Refused("the last message must be the assistant's (the answer to train on)")


def parse_example(raw: bytes, line: int, expected: Format | None) -> Example:
    """Decode and check one line; raises _Refused. ``expected`` is the file's format so far."""
    record = _decode(raw)
    kind = detect_format(record)
    if expected is not None and kind != expected:
        raise _Refused(f"{kind} example in a file of {expected} examples")
    messages = CONVERTERS[kind](record)
    _check_turns(messages)
    return Example(line, messages, kind)


def iter_examples(f: BinaryIO) -> Iterator[Example | DatasetIssue]:
    """Each non-blank line as an Example, or as a DatasetIssue saying what is wrong with it."""
    expected: Format | None = None
    for number, raw in _lines(f):
        if raw is None:
            yield DatasetIssue(number, f"line is longer than {MAX_LINE_BYTES} bytes")
            continue
        if not raw.strip():
            continue
        try:
            example = parse_example(raw, number, expected)
        except _Refused as exc:
            yield DatasetIssue(number, str(exc))
            continue
        expected = example.format
        yield example


def validate(path: Path, tokens: TokenCounter | None = None, context: int | None = None) -> DatasetSummary:
    """Check the whole file at ``path`` (see the module docstring) and summarize it.

    With ``tokens`` and ``context``, each example is rendered and counted, and one
    longer than ``context`` tokens is a problem. Raises DatasetInvalid listing the
    problems (at most MAX_REPORTED, the rest counted), OSError if the file cannot be read.
    """
    issues: list[DatasetIssue] = []
    more = 0
    kind: Format | None = None
    count = total = longest = 0
    longest_line: int | None = None

    def refuse(issue: DatasetIssue) -> None:
        nonlocal more
        if len(issues) < MAX_REPORTED:
            issues.append(issue)
        else:
            more += 1

    with path.open("rb") as f:
        for item in iter_examples(f):
            if isinstance(item, DatasetIssue):
                refuse(item)
                continue
            kind = item.format
            count += 1
            if tokens is None:
                continue
            n = tokens.count(item.messages)
            total += n
            if n > longest:
                longest, longest_line = n, item.line
            if context is not None and n > context:
                refuse(
                    DatasetIssue(
                        item.line, f"example is {n} tokens with the chat template, over the context of {context}"
                    )
                )
    if count < MIN_DATASET_EXAMPLES:
        plural = "" if count == 1 else "s"
        refuse(DatasetIssue(None, f"{count} valid example{plural}; at least {MIN_DATASET_EXAMPLES} are needed"))
    if issues:
        raise DatasetInvalid(issues, more)
    assert kind is not None  # count >= MIN_DATASET_EXAMPLES > 0
    counted = tokens is not None
    return DatasetSummary(
        format=kind,
        examples=count,
        tokens=total if counted else None,
        longest_tokens=longest if counted else None,
        longest_line=longest_line,
        context=context,
    )
