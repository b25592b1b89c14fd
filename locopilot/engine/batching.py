"""Continuous batching in the runner: one model, up to ``slots`` requests decoding together.

:class:`Engine` owns llama.cpp's model and context; the scheduling loop that
drives it is :func:`locopilot.engine.scheduling.serve`. Up to ``slots`` requests
decode together, one token each per step, and a new request joins between steps,
its prompt fed in chunks.
Cancellations are read by that loop between steps and acted on at once, so a
cancelled generation stops within a step and its slot is free for the next
request. Each slot keeps the tokens its KV cache holds; a prompt that begins the
same way reuses them.

LoRA adapters (``Generate.adapter``) apply to the whole context in llama.cpp, so one step
serves one adapter set: a job for another adapter than the running ones waits, and the jobs
behind it with it, until the running ones end; then the engine switches (:meth:`Engine.use_adapter`)
and drops its slots' caches, which the old weights computed. Requests keep their order.

A request for ``n`` choices takes ``n`` slots (:class:`Choices`): its prompt is
decoded once and its KV cache copied to the others. It waits until that many
slots are free; one that asks for more than the runner has is refused.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locopilot.engine.embedding import Embedder
from locopilot.engine.kvdisk import DiskPromptCache, common_prefix
from locopilot.engine.llama_batch import put
from locopilot.engine.protocol import (
    CallDelta,
    Count,
    Counted,
    Delta,
    Done,
    Embed,
    Embeddings,
    Failed,
    FinishReason,
    FromRunner,
    Generate,
    Load,
    Ready,
    RequestError,
    Started,
    TokenLogprob,
    Tuned,
)
from locopilot.engine.sampling import StopMatcher, build_sampler, token_logprob
from locopilot.engine.template_process import IsolatedRenderer
from locopilot.engine.templates import ChatTemplate, TemplateError, choose_template
from locopilot.engine.threads import DecodeThreads
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
MAX_TOP_LOGPROBS = 20


@dataclass
class PendingLogprobs:
    """Logprobs of generated tokens whose text has not gone out yet.

    The UTF-8 decoder and the stop-string matcher hold text back, so a token's text
    may leave in a later Delta than its own step's. Its logprob leaves with the Delta
    that carries the start of its text; a token that begins inside a stop string is
    never reported, as its text is not.
    """

    top: int  # alternatives per token
    waiting: deque[tuple[int, TokenLogprob]] = field(default_factory=deque)  # (first character, logprob)
    produced: int = 0  # characters decoded
    sent: int = 0  # characters sent

    def add(self, logprob: TokenLogprob, text: str) -> None:
        self.waiting.append((self.produced, logprob))
        self.produced += len(text)

    def take(self, text: str) -> tuple[TokenLogprob, ...]:
        """The logprobs that go out with ``text`` (the next text sent)."""
        self.sent += len(text)
        out: list[TokenLogprob] = []
        while self.waiting and self.waiting[0][0] < self.sent:
            out.append(self.waiting.popleft()[1])
        return tuple(out)

    def rest(self) -> tuple[TokenLogprob, ...]:
        out = tuple(logprob for _, logprob in self.waiting)
        self.waiting.clear()
        return out


@dataclass
class Choices:
    """The ``n`` choices of one request, each a :class:`Sequence` in a slot of its own.

    Choice 0 decodes the prompt. The others wait (``waiting``) until it has, then take a
    copy of its KV cache (``llama_memory_seq_cp``) and sample their first token from the
    same logits, each with its own sampler. The request is done when every choice is.
    """

    job: Generate
    prompt_tokens: int
    cached: int  # prompt tokens reused from an earlier request's cache
    waiting: list[Slot]
    reasons: list[FinishReason | None]
    completion_tokens: int = 0
    tool_parse_failures: int = 0
    stop: str | None = None  # the request's stop string that ended choice 0

    def done(self) -> Done:
        reasons = [reason or "cancelled" for reason in self.reasons]
        return Done(
            id=self.job.id,
            finish_reason=reasons[0],
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached,
            reasons=tuple(reasons) if len(reasons) > 1 else (),
            tool_parse_failures=self.tool_parse_failures,
            stop=self.stop,
        )


@dataclass
class Sequence:
    """One choice of a request in a slot: its prompt, sampler chain and progress."""

    job: Generate
    tokens: list[int]
    fed: int  # prompt tokens already in the KV cache (reused or decoded)
    cached: int  # of those, how many were reused from an earlier request
    max_tokens: int
    sampler: Any  # llama_sampler * (a chain), freed when the sequence ends
    matcher: StopMatcher
    choices: Choices
    index: int = 0  # which choice; only choice 0 decodes the prompt
    logprobs: PendingLogprobs | None = None  # when the request asked for them
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
    started: int = 0
    """When a sequence last started here (the engine's count of starts): 0 never."""


def _slot_value(slot: Slot, tokens: list[int]) -> tuple[bool, int, int]:
    """How good ``slot`` is for a prompt of ``tokens``: more is better (see :meth:`Engine.start`)."""
    common = common_prefix(slot.cached, tokens)
    gain = 2 * common - len(slot.cached)
    return gain > 0, gain if gain > 0 else -slot.started, common


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
        candidates: tuple[int, ...]
        if load.decode_threads:
            candidates, reason = (load.decode_threads,), "set (LOCOPILOT_THREADS or the model's settings)"
        elif load.threads > 1:
            candidates, reason = (load.threads, load.threads - 1), ""
        else:
            candidates, reason = (1,), "one core"
        params.n_threads = candidates[0]
        params.n_threads_batch = load.threads
        self.context = internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.threads_batch = llama_cpp.llama_n_threads_batch(self.ctx)
        self.decode_threads = DecodeThreads(
            candidates, lambda n: llama_cpp.llama_set_n_threads(self.ctx, n, self.threads_batch), reason
        )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx_slot
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.slots = [Slot(i) for i in range(slots)]
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.cached_tokens_total = 0
        self.starts = 0
        # LoRA adapters loaded, by path: the file's (inode, size, mtime) and llama.cpp's adapter, kept
        # until the runner ends; and the one in use ("" for none).
        self.adapters: dict[str, tuple[tuple[int, int, int], Any]] = {}
        self.adapter = ""
        # Time inside llama_decode and the number of calls, for bench/engine.py --profile.
        self.decode_seconds = 0.0
        self.decode_calls = 0
        self._pieces: dict[int, bytes] = {}
        self._logprob_scratch: Any = None  # a float32 row for token_logprob, made on first use
        self.fim = (
            llama_cpp.llama_vocab_fim_pre(self.vocab),
            llama_cpp.llama_vocab_fim_suf(self.vocab),
            llama_cpp.llama_vocab_fim_mid(self.vocab),
        )
        self.embedder = Embedder(self.model, self.metadata, n_ctx_slot, load.threads)
        self.renderer.check()
        self.tools = ToolSupport(
            self.template.source, lambda messages, tools: self.renderer.render(messages, tools=tools), self._one_token
        )
        self.add_bos = bos >= 0 and self.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"
        self.disk: DiskPromptCache | None = None
        if load.prompt_cache_dir and load.prompt_cache_bytes > 0:
            try:
                self.disk = DiskPromptCache(
                    Path(load.prompt_cache_dir), load.model_path, load.prompt_cache_bytes, load.prompt_cache_min_tokens
                )
            except OSError as exc:
                log.warning("prompt cache on disk off: %s", exc)

    def ready(self) -> Ready:
        return Ready(
            n_ctx=self.n_ctx,
            n_ctx_train=self.model.n_ctx_train(),
            n_vocab=self.n_vocab,
            template=self.template.name,
            pid=os.getpid(),
            slots=len(self.slots),
            threads=self.decode_threads.threads,
            threads_batch=self.threads_batch,
            threads_reason=self.decode_threads.reason,
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

    def can_start(self, job: Generate) -> bool:
        """Whether ``job`` may be started now: a slot free for each of its choices (or
        it asks for more than there are, and :meth:`start` refuses it at once)."""
        if job.adapter != self.adapter and self.busy:
            return False
        free = sum(1 for slot in self.slots if slot.sequence is None)
        return free >= job.n or job.n > len(self.slots)

    def use_adapter(self, path: str) -> None:
        """Apply the LoRA adapter at ``path`` ("" for none) to every later step; loaded on first use,
        and again when the file changed since (a model replaced under the same name).

        Only while no sequence runs (:meth:`can_start`; :meth:`start` calls it then). When the
        weights change, the slots' caches, computed with the old ones, are dropped. RequestError
        if the file is gone or llama.cpp cannot load it.
        """
        import llama_cpp

        if path:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise RequestError("invalid", f"the LoRA adapter's file is gone: {exc.strerror}", "model") from exc
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            held = self.adapters.get(path)
            if held is not None and held[0] != stamp:
                if path == self.adapter:
                    llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
                    self.adapter = ""
                llama_cpp.llama_adapter_lora_free(held[1])
                del self.adapters[path]
            if path not in self.adapters:
                loaded = llama_cpp.llama_adapter_lora_init(self.model.model, path.encode())
                if not loaded:
                    raise RequestError(
                        "invalid",
                        "llama.cpp could not load this model's LoRA adapter; the runner's log says why",
                        "model",
                    )
                self.adapters[path] = (stamp, loaded)
        if path == self.adapter:
            return
        if path:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[path][1])
            scales = (ctypes.c_float * 1)(1.0)
            llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        else:
            llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        for slot in self.slots:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.cached.clear()
        self.adapter = path

    def check(self, job: Generate) -> None:
        """RequestError if this model cannot serve ``job`` as asked (before any work)."""
        if job.n > len(self.slots):
            raise RequestError(
                "invalid",
                f"n={job.n} asks for more choices than this model's {len(self.slots)} parallel sequences "
                "(LOCOPILOT_PARALLEL); each choice takes one.",
                "n",
            )
        if job.logprobs is not None and not 0 <= job.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError("invalid", f"at most {MAX_TOP_LOGPROBS} top logprobs per token", "logprobs")
        if job.logprobs is not None and job.echo:
            raise RequestError(
                "invalid", "logprobs of the prompt (echo with logprobs) are not supported; ask without echo", "logprobs"
            )
        if job.suffix is not None:
            if job.messages is not None:
                raise RequestError("invalid", "suffix is for text completions, not chat", "suffix")
            if min(self.fim) < 0:
                raise RequestError(
                    "invalid",
                    "This model's vocabulary has no fill-in-the-middle tokens (prefix, suffix and middle), "
                    "so it cannot complete between a prompt and a suffix. Leave suffix out or use a code model "
                    "trained for it.",
                    "suffix",
                )

    def infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        """A fill-in-the-middle prompt as llama-server's ``/infill`` builds one (the prefix-suffix-middle
        order): BOS if the model adds one, FIM_PRE, the prefix, FIM_SUF, the suffix, FIM_MID. The text
        is tokenized without parsing special tokens, so code that spells one stays text."""
        pre, suf, mid = self.fim
        tokens = [pre, *self.model.tokenize(prefix.encode(), add_bos=False, special=False)]
        tokens += [suf, *self.model.tokenize(suffix.encode(), add_bos=False, special=False), mid]
        return [self.bos, *tokens] if self.add_bos else tokens

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
        """Admit ``job``, a choice to each of ``job.n`` free slots (:meth:`can_start`); its first messages.

        Raises RequestError before any work when the request cannot run. Of
        the free slots, choice 0 takes the one whose cached tokens share the
        longest beginning with the prompt for what it would discard, and keeps that much of its KV
        cache; the other choices take those with the least cached.
        """
        import llama_cpp

        self.check(job)
        if job.adapter != self.adapter or not self.busy:
            self.use_adapter(job.adapter)
        prompt, stops, plan = self.render(job)
        tokens = self.tokenize(prompt) if job.suffix is None else self.infill_tokens(prompt, job.suffix)
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
        samplers = self._samplers(job, plan)

        free = [slot for slot in self.slots if slot.sequence is None]
        # At least the prompt's last token is decoded again: its logits start the reply.
        # The slot that keeps more of its cache than it throws away, the most kept first; if none does (a
        # new conversation that shares only a system prompt), the least recently used, an empty one first:
        # another conversation's turns stay cached for its next turn, and stale ones are evicted first.
        slot = max(free, key=lambda s: _slot_value(s, tokens))
        self.starts += 1
        slot.started = self.starts
        if self.disk is not None and not self.adapter:
            have = common_prefix(slot.cached, tokens)
            held = self.disk.load_into(self.ctx, slot.seq_id, tokens, have, self.n_ctx)
            if held is not None:
                slot.cached[:] = held
        reuse = min(common_prefix(slot.cached, tokens), len(tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            reuse = 0
        del slot.cached[reuse:]
        self.cached_tokens_total += reuse
        # The other choices' slots get a copy of choice 0's cache: those whose own cache is smallest.
        others = sorted((s for s in free if s is not slot), key=lambda s: len(s.cached))[: job.n - 1]
        choices = Choices(job=job, prompt_tokens=len(tokens), cached=reuse, waiting=others, reasons=[None] * job.n)
        for index, (each, sampler) in enumerate(zip([slot, *others], samplers, strict=True)):
            each.sequence = Sequence(
                job=job,
                tokens=tokens,
                fed=reuse if index == 0 else len(tokens),
                cached=reuse,
                max_tokens=max_tokens,
                sampler=sampler,
                matcher=StopMatcher(stops),
                choices=choices,
                index=index,
                logprobs=None if job.logprobs is None else PendingLogprobs(job.logprobs),
                calls=plan.stream() if plan is not None and plan.stream is not None else None,
            )
        out: list[FromRunner] = [Started(id=job.id, prompt_tokens=len(tokens))]
        if job.echo:
            out.extend(Delta(id=job.id, text=prompt, tokens=0, index=index) for index in range(job.n))
        return out

    def save_prompts(self) -> None:
        """Write each idle slot's cache to disk that holds enough tokens no file holds yet."""
        if self.disk is None or self.adapter:
            return  # the files hold the model's own caches, not an adapter's
        for slot in self.slots:
            if slot.sequence is None:
                self.disk.save_from(self.ctx, slot.seq_id, slot.cached)

    def _samplers(self, job: Generate, plan: ToolPlan | None) -> list[Any]:
        """A sampler chain for each of ``job``'s choices; RequestError (none left allocated) for bad parameters."""
        import llama_cpp

        samplers = [build_sampler(job, self.vocab, self.n_vocab, plan)]
        try:
            samplers.extend(build_sampler(job, self.vocab, self.n_vocab, plan, choice) for choice in range(1, job.n))
        except BaseException:
            for sampler in samplers:
                llama_cpp.llama_sampler_free(sampler)
            raise
        return samplers

    def cancel(self, cancelled: Callable[[int], bool]) -> list[FromRunner]:
        """End the sequences whose jobs were cancelled; their Done messages."""
        out: list[FromRunner] = []
        for slot in self.slots:
            sequence = slot.sequence
            if sequence is not None and cancelled(sequence.job.id):
                out.extend(self._finish(slot, "cancelled"))
        return out

    def step(self) -> list[FromRunner]:
        """One decode for every active sequence: a token each for those generating,
        a chunk of prompt for those prefilling. Returns the messages it produced."""
        import llama_cpp

        batch = self.batch
        generating = [s for s in self.slots if s.sequence is not None and s.sequence.next_token is not None]
        # Only choice 0 decodes a prompt; the other choices copy its cache (see Choices).
        prefilling = [
            s for s in self.slots if s.sequence is not None and s.sequence.next_token is None and s.sequence.index == 0
        ]
        # A long prompt joins in chunks, so the running streams keep getting tokens.
        room = BATCH - len(generating)
        if generating:
            room = min(room, PREFILL_CHUNK)
        n = 0
        outputs: list[tuple[Slot, int]] = []

        def add(slot: Slot, token: int, pos: int, logits: bool) -> None:
            nonlocal n
            put(batch, n, token, pos, slot.seq_id, logits)
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
        out: list[FromRunner] = []
        if self.decode_threads.step(n, started):
            out.append(Tuned(threads=self.decode_threads.threads, reason=self.decode_threads.reason))
        status = llama_cpp.llama_decode(self.ctx, batch)
        self.decode_seconds += time.perf_counter() - started
        self.decode_calls += 1
        if status != 0:
            log.error("llama_decode returned %s for %d tokens", status, n)
            for job in dict.fromkeys(slot.sequence.job for slot, _ in fed if slot.sequence is not None):
                out.append(Failed(id=job.id, kind="internal", message=f"llama_decode returned {status}"))
                for slot in self.slots:
                    if slot.sequence is not None and slot.sequence.job is job:
                        self._release(slot)
                        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                        slot.cached.clear()
            return out
        for slot, tokens in fed:
            slot.cached.extend(tokens)
        for slot, index in outputs:
            out.extend(self._sample(slot, index))
        return out

    def _sample(self, slot: Slot, index: int) -> list[FromRunner]:
        """The next token of ``slot``'s sequence from output row ``index``. When that row ends a prompt
        that other choices share, they take a copy of the prompt's cache and sample from it too."""
        import llama_cpp

        sequence = slot.sequence
        assert sequence is not None
        waiting, sequence.choices.waiting = sequence.choices.waiting, []
        for other in waiting:
            # Copied whole (separate KV buffers per slot) at the start of the next decode, before it writes.
            llama_cpp.llama_memory_seq_cp(self.memory, slot.seq_id, other.seq_id, -1, -1)
            other.cached = list(slot.cached)
        out = self._sample_one(slot, index)
        for other in waiting:
            out.extend(self._sample_one(other, index))
        return out

    def _sample_one(self, slot: Slot, index: int) -> list[FromRunner]:
        import llama_cpp

        sequence = slot.sequence
        assert sequence is not None
        token = llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, index)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._flush(slot, "stop")
        sequence.generated += 1
        sequence.unsent += 1
        decoded = sequence.decoder.decode(self.piece(token, special=sequence.calls is not None))
        logprobs = sequence.logprobs
        if logprobs is not None:
            logprobs.add(self.logprob(index, token, logprobs.top), decoded)
        text, hit = sequence.matcher.feed(decoded)
        out: list[FromRunner] = []
        if text:
            out.extend(self._text(sequence, text, () if logprobs is None else logprobs.take(text)))
        if hit:
            if logprobs is not None:
                logprobs.waiting.clear()  # the stop string's tokens: their text is not sent either
            return [*out, *self._flush(slot, "stop")]
        if sequence.generated >= sequence.max_tokens:
            return [*out, *self._flush(slot, "length")]
        sequence.next_token = token
        return out

    def logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s logprob (and ``top`` alternatives) from output row ``index`` of the last decode."""
        import llama_cpp
        import numpy as np

        if self._logprob_scratch is None:
            self._logprob_scratch = np.empty(self.n_vocab, dtype=np.float32)
        logits = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return token_logprob(logits, self._logprob_scratch, token, top, self.piece)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one generated token, as llama-cpp-python's ``detokenize([token])`` gives them
        (special tokens as nothing unless ``special``: a reply that may call tools needs their
        markers, ``<tool_call>`` say), kept: each is two calls through ctypes otherwise."""
        key = -1 - token if special else token
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self.model.detokenize([token], special=special)
        return piece

    def _text(
        self, sequence: Sequence, text: str, logprobs: tuple[TokenLogprob, ...] = (), last: bool = False
    ) -> list[FromRunner]:
        """Messages for generated ``text`` (with its tokens' ``logprobs``): Deltas, or with tools
        offered, content and calls as :class:`CallStream` finds them (``last``: the reply ends here).
        The logprobs go with the first Delta; text that became calls has none."""
        job_id, index = sequence.job.id, sequence.index
        parts: list[Part] = [text] if text else []
        if sequence.calls is not None:
            parts = sequence.calls.feed(text) + (sequence.calls.close() if last else [])
        out: list[FromRunner] = []
        # The stream counts the calls it has parsed, these included: the first here is number `call`.
        call = (sequence.calls.calls if sequence.calls else 0) - sum(isinstance(p, ParsedCall) for p in parts)
        for part in parts:
            if isinstance(part, ParsedCall):
                out.append(
                    CallDelta(
                        id=job_id,
                        call=call,
                        index=index,
                        call_id=new_call_id(),
                        name=part.name,
                        tokens=sequence.unsent,
                    )
                )
                out.append(CallDelta(id=job_id, call=call, index=index, arguments=part.arguments))
                call += 1
            else:
                out.append(Delta(id=job_id, text=part, tokens=sequence.unsent, index=index, logprobs=logprobs))
                logprobs = ()
            sequence.unsent = 0
        if logprobs and not any(isinstance(message, Delta) for message in out):
            out.append(Delta(id=job_id, text="", tokens=sequence.unsent, index=index, logprobs=logprobs))
            sequence.unsent = 0
        return out

    def _flush(self, slot: Slot, reason: Literal["stop", "length"]) -> list[FromRunner]:
        sequence = slot.sequence
        assert sequence is not None
        out: list[FromRunner] = []
        tail = sequence.matcher.flush() + sequence.decoder.decode(b"", final=True)
        logprobs = () if sequence.logprobs is None else sequence.logprobs.rest()
        out.extend(self._text(sequence, tail, logprobs, last=True))
        out.extend(self._finish(slot, reason))
        return out

    def _finish(self, slot: Slot, reason: Literal["stop", "length", "cancelled"]) -> list[FromRunner]:
        """End ``slot``'s choice; the request's Done once it was the last of its choices."""
        sequence = slot.sequence
        assert sequence is not None
        self._release(slot)
        choices = sequence.choices
        calls = sequence.calls
        choices.reasons[sequence.index] = (
            "tool_calls" if reason == "stop" and calls is not None and calls.calls else reason
        )
        choices.completion_tokens += sequence.generated
        choices.tool_parse_failures += calls.failures if calls is not None else 0
        if sequence.index == 0 and sequence.matcher.matched in sequence.job.stop:
            # The request's own stop string, not the chat template's end marker.
            choices.stop = sequence.matcher.matched
        # Cancelled before choice 0 had decoded the prompt: nothing to copy to it.
        choices.waiting = [other for other in choices.waiting if other is not slot]
        return [choices.done()] if None not in choices.reasons else []

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
