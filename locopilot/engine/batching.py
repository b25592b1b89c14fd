"""Continuous batching in the runner: one model, up to ``slots`` requests decoding together.

:func:`serve` is the scheduling loop; :class:`Engine` owns llama.cpp's model
and context. Up to ``slots`` requests decode together, one token each per
step, and a new request joins between steps, its prompt fed in chunks.
Cancellations are recorded by the runner's reader thread and acted on between
steps, so a cancelled generation stops within a step and its slot is free for
the next request. Each slot keeps the tokens its KV cache holds; a prompt that
begins the same way reuses them.
"""

from __future__ import annotations

import codecs
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from locopilot.engine.embedding import Embedder
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
    Load,
    Ready,
    RequestError,
    Started,
)
from locopilot.engine.sampling import StopMatcher, build_sampler
from locopilot.engine.template_process import IsolatedRenderer
from locopilot.engine.templates import ChatTemplate, TemplateError, choose_template
from locopilot.engine.toolcalls import CallStream, ToolPlan, ToolSupport, new_call_id
from locopilot.engine.toolformats import ParsedCall, Part

log = logging.getLogger("locopilot.runner")

Send = Callable[[list[FromRunner]], None]
"""Writes messages to the API process (the runner's framed stdout), all in one write."""


BATCH = 512
# Prompt tokens a newcomer may add to a step while other sequences are generating.
PREFILL_CHUNK = 256
DEFAULT_SLOTS = 4
DEFAULT_KV_TOKENS = 32768


@dataclass
class Sequence:
    """One request in a slot: its prompt, sampler chain and progress."""

    job: Generate
    tokens: list[int]
    fed: int  # prompt tokens already in the KV cache (reused or decoded)
    cached: int  # of those, how many were reused from an earlier request
    max_tokens: int
    sampler: Any  # llama_sampler * (a chain), freed when the sequence ends
    matcher: StopMatcher
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    next_token: int | None = None  # sampled, not yet decoded
    generated: int = 0
    unsent: int = 0
    calls: CallStream | None = None  # reads tool calls out of the text, when the request offers tools


@dataclass
class Slot:
    """A llama.cpp sequence id and the tokens its KV cells hold, in order."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    sequence: Sequence | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """One model in llama.cpp, serving up to ``slots`` requests at once.

    ggml's backends must be registered first (runner.load_backends).

    Not thread-safe: the runner's main thread owns it. Each slot is one llama.cpp
    sequence id with its own ``n_ctx`` cells of KV cache (see ``kv_unified`` below);
    a slot remembers the tokens its cells hold, which a
    later prompt with the same beginning reuses.
    """

    def __init__(self, load: Load) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own log: errors only
        self.load = load
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if load.gpu_layers == -1 else load.gpu_layers
        self.model = internals.LlamaModel(path_model=load.model_path, params=model_params, verbose=False)
        self.metadata = self.model.metadata()
        self.template = (
            ChatTemplate(load.template_name, load.template_source, load.template_stop)
            if load.template_source
            else choose_template(self.metadata)
        )
        bos, eos = self.model.token_bos(), self.model.token_eos()
        self.bos = bos
        # The template is code from the model file: it is compiled and rendered in a helper
        # process with capped memory, started now so its imports overlap the context's setup.
        self.renderer = IsolatedRenderer(
            self.template,
            bos_token=self.model.token_get_text(bos) if bos >= 0 else "",
            eos_token=self.model.token_get_text(eos) if eos >= 0 else "",
        )
        n_ctx_slot = load.ctx_size or self.model.n_ctx_train()
        slots = load.parallel or max(1, min(DEFAULT_SLOTS, DEFAULT_KV_TOKENS // n_ctx_slot))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_slot * slots
        params.n_batch = BATCH
        params.n_ubatch = BATCH
        params.n_seq_max = slots
        # A KV buffer per slot: a unified one (shared cells, attention masks between
        # sequences) changed greedy replies when requests ran side by side, because the
        # attention sums run over a different set of cells. Split, each reply is the
        # one it would be alone.
        params.kv_unified = False
        # llama.cpp computes a step of one token with n_threads and any larger one (several
        # sequences, a prompt) with n_threads_batch (llama_context::graph_compute).
        params.n_threads = load.decode_threads or load.threads
        params.n_threads_batch = load.threads
        self.context = internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.threads = llama_cpp.llama_n_threads(self.ctx)
        self.threads_batch = llama_cpp.llama_n_threads_batch(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx_slot
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.slots = [Slot(i) for i in range(slots)]
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.cached_tokens_total = 0
        # Time inside llama_decode and the number of calls, for bench/engine.py --profile.
        self.decode_seconds = 0.0
        self.decode_calls = 0
        self._pieces: dict[int, bytes] = {}
        self.embedder = Embedder(self.model, self.metadata, n_ctx_slot, load.threads)
        self.renderer.check()
        self.tools = ToolSupport(
            self.template.source, lambda messages, tools: self.renderer.render(messages, tools=tools), self._one_token
        )
        self.add_bos = bos >= 0 and self.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"

    def ready(self) -> Ready:
        return Ready(
            n_ctx=self.n_ctx,
            n_ctx_train=self.model.n_ctx_train(),
            n_vocab=self.n_vocab,
            template=self.template.name,
            pid=os.getpid(),
            slots=len(self.slots),
            threads=self.threads,
            threads_batch=self.threads_batch,
        )

    def _one_token(self, text: str) -> int | None:
        """The token that is ``text``, if one is (a special token such as ``<tool_call>``)."""
        tokens: list[int] = self.model.tokenize(text.encode(), add_bos=False, special=True)
        return tokens[0] if len(tokens) == 1 else None

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self.model.tokenize(text.encode(), add_bos=False, special=True)
        if self.add_bos and (not tokens or tokens[0] != self.bos):
            tokens.insert(0, self.bos)
        return tokens

    @property
    def busy(self) -> bool:
        return any(slot.sequence is not None for slot in self.slots)

    def free_slot(self) -> Slot | None:
        free = [slot for slot in self.slots if slot.sequence is None]
        return free[0] if free else None

    def render(self, job: Generate) -> tuple[str, list[str], ToolPlan | None]:
        """The prompt text ``job`` asks for (its messages and tools through the chat template), its stop
        strings, and for a chat its tool plan (grammar and call parser)."""
        if job.messages is None:
            return job.prompt or "", list(job.stop), None
        try:
            plan = self.tools.plan(job.messages, job.tools, job.tool_choice, job.parallel_tool_calls)
        except ValueError as exc:
            message = f"the tools' schemas could not be turned into a grammar: {exc}"
            raise RequestError("invalid", message, "tools") from exc
        try:
            prompt = self.renderer.render(plan.messages, tools=plan.tools)
        except TemplateError as exc:
            raise RequestError("template", str(exc), "messages") from exc
        return prompt, [*job.stop, *self.template.stop], plan

    def count(self, count: Count) -> Counted:
        """The tokens ``count.job``'s prompt has, as :meth:`start` would feed them."""
        prompt, _, _ = self.render(count.job)
        return Counted(id=count.id, prompt_tokens=len(self.tokenize(prompt)))

    def start(self, job: Generate) -> list[FromRunner]:
        """Admit ``job`` to a free slot (there must be one); its first messages.

        Raises RequestError before any work when the request cannot run. Of
        the free slots it takes the one whose cached tokens share the longest
        beginning with the prompt, and keeps that much of its KV cache.
        """
        import llama_cpp

        prompt, stops, plan = self.render(job)
        tokens = self.tokenize(prompt)
        if not tokens:
            # Nothing to decode (an empty prompt on a model that adds no BOS): such a request never finished.
            raise RequestError(
                "invalid", "The prompt has no tokens for this model.", "messages" if job.messages else "prompt"
            )
        if len(tokens) >= self.n_ctx:
            raise RequestError(
                "context_length",
                f"This model's context length is {self.n_ctx} tokens, but the prompt has {len(tokens)} tokens. "
                "Shorten the prompt or raise LOCOPILOT_CTX_SIZE.",
            )
        budget = self.n_ctx - len(tokens)
        max_tokens = min(job.max_tokens, budget) if job.max_tokens else budget
        sampler = build_sampler(job, self.vocab, self.n_vocab, plan)

        free = [slot for slot in self.slots if slot.sequence is None]
        # At least the prompt's last token is decoded again: its logits start the reply.
        # On a tie, the slot with the least cached: another prompt may still want the rest.
        slot = max(free, key=lambda s: (_common_prefix(s.cached, tokens), -len(s.cached)))
        reuse = min(_common_prefix(slot.cached, tokens), len(tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            reuse = 0
        del slot.cached[reuse:]
        self.cached_tokens_total += reuse
        slot.sequence = Sequence(
            job=job,
            tokens=tokens,
            fed=reuse,
            cached=reuse,
            max_tokens=max_tokens,
            sampler=sampler,
            matcher=StopMatcher(stops),
            calls=plan.stream() if plan is not None and plan.stream is not None else None,
        )
        out: list[FromRunner] = [Started(id=job.id, prompt_tokens=len(tokens))]
        if job.echo:
            out.append(Delta(id=job.id, text=prompt, tokens=0))
        return out

    def cancel(self, cancelled: Callable[[int], bool]) -> list[FromRunner]:
        """End the sequences whose jobs were cancelled; their Done messages."""
        out: list[FromRunner] = []
        for slot in self.slots:
            sequence = slot.sequence
            if sequence is not None and cancelled(sequence.job.id):
                out.append(self._finish(slot, "cancelled"))
        return out

    def step(self) -> list[FromRunner]:
        """One decode for every active sequence: a token each for those generating,
        a chunk of prompt for those prefilling. Returns the messages it produced."""
        import llama_cpp

        batch = self.batch
        generating = [s for s in self.slots if s.sequence is not None and s.sequence.next_token is not None]
        prefilling = [s for s in self.slots if s.sequence is not None and s.sequence.next_token is None]
        # A long prompt joins in chunks, so the running streams keep getting tokens.
        room = BATCH - len(generating)
        if generating:
            room = min(room, PREFILL_CHUNK)
        n = 0
        outputs: list[tuple[Slot, int]] = []

        def add(slot: Slot, token: int, pos: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            if logits:
                outputs.append((slot, n))
            n += 1

        fed: list[tuple[Slot, list[int]]] = []
        for slot in generating:
            sequence = slot.sequence
            assert sequence is not None and sequence.next_token is not None
            add(slot, sequence.next_token, len(slot.cached), True)
            fed.append((slot, [sequence.next_token]))
        for slot in prefilling:
            sequence = slot.sequence
            assert sequence is not None
            if room <= 0:
                break
            chunk = sequence.tokens[sequence.fed : sequence.fed + room]
            start = len(slot.cached)
            for i, token in enumerate(chunk):
                add(slot, token, start + i, sequence.fed + i == len(sequence.tokens) - 1)
            sequence.fed += len(chunk)
            room -= len(chunk)
            fed.append((slot, chunk))
        if n == 0:
            return []
        batch.n_tokens = n
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self.ctx, batch)
        self.decode_seconds += time.perf_counter() - started
        self.decode_calls += 1
        if status != 0:
            log.error("llama_decode returned %s for %d tokens", status, n)
            out: list[FromRunner] = []
            for slot, _ in fed:
                sequence = slot.sequence
                assert sequence is not None
                out.append(Failed(id=sequence.job.id, kind="internal", message=f"llama_decode returned {status}"))
                self._release(slot)
                llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                slot.cached.clear()
            return out
        for slot, tokens in fed:
            slot.cached.extend(tokens)
        out = []
        for slot, index in outputs:
            out.extend(self._sample(slot, index))
        return out

    def _sample(self, slot: Slot, index: int) -> list[FromRunner]:
        import llama_cpp

        sequence = slot.sequence
        assert sequence is not None
        token = llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, index)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._flush(slot, "stop")
        sequence.generated += 1
        sequence.unsent += 1
        piece = self.piece(token, special=sequence.calls is not None)
        text, hit = sequence.matcher.feed(sequence.decoder.decode(piece))
        out: list[FromRunner] = []
        if text:
            out.extend(self._text(sequence, text))
        if hit:
            return [*out, *self._flush(slot, "stop")]
        if sequence.generated >= sequence.max_tokens:
            return [*out, *self._flush(slot, "length")]
        sequence.next_token = token
        return out

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one generated token, as llama-cpp-python's ``detokenize([token])`` gives them
        (special tokens as nothing unless ``special``: a reply that may call tools needs their
        markers, ``<tool_call>`` say), kept: each is two calls through ctypes otherwise."""
        key = -1 - token if special else token
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self.model.detokenize([token], special=special)
        return piece

    def _text(self, sequence: Sequence, text: str, last: bool = False) -> list[FromRunner]:
        """Messages for generated ``text``: Deltas, or with tools offered, content and calls
        as :class:`CallStream` finds them (``last``: the reply ends here)."""
        job_id = sequence.job.id
        parts: list[Part] = [text] if text else []
        if sequence.calls is not None:
            parts = sequence.calls.feed(text) + (sequence.calls.close() if last else [])
        out: list[FromRunner] = []
        # The stream counts the calls it has parsed, these included: the first here is number `call`.
        call = (sequence.calls.calls if sequence.calls else 0) - sum(isinstance(p, ParsedCall) for p in parts)
        for part in parts:
            if isinstance(part, ParsedCall):
                out.append(
                    CallDelta(id=job_id, call=call, call_id=new_call_id(), name=part.name, tokens=sequence.unsent)
                )
                out.append(CallDelta(id=job_id, call=call, arguments=part.arguments))
                call += 1
            else:
                out.append(Delta(id=job_id, text=part, tokens=sequence.unsent))
            sequence.unsent = 0
        return out

    def _flush(self, slot: Slot, reason: Literal["stop", "length"]) -> list[FromRunner]:
        sequence = slot.sequence
        assert sequence is not None
        out: list[FromRunner] = []
        tail = sequence.matcher.flush() + sequence.decoder.decode(b"", final=True)
        out.extend(self._text(sequence, tail, last=True))
        out.append(self._finish(slot, reason))
        return out

    def _finish(self, slot: Slot, reason: Literal["stop", "length", "cancelled"]) -> Done:
        sequence = slot.sequence
        assert sequence is not None
        self._release(slot)
        calls = sequence.calls
        return Done(
            id=sequence.job.id,
            finish_reason="tool_calls" if reason == "stop" and calls is not None and calls.calls else reason,
            prompt_tokens=len(sequence.tokens),
            completion_tokens=sequence.generated,
            cached_tokens=sequence.cached,
            tool_parse_failures=calls.failures if calls is not None else 0,
            # The request's own stop string, not the chat template's end marker.
            stop=sequence.matcher.matched if sequence.matcher.matched in sequence.job.stop else None,
        )

    def _release(self, slot: Slot) -> None:
        import llama_cpp

        sequence = slot.sequence
        assert sequence is not None
        llama_cpp.llama_sampler_free(sequence.sampler)
        slot.sequence = None

    def embed(self, job: Embed) -> Embeddings:
        """All of ``job``'s inputs, as few decodes as fit; RequestError for an input that is too long."""
        tokenized = self.embedder.tokenize(job.inputs)
        before = self.embedder.decodes
        vectors = self.embedder.embed(tokenized)
        return Embeddings(
            id=job.id,
            vectors=vectors,
            prompt_tokens=sum(map(len, tokenized)),
            decodes=self.embedder.decodes - before,
        )


def serve(
    engine: Engine,
    jobs: queue.Queue[Generate | Embed | Count | None],
    send: Send,
    cancellations: Cancellations,
) -> None:
    """The scheduling loop (continuous batching) until ``jobs`` yields None.

    Between decode steps it takes new jobs, ends cancelled sequences and admits
    waiting jobs to free slots; each step then advances every active sequence.
    An embedding request (or a token count) runs whole between two steps. What a round produces
    goes out in two writes at most: one before the step, one after it.
    """
    outbox = Outbox(send, cancellations)
    waiting: deque[Generate] = deque()
    open_ = True
    while open_ or engine.busy or waiting:
        idle = not engine.busy and not waiting
        try:
            job = jobs.get(block=idle and open_)
            while True:
                if job is None:
                    open_ = False
                elif isinstance(job, Embed):
                    outbox.put(embed_one(engine, job, cancellations))
                    outbox.flush()
                elif isinstance(job, Count):
                    outbox.put(count_one(engine, job))
                    outbox.flush()
                else:
                    waiting.append(job)
                job = jobs.get_nowait()
        except queue.Empty:
            pass
        for message in engine.cancel(cancellations.__contains__):
            outbox.put(message)
        for job in [j for j in waiting if j.id in cancellations]:
            waiting.remove(job)
            outbox.put(Done(id=job.id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0))
        while waiting and engine.free_slot() is not None:
            job = waiting.popleft()
            try:
                for message in engine.start(job):
                    outbox.put(message)
            except RequestError as exc:
                outbox.put(Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param))
            except Exception as exc:
                log.exception("request %s failed", job.id)
                outbox.put(Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}"))
        outbox.flush()
        for message in engine.step():
            outbox.put(message)
        outbox.flush()


class Outbox:
    """Messages for the API process, written together.

    A decode step makes a message for every sequence in it; written one at a
    time, each would be a system call and a wakeup of the API process, which
    competes with llama.cpp's threads for the same cores. A terminal message
    also ends its job's cancellation record, once it is written.
    """

    def __init__(self, send: Send, cancellations: Cancellations) -> None:
        self.send = send
        self.cancellations = cancellations
        self.messages: list[FromRunner] = []

    def put(self, message: FromRunner) -> None:
        self.messages.append(message)

    def flush(self) -> None:
        if not self.messages:
            return
        messages, self.messages = self.messages, []
        self.send(messages)
        for message in messages:
            if isinstance(message, Done | Failed | Embeddings | Counted):
                self.cancellations.finish(message.id)


class Cancellations:
    """Which jobs to stop, written by the reader thread and read between steps.

    Only jobs the runner has received and not finished can be cancelled, so a
    Cancel that arrives after its job ended is dropped instead of kept forever.
    Once stdin ends (the API process is gone) every job counts as cancelled.
    """

    def __init__(self) -> None:
        self._live: set[int] = set()
        self._ids: set[int] = set()
        self._closed = False
        self._lock = threading.Lock()

    def begin(self, job_id: int) -> None:
        with self._lock:
            self._live.add(job_id)

    def cancel(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._live:
                self._ids.add(job_id)

    def close(self) -> None:
        self._closed = True

    def __contains__(self, job_id: int) -> bool:
        return self._closed or job_id in self._ids

    def finish(self, job_id: int) -> None:
        with self._lock:
            self._live.discard(job_id)
            self._ids.discard(job_id)


def embed_one(engine: Engine, job: Embed, cancelled: Cancellations) -> FromRunner:
    """The one answer to an embedding job: its vectors, Failed, or Done when it was cancelled."""
    try:
        if job.id in cancelled:
            return Done(id=job.id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0)
        return engine.embed(job)
    except RequestError as exc:
        return Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param)
    except Exception as exc:
        log.exception("request %s failed", job.id)
        return Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}")


def count_one(engine: Engine, job: Count) -> FromRunner:
    """The one answer to a token count: Counted, or Failed (a template that fails, say)."""
    try:
        return engine.count(job)
    except RequestError as exc:
        return Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param)
    except Exception as exc:
        log.exception("request %s failed", job.id)
        return Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}")
