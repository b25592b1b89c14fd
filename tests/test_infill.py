"""``suffix`` on /v1/completions: fill-in-the-middle with the model's FIM tokens, or a 400 without them.

Neither test model was trained for fill-in-the-middle: SmolLM2's vocabulary has no FIM tokens
(its StarCoder-style slots hold ``<repo_name>``, ``<jupyter_*>`` and so on) and Gemma 3's has
none either. So the FIM model here is a copy of SmolLM2 whose three unused ``<jupyter_*>``
control tokens are renamed ``<fim_prefix>``, ``<fim_suffix>`` and ``<fim_middle>`` and named in
the ``tokenizer.ggml.fim_*_token_id`` keys, as a converted StarCoder-family model has them. Its
middles mean nothing; what is tested is that the prompt is built from those tokens in
llama-server's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import openai
import pytest

from tests.conftest import GEMMA, SMOL, Server, start_server

FIM_MODEL = "smollm2-fim"
FIM_TOKENS = {11: "<fim_prefix>", 12: "<fim_suffix>", 13: "<fim_middle>"}
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(2, 3))\n"


def copy_with_fim_tokens(source: Path, target: Path) -> Path:
    """``source`` with three control tokens renamed to StarCoder's FIM tokens and named in the FIM keys."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        kind = field.types[0]
        value = field.contents()
        if field.name == "tokenizer.ggml.tokens":
            value = [FIM_TOKENS.get(i, token) for i, token in enumerate(value)]
        writer.add_key_value(
            field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    for (token, _), part in zip(FIM_TOKENS.items(), ("pre", "suf", "mid"), strict=True):
        writer.add_uint32(f"tokenizer.ggml.fim_{part}_token_id", token)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return target


@pytest.fixture(scope="module")
def infill(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    model = copy_with_fim_tokens(smollm2_path, tmp_path_factory.mktemp("fim") / "fim.gguf")
    running = start_server(tmp_path_factory, {FIM_MODEL: model, SMOL: smollm2_path})
    yield running
    running.stop()


def first_token_alternatives(client: openai.OpenAI, **kwargs: object) -> tuple[dict[str, float], int]:
    """The first generated token's top 5 (token → logprob) and the prompt's length in tokens."""
    completion = client.completions.create(model=FIM_MODEL, temperature=0, max_tokens=1, logprobs=5, **kwargs)  # type: ignore[call-overload]
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    assert completion.usage is not None
    return logprobs.top_logprobs[0], completion.usage.prompt_tokens


def test_the_prompt_is_prefix_suffix_middle_with_the_fim_tokens(infill: Server) -> None:
    client = infill.client()
    filled, filled_tokens = first_token_alternatives(client, prompt=PREFIX, suffix=SUFFIX)
    # The same prompt written out with the tokens' names, which a plain completion parses as special tokens.
    spelled, spelled_tokens = first_token_alternatives(
        client, prompt=f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    )
    plain, plain_tokens = first_token_alternatives(client, prompt=PREFIX)
    _, suffix_tokens = first_token_alternatives(client, prompt=SUFFIX)
    assert filled_tokens == spelled_tokens == plain_tokens + suffix_tokens + 3
    assert filled == pytest.approx(spelled, abs=1e-3)
    assert filled != plain


def test_fill_in_the_middle_streams_and_echoes(infill: Server) -> None:
    client = infill.client()
    whole = client.completions.create(model=FIM_MODEL, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=8)
    stream = client.completions.create(
        model=FIM_MODEL, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=8, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole.choices[0].text
    echoed = client.completions.create(
        model=FIM_MODEL, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=8, echo=True
    )
    assert echoed.choices[0].text == PREFIX + whole.choices[0].text


def test_special_token_names_in_the_code_stay_text(infill: Server) -> None:
    """As in llama-server, the prefix and suffix are tokenized as text: code that spells a FIM token
    cannot rearrange the prompt (parsed as the token, ``<fim_middle>`` would be one)."""
    client = infill.client()
    _, spelled = first_token_alternatives(client, prompt="x = '<fim_middle>'", suffix="\n")
    _, empty = first_token_alternatives(client, prompt="x = ''", suffix="\n")
    assert spelled - empty > 2


def test_an_empty_suffix_is_a_plain_completion(infill: Server) -> None:
    client = infill.client()
    assert first_token_alternatives(client, prompt=PREFIX, suffix="") == first_token_alternatives(client, prompt=PREFIX)


def test_a_model_without_fim_tokens_is_refused(server: Server, infill: Server) -> None:
    for running, model in ((server, GEMMA), (server, SMOL), (infill, SMOL)):
        with pytest.raises(openai.BadRequestError) as info:
            running.client().completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
        assert info.value.param == "suffix"
        assert "fill-in-the-middle" in info.value.message
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": GEMMA, "prompt": PREFIX, "suffix": SUFFIX, "stream": True},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "suffix"
