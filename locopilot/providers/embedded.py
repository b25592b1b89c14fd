"""The embedded provider: models run by locopilot's own runner processes."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import anyio
import msgspec

from locopilot.engine.protocol import (
    CallDelta,
    Count,
    Counted,
    Delta,
    Done,
    Embed,
    Embeddings,
    Failed,
    FromRunner,
    Generate,
    Started,
)
from locopilot.engine.supervisor import ModelManager, RunnerGone
from locopilot.errors import (
    ContextLengthExceeded,
    EngineUnavailable,
    InvalidRequest,
    LocopilotError,
    ModelNotFound,
    TemplateFailed,
)
from locopilot.models.catalog import ModelCatalog
from locopilot.providers.base import (
    EmbeddingResult,
    Finish,
    GenerationRequest,
    Locality,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    refuse_thinking,
)


def failure_error(failed: Failed, input_param: str) -> LocopilotError:
    """The API error for a request the runner refused; ``input_param`` names the request's input field."""
    match failed.kind:
        case "context_length":
            return ContextLengthExceeded(failed.message, param=input_param)
        case "invalid":
            return InvalidRequest(failed.message, param=failed.param)
        case "template":
            return TemplateFailed(failed.message, param=failed.param)
        case _:
            return LocopilotError("the engine failed on this request; the server log says why")


def refuse_unseeable(request: GenerationRequest) -> None:
    """InvalidRequest for what the embedded engine cannot take yet: images and token-id prompts."""
    if request.prompt_tokens is not None:
        raise InvalidRequest(
            "The embedded engine takes prompts as text, not token ids; send the text, or route the request "
            "to an upstream that accepts token ids.",
            param="prompt",
        )
    for index, message in enumerate(request.messages or ()):
        if message.images:
            raise InvalidRequest(
                "The embedded engine cannot read images yet (no vision support); route the request to an "
                "upstream whose model can.",
                param=f"messages[{index}].content",
            )


def generate_job(request: GenerationRequest) -> Generate:
    """The runner job for ``request`` (its id is given when it is sent)."""
    return Generate(
        id=0,
        prompt=request.prompt,
        messages=request.messages,
        suffix=request.suffix,
        max_tokens=request.max_tokens,
        stop=request.stop,
        echo=request.echo,
        grammar=request.grammar,
        json_schema=request.json_schema,
        tools=request.tools,
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        logprobs=request.logprobs,
        n=request.n,
        sampling=request.sampling,
    )


LISTING_TTL = 30.0
"""Seconds a listing of an unchanged models folder is kept (a file rewritten in place, or a link's
target replaced, leaves the folder's own time as it was)."""
UNSETTLED_TTL = 1.0
"""Seconds a listing is kept while a file in the folder does not read as a model (one being copied
in, say: it changes nothing in the folder when it is complete)."""
SETTLE = 1.0
"""A folder changed less than this many seconds before a listing is listed again on the next ask:
its time comes from a coarse clock, so a second change soon after may leave it as it was."""


class EmbeddedProvider:
    name = "embedded"
    locality: Locality = "local"

    def __init__(self, manager: ModelManager, catalog: ModelCatalog, queue_size: int) -> None:
        self.manager = manager
        self.catalog = catalog
        self.queue_size = queue_size
        # The last listing: the folder's stamp then, the names, until when (monotonic) it holds.
        self._listing: tuple[tuple[int, int, int] | None, list[str], float] | None = None

    async def models(self) -> list[str]:
        """The usable models in the folder. Listed again only when the folder changed (one stat here,
        inline) or the listing is older than :data:`LISTING_TTL` (:data:`UNSETTLED_TTL` with a file
        that is not a model yet, none right after a change): every routing plan asks, and a
        listing runs in a thread."""
        stamp = self.catalog.stamp()
        now = time.monotonic()
        if self._listing is not None and self._listing[0] == stamp and now < self._listing[2]:
            return list(self._listing[1])
        started = time.time()
        entries = await anyio.to_thread.run_sync(self.catalog.list)
        names = [entry.name for entry in entries if entry.error is None]
        if stamp is None or started - stamp[2] / 1e9 < SETTLE:
            ttl = 0.0
        elif len(names) < len(entries):
            ttl = UNSETTLED_TTL
        else:
            ttl = LISTING_TTL
        self._listing = (stamp, names, now + ttl)
        return list(names)

    async def aclose(self) -> None:
        await self.manager.aclose()

    async def _check_loadable(self, model: str) -> None:
        """Raise ModelNotFound unless ``model`` is a regular file whose GGUF header our bounded reader accepts.

        A name that only ``embedded:NAME`` reaches (routing skips unreadable files) would otherwise
        evict a loaded model and hand whatever the name links to, a text file outside the folder
        say, to llama.cpp's own parser, once per request.
        """
        # get(), not header(): it reads regular files only (a FIFO would block the read).
        entry = await anyio.to_thread.run_sync(self.catalog.get, model)
        if entry.error is not None:
            raise ModelNotFound(f"The model '{model}' is not a usable GGUF file: {entry.error}", param="model")

    async def _target(self, model: str) -> tuple[str, str]:
        """The model whose runner serves ``model``, and the adapter it applies: ``(model, "")`` for a
        model, ``(its base, its path)`` for a LoRA adapter. Checks a model not loaded yet (:meth:`_check_loadable`)."""
        if model in self.manager.loaded():
            return model, ""
        entry = await anyio.to_thread.run_sync(self.catalog.get, model)
        if entry.error is not None:
            raise ModelNotFound(f"The model '{model}' is not a usable GGUF file: {entry.error}", param="model")
        if entry.adapter_of is None:
            return model, ""
        base = entry.adapter_of
        if base not in self.manager.loaded():
            try:
                await self._check_loadable(base)
            except ModelNotFound as exc:
                raise ModelNotFound(
                    f"The model '{model}' is a LoRA adapter of '{base}', which is missing or unusable: {exc.message}",
                    param="model",
                ) from exc
        return base, str(await anyio.to_thread.run_sync(self.catalog.load_path, model))

    async def _request(self, model: str, job: Generate | Embed | Count) -> AsyncGenerator[FromRunner, None]:
        """The job's messages from a live runner of ``model`` (a model, not an adapter: see :meth:`_target`);
        a runner that died while the job waited is replaced once."""
        for attempt in (1, 2):
            runner = await self.manager.runner(model)
            messages = runner.request(msgspec.structs.replace(job, id=runner.next_id()), self.queue_size)
            try:
                first = await anext(messages)
            except RunnerGone:
                await messages.aclose()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                await messages.aclose()
                raise
            try:
                yield first
                async for message in messages:
                    yield message
            finally:
                await messages.aclose()
            return

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        refuse_unseeable(request)
        refuse_thinking(request)
        target, adapter = await self._target(request.model)
        job = msgspec.structs.replace(generate_job(request), adapter=adapter)
        input_param = "messages" if request.messages is not None else "prompt"
        began = self.manager.clock()
        messages = self._request(target, job)
        try:
            async for message in messages:
                match message:
                    case Started():
                        pass
                    case Delta(text=text, tokens=tokens, index=index, logprobs=logprobs):
                        yield TextDelta(text, tokens, index, logprobs)
                    case CallDelta():
                        yield ToolCallDelta(
                            call=message.call,
                            index=message.index,
                            id=message.call_id,
                            name=message.name,
                            arguments=message.arguments,
                            tokens=message.tokens,
                        )
                    case Done():
                        yield Finish(
                            message.finish_reason,
                            message.prompt_tokens,
                            message.completion_tokens,
                            message.cached_tokens,
                            message.reasons,
                            message.tool_parse_failures,
                            stop=message.stop,
                            load_seconds=self._load_seconds(target, began),
                        )
                    case Failed():
                        raise failure_error(message, input_param)
                    case _:
                        raise EngineUnavailable(f"unexpected {type(message).__name__} from the runner")
        finally:
            await messages.aclose()

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The tokens of ``request``'s prompt as the model sees it: its messages (and tools)
        through the model's chat template, tokenized by the model's tokenizer."""
        input_param = "messages" if request.messages is not None else "prompt"
        target, _ = await self._target(request.model)
        messages = self._request(target, Count(id=0, job=generate_job(request)))
        try:
            async for message in messages:
                match message:
                    case Counted(prompt_tokens=tokens):
                        return tokens
                    case Failed():
                        raise failure_error(message, input_param)
        finally:
            await messages.aclose()
        raise EngineUnavailable("the runner ended the token count without a result")

    def _load_seconds(self, model: str, began: float) -> float:
        """How long ``model``'s runner took to load, if it was loaded since ``began`` (for this request)."""
        runner = self.manager.runners.get(model)
        return runner.load_seconds if runner is not None and runner.loaded_at >= began else 0.0

    async def load(self, model: str) -> None:
        """Load ``model`` now (Ollama's request with nothing to generate); raises ModelNotFound, EngineUnavailable."""
        target, _ = await self._target(model)
        await self.manager.runner(target)

    async def embed(self, model: str, inputs: list[str]) -> EmbeddingResult:
        target, adapter = await self._target(model)
        if adapter:
            raise InvalidRequest(
                f"The model '{model}' is a LoRA adapter; embeddings come from its base model '{target}' alone, "
                "so ask that model.",
                param="model",
            )
        messages = self._request(target, Embed(id=0, inputs=inputs))
        try:
            async for message in messages:
                match message:
                    case Embeddings(vectors=vectors, prompt_tokens=tokens):
                        return EmbeddingResult(vectors, tokens)
                    case Failed():
                        raise failure_error(message, "input")
        finally:
            await messages.aclose()
        raise EngineUnavailable("the runner ended the embedding request without a result")
