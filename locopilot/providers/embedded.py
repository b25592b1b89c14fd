"""The embedded provider: models run by locopilot's own runner processes."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from locopilot.engine.protocol import Delta, Done, Embed, Embeddings, Failed, Generate, Started
from locopilot.engine.scheduler import ModelManager
from locopilot.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest, LocopilotError
from locopilot.providers.base import EmbeddingResult, Finish, GenerationRequest, Locality, StreamEvent, TextDelta


def failure_error(failed: Failed) -> LocopilotError:
    match failed.kind:
        case "context_length":
            return ContextLengthExceeded(failed.message, param="messages")
        case "invalid":
            return InvalidRequest(failed.message)
        case _:
            return LocopilotError(f"the engine failed: {failed.message}")


class EmbeddedProvider:
    name = "embedded"
    locality: Locality = "local"

    def __init__(self, manager: ModelManager, queue_size: int) -> None:
        self.manager = manager
        self.queue_size = queue_size

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        runner = await self.manager.runner(request.model)
        async with runner.admit(self.queue_size):
            job = Generate(
                id=runner.next_id(),
                prompt=request.prompt,
                messages=request.messages,
                max_tokens=request.max_tokens,
                stop=request.stop,
                echo=request.echo,
                grammar=request.grammar,
                json_schema=request.json_schema,
                sampling=request.sampling,
            )
            messages = runner.request(job)
            try:
                async for message in messages:
                    match message:
                        case Started():
                            pass
                        case Delta(text=text, tokens=tokens):
                            yield TextDelta(text, tokens)
                        case Done(finish_reason=reason, prompt_tokens=p, completion_tokens=c):
                            yield Finish(reason, p, c)
                        case Failed():
                            raise failure_error(message)
                        case _:
                            raise EngineUnavailable(f"unexpected {type(message).__name__} from the runner")
            finally:
                await messages.aclose()

    async def embed(self, model: str, inputs: list[str]) -> EmbeddingResult:
        runner = await self.manager.runner(model)
        async with runner.admit(self.queue_size):
            messages = runner.request(Embed(id=runner.next_id(), inputs=inputs))
            try:
                async for message in messages:
                    match message:
                        case Embeddings(vectors=vectors, prompt_tokens=tokens):
                            return EmbeddingResult(vectors, tokens)
                        case Failed():
                            raise failure_error(message)
            finally:
                await messages.aclose()
        raise EngineUnavailable("the runner ended the embedding request without a result")
