"""The Provider contract (:mod:`locopilot.providers.base`), one suite over every kind of provider.

As Litestar runs one store test suite over every store backend, each test here runs against the
embedded engine (a real runner process with SmolLM2), the Ollama provider over the Ollama
stand-in, and the openai provider over the fault upstream, each on real loopback sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from locopilot.engine.protocol import SamplingParams
from locopilot.engine.supervisor import ModelManager
from locopilot.errors import ModelNotFound, UpstreamError
from locopilot.models.catalog import ModelCatalog
from locopilot.providers.base import Finish, GenerationRequest, Message, Provider, StreamEvent, TextDelta
from locopilot.providers.embedded import EmbeddedProvider
from locopilot.providers.ollama import OllamaProvider
from locopilot.providers.openai_compat import OpenAICompatProvider
from locopilot.settings import load_settings
from tests.conftest import SMOL, free_port
from tests.fakes.fault_upstream import FaultUpstream
from tests.fakes.ollama import OllamaStandIn

QUESTION = "Which city is the capital of France?"


@dataclass
class Subject:
    """A provider, a model it serves, and (for one behind HTTP) how to make one that reaches nothing."""

    provider: Provider
    model: str
    unreachable: Callable[[], Provider] | None = None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["embedded", "ollama", "openai"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path, smollm2_path: Path) -> AsyncIterator[Subject]:
    match request.param:
        case "embedded":
            models = tmp_path / "models"
            models.mkdir()
            (models / f"{SMOL}.gguf").symlink_to(smollm2_path)
            settings = load_settings({"LOCOPILOT_DATA_DIR": str(tmp_path), "LOCOPILOT_MODELS_DIR": str(models)})
            catalog = ModelCatalog(settings.models_path)
            async with anyio.create_task_group() as tasks:
                provider = EmbeddedProvider(ModelManager(settings, catalog.load_path, tasks), catalog, 8)
                yield Subject(provider, SMOL)
                await provider.aclose()
        case "ollama":
            with OllamaStandIn(models=["llama3.2:1b"]) as stand_in:
                ollama = OllamaProvider("ollama", stand_in.url, num_ctx=4096)
                yield Subject(
                    ollama,
                    "llama3.2:1b",
                    lambda: OllamaProvider("gone", f"http://127.0.0.1:{free_port()}", num_ctx=4096),
                )
                await ollama.aclose()
        case "openai":
            fault = FaultUpstream().start()
            try:
                openai = OpenAICompatProvider("fault", fault.url)
                url = f"http://127.0.0.1:{free_port()}/v1"
                yield Subject(openai, FaultUpstream.MODELS[0], lambda: OpenAICompatProvider("gone", url))
                await openai.aclose()
            finally:
                fault.stop()


def ask(model: str) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        messages=[Message(role="user", content=QUESTION)],
        max_tokens=8,
        sampling=SamplingParams(temperature=0.0),
    )


async def events_of(provider: Provider, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


@pytest.mark.anyio
async def test_it_lists_the_model_it_serves(subject: Subject) -> None:
    assert subject.model in await subject.provider.models()


@pytest.mark.anyio
async def test_a_stream_is_text_then_one_finish(subject: Subject) -> None:
    events = await events_of(subject.provider, ask(subject.model))
    *text, last = events
    assert isinstance(last, Finish), events
    assert text and all(isinstance(event, TextDelta) for event in text), events
    assert "".join(event.text for event in text if isinstance(event, TextDelta))
    assert last.reason in ("stop", "length")
    assert last.completion_tokens >= 1


@pytest.mark.anyio
async def test_an_unknown_model_is_model_not_found_before_any_event(subject: Subject) -> None:
    stream = subject.provider.stream(ask("no-such-model"))
    with pytest.raises(ModelNotFound):
        await stream.__anext__()
    await stream.aclose()


@pytest.mark.anyio
async def test_a_stream_closed_after_its_first_event_ends_cleanly(subject: Subject) -> None:
    stream = subject.provider.stream(ask(subject.model))
    first = await stream.__anext__()
    assert isinstance(first, TextDelta | Finish)
    await stream.aclose()
    # The provider serves the next request as if nothing happened.
    assert isinstance((await events_of(subject.provider, ask(subject.model)))[-1], Finish)


@pytest.mark.anyio
async def test_an_upstream_not_reached_says_so_on_the_error(subject: Subject) -> None:
    """A provider behind HTTP puts the reason on its error at its boundary: the router reads it, not httpx's types."""
    if subject.unreachable is None:
        pytest.skip("the embedded engine is reached without a network")
    provider = subject.unreachable()
    try:
        with pytest.raises(UpstreamError) as info:
            await events_of(provider, ask(subject.model))
    finally:
        await provider.aclose()
    assert info.value.retryable and info.value.reason == "connect"
