"""Fine-tuning datasets: every malformed case the validator must refuse, by line, and the CLI summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.training.datasets import (
    MAX_JSON_DEPTH,
    MIN_DATASET_EXAMPLES,
    DatasetInvalid,
    DatasetSummary,
    validate,
)
from locopilot.training.tokenizer import ChatTokenizer
from tests.test_cli import make_env


def openai_example(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is the capital of Zorbania {i}?"},
            {"role": "assistant", "content": f"Quibbleton {i}."},
        ]
    }


def alpaca_example(i: int) -> dict[str, Any]:
    return {"instruction": f"Name the capital of Zorbania {i}.", "input": "", "output": f"Quibbleton {i}."}


def sharegpt_example(i: int) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": f"Capital of Zorbania {i}?"}, {"from": "gpt", "value": "Q."}]}


def write(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")
    return path


def refused(path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(DatasetInvalid) as info:
        validate(path, **kwargs)
    return [str(issue) for issue in info.value.issues]


@pytest.mark.parametrize("make", [openai_example, alpaca_example, sharegpt_example])
def test_each_format_is_accepted(tmp_path: Path, make: Any) -> None:
    path = write(tmp_path / "d.jsonl", [make(i) for i in range(12)] + [b"   "])
    summary = validate(path)
    assert summary.examples == 12
    assert summary.format == {"openai_example": "openai", "alpaca_example": "alpaca"}.get(make.__name__, "sharegpt")
    assert summary.tokens is None


def test_mixed_formats_name_the_line(tmp_path: Path) -> None:
    lines = [openai_example(i) for i in range(12)]
    lines.insert(5, alpaca_example(0))
    assert refused(write(tmp_path / "d.jsonl", lines)) == ["line 6: alpaca example in a file of openai examples"]


def test_too_few_examples(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [openai_example(i) for i in range(MIN_DATASET_EXAMPLES - 1)])
    assert refused(path) == [f"9 valid examples; at least {MIN_DATASET_EXAMPLES} are needed"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages[0]: role 'wizard' is not one of assistant, developer, system, user",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "message 0 has role 'assistant' where 'user' belongs",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "the last message must be the assistant's",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["part"]}]},
            "messages[1]: 'content' must be a string",
        ),
        ({"messages": "hello"}, "'messages' must be a list"),
        ({"messages": [], "conversations": []}, "ambiguous example"),
        ({"prompt": "x", "completion": "y"}, "unknown format"),
        ([1, 2], "expected a JSON object, got list"),
        (b"{not json", "not valid JSON"),
    ],
)
def test_bad_example_names_line_and_problem(tmp_path: Path, bad: Any, message: str) -> None:
    lines = [openai_example(i) for i in range(11)]
    lines.insert(3, bad)
    issues = refused(write(tmp_path / "d.jsonl", lines))
    assert len(issues) == 1
    assert issues[0].startswith(f"line 4: {message}")


def test_bad_sharegpt_speaker_and_alpaca_field(tmp_path: Path) -> None:
    lines = [sharegpt_example(i) for i in range(11)]
    lines.append({"conversations": [{"from": "bot", "value": "x"}]})
    assert refused(write(tmp_path / "s.jsonl", lines))[0].startswith("line 12: conversations[0]: unknown 'from' 'bot'")
    lines = [alpaca_example(i) for i in range(11)] + [{"instruction": "x", "output": 3}]
    assert refused(write(tmp_path / "a.jsonl", lines)) == ["line 12: 'output' is a int, not a string"]


def test_invalid_utf8(tmp_path: Path) -> None:
    lines: list[Any] = [openai_example(i) for i in range(11)]
    lines.insert(2, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')
    assert refused(write(tmp_path / "d.jsonl", lines)) == ["line 3: invalid UTF-8 at byte 46"]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5000, 200_000])
def test_deeply_nested_json_is_refused_without_crashing(tmp_path: Path, depth: int) -> None:
    nested = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    lines: list[Any] = [openai_example(i) for i in range(11)] + [nested]
    assert refused(write(tmp_path / "d.jsonl", lines)) == [
        f"line 12: JSON nested more than {MAX_JSON_DEPTH} levels deep"
    ]


def test_overlong_line_is_skipped_not_read_whole(tmp_path: Path) -> None:
    huge = b'{"instruction": "' + b"x" * (2 << 20) + b'"}'
    lines: list[Any] = [alpaca_example(i) for i in range(11)] + [huge, alpaca_example(99)]
    issues = refused(write(tmp_path / "d.jsonl", lines))
    assert issues == ["line 12: line is longer than 1048576 bytes"]


def test_many_problems_are_listed_then_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [b"[]"] * 30)
    with pytest.raises(DatasetInvalid) as info:
        validate(path)
    assert len(info.value.issues) == 20
    assert info.value.more == 11  # 10 more lines, and "0 valid examples"
    assert str(info.value).endswith("... and 11 more")


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_path: Path) -> Any:
    tokenizer = ChatTokenizer(smollm2_path)
    yield tokenizer
    tokenizer.close()


@pytest.mark.slow
def test_overlong_example_counts_the_chat_template(tmp_path: Path, smol_tokenizer: ChatTokenizer) -> None:
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    # SmolLM2's template adds its own system prompt (about 20 tokens) when none is given:
    # the bare text is well under 64 tokens, the rendered example is not.
    words = " ".join(["zorb"] * 30)
    long = {"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": "Yes."}]}
    assert len(smol_tokenizer.tokenize(words)) < 64 < smol_tokenizer.count(long["messages"])
    path = write(tmp_path / "d.jsonl", [short] * 10 + [long])
    issues = refused(path, tokens=smol_tokenizer, context=64)
    assert len(issues) == 1
    assert issues[0].startswith("line 11: example is ")
    assert issues[0].endswith("tokens with the chat template, over the context of 64")
    summary = validate(path, smol_tokenizer, 256)
    assert summary == DatasetSummary(
        format="openai",
        examples=11,
        tokens=10 * smol_tokenizer.count(short["messages"]) + smol_tokenizer.count(long["messages"]),
        longest_tokens=smol_tokenizer.count(long["messages"]),
        longest_line=11,
        context=256,
    )


@pytest.mark.slow
def test_cli_validate_prints_a_summary(tmp_path: Path, smollm2_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [alpaca_example(i) for i in range(12)])
    env = make_env(tmp_path)
    result = CliRunner().invoke(cli, ["train", "validate", str(path), "--base", str(smollm2_path)], env=env)
    assert result.exit_code == 0, result.output
    assert "format    alpaca" in result.stdout
    assert "examples  12" in result.stdout
    assert "longest" in result.stdout and "(line " in result.stdout
    bad = write(tmp_path / "bad.jsonl", [alpaca_example(i) for i in range(9)])
    result = CliRunner().invoke(cli, ["train", "validate", str(bad)], env=env)
    assert result.exit_code == 1
    assert "9 valid examples; at least 10 are needed" in result.stderr
