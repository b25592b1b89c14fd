"""Each tool-call format end to end: copies of the test model carrying a real model family's template.

The copies (SmolLM2's weights and vocabulary, another family's ``tokenizer.chat_template``)
are written to a temporary folder. The server renders that template with the tools,
the grammar of the template's format holds a forced call to its syntax, and the
reply must come back as the right ``tool_calls``; ``/v1/models/{id}`` must name the format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import jsonschema_rs
import openai
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from tests.conftest import Server, start_server
from tests.test_toolcalls import EXPECTED, TEMPLATES

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": SCHEMA},
}
OTHER: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def with_template(model: Path, template: str, target: Path) -> Path:
    """A copy of ``model`` whose chat template is ``template``."""
    reader = gguf.GGUFReader(model)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(target, arch=arch.contents(), endianess=reader.endianess)
    details = MetadataDetails(gguf.GGUFValueType.STRING, template)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: details}, [])
    return target


def model_name(template: str) -> str:
    return template.lower().replace(".", "-")


@pytest.fixture(scope="module")
def formats_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("format-models")
    models = {
        model_name(name): with_template(
            smollm2_path, (TEMPLATES / f"{name}.jinja").read_text(), folder / f"{name}.gguf"
        )
        for name in EXPECTED
    }
    server = start_server(tmp_path_factory, models, {"LOCOPILOT_CTX_SIZE": "4096"})
    yield server
    server.stop()


@pytest.mark.parametrize("template", EXPECTED)
def test_a_forced_call_in_each_format_parses_into_tool_calls(formats_server: Server, template: str) -> None:
    # A slow machine: a long template's prompt and a call of some 30 tokens can take minutes under load.
    client = openai.OpenAI(base_url=f"{formats_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    reply = client.chat.completions.create(
        model=model_name(template),
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[OTHER, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema_rs.validate(SCHEMA, json.loads(call.function.arguments))
    assert not choice.message.content  # the call's syntax is not left behind as text


@pytest.mark.parametrize("template", EXPECTED)
def test_the_model_card_names_the_format(formats_server: Server, template: str) -> None:
    card = httpx.get(f"{formats_server.url}/v1/models/{model_name(template)}", timeout=10).json()
    expected = EXPECTED[template]
    assert card["tools"] == ("generic" if expected == "generic" else f"native:{expected}")


def test_a_round_trip_renders_in_a_native_format(formats_server: Server) -> None:
    """Qwen 2.5's template gets the call and the result as tool_calls and a tool message."""
    client = openai.OpenAI(base_url=f"{formats_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    history: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = client.chat.completions.create(
        model=model_name("Qwen-Qwen2.5-7B-Instruct"), messages=history, tools=[WEATHER], temperature=0, max_tokens=20
    )
    choice = reply.choices[0]
    assert choice.message.content or choice.message.tool_calls
