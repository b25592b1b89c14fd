"""The runner: a child process that owns one loaded model.

Started by the API process as ``locopilot _runner`` (the same executable), it
reads framed ``ToRunner`` messages on stdin and writes ``FromRunner`` messages
on stdout (see protocol.py). The first message is ``Load``; the runner answers
``Ready`` or ``LoadFailed``. A llama.cpp crash kills only this process; the API
process sees end-of-stream and fails the requests it had in flight.

Generation is continuously batched (see :func:`serve` and :class:`Engine`):
up to ``slots`` requests decode together, one token each per step, and a new
request joins between steps, its prompt fed in chunks. ``Cancel`` is read by a
separate thread and acted on between steps, so a cancelled generation stops
within a step and its slot is free for the next request. Each slot keeps the
tokens its KV cache holds; a prompt that begins the same way reuses them.
stdout is reserved for frames: anything llama.cpp or Python prints to
file descriptor 1 is redirected to stderr.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from locopilot.engine import protocol
from locopilot.engine.protocol import (
    Cancel,
    Delta,
    Done,
    Embed,
    Embeddings,
    Failed,
    FromRunner,
    Generate,
    Load,
    LoadFailed,
    ProtocolError,
    Ready,
    Started,
)
from locopilot.engine.templates import TemplateError, TemplateRenderer, choose_template

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger("locopilot.runner")


FailureKind = Literal["context_length", "invalid", "internal"]


class RequestError(Exception):
    """A request the runner refuses; ``kind`` and ``param`` go into ``Failed``."""

    def __init__(self, kind: FailureKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.param = param


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    # The wheel stores libggml.so and libggml.so.0 as two copies, not a symlink;
    # libllama loads the versioned one, and a backend registered in the other
    # copy is invisible to it. So open ggml by the name libllama asked for.
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    pattern = re.compile(r"^libggml\.(so\.\d+|\d+\.dylib)$")
    names = sorted(p.name for p in lib_dir.iterdir() if pattern.match(p.name))
    ggml = ctypes.CDLL(str(lib_dir / (names[0] if names else "libggml.so")))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    return ggml


def load_backends() -> list[str]:
    """Register ggml's dynamically loaded backends (CPU variants, GPU) from llama_cpp/lib.

    llama-cpp-python does not do this itself; with GGML_BACKEND_DL a model load
    fails without it. Returns a description of each device found.
    """
    import llama_cpp

    ggml = _ggml()
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(Path(llama_cpp.__file__).parent / "lib").encode())
    count = int(ggml.ggml_backend_dev_count())
    return [
        ggml.ggml_backend_dev_description(ggml.ggml_backend_dev_get(i)).decode(errors="replace") for i in range(count)
    ]


def probe() -> int:
    """``_runner --probe``: print llama.cpp's version and devices as JSON; 1 if none."""
    import llama_cpp

    devices = load_backends()
    out = {"version": llama_cpp.__version__, "devices": devices}
    print(json.dumps(out))
    return 0 if devices else 1


def json_grammar(schema: str) -> str:
    """GBNF for a JSON Schema, with JSON's own rule for characters inside strings.

    llama-cpp-python's converter lets a string hold raw control characters
    (newlines included), which JSON forbids: a small model then wanders on inside
    a string and the reply does not parse. llama.cpp's own converter excludes them.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf: str = json_schema_to_gbnf(schema)
    return gbnf.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


class StopMatcher:
    """Holds back text that could be the start of a stop string.

    ``feed`` returns the text that is safe to send and whether a stop string
    was found (text after it is dropped).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


BATCH = 512
# Prompt tokens a newcomer may add to a step while other sequences are generating.
PREFILL_CHUNK = 256
DEFAULT_SLOTS = 4
DEFAULT_KV_TOKENS = 32768
PENALTY_WINDOW = 64


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
        if not load_backends():
            raise RuntimeError("llama.cpp found no usable backend for this CPU")
        self.load = load
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if load.gpu_layers == -1 else load.gpu_layers
        self.model = internals.LlamaModel(path_model=load.model_path, params=model_params, verbose=False)
        self.metadata = self.model.metadata()
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
        params.n_threads = load.threads
        params.n_threads_batch = load.threads
        self.context = internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx_slot
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.slots = [Slot(i) for i in range(slots)]
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.cached_tokens_total = 0
        self._embedder: Llama | None = None
        self.template = choose_template(self.metadata)
        bos, eos = self.model.token_bos(), self.model.token_eos()
        self.bos = bos
        self.renderer = TemplateRenderer(
            self.template,
            bos_token=self.model.token_get_text(bos) if bos >= 0 else "",
            eos_token=self.model.token_get_text(eos) if eos >= 0 else "",
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
        )

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

    def start(self, job: Generate) -> list[FromRunner]:
        """Admit ``job`` to a free slot (there must be one); its first messages.

        Raises RequestError before any work when the request cannot run. Of
        the free slots it takes the one whose cached tokens share the longest
        beginning with the prompt, and keeps that much of its KV cache.
        """
        import llama_cpp

        if job.messages is not None:
            try:
                prompt = self.renderer.render(job.messages)
            except TemplateError as exc:
                raise RequestError("invalid", str(exc)) from exc
            stops = [*job.stop, *self.template.stop]
        else:
            prompt = job.prompt or ""
            stops = list(job.stop)
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
        sampler = self._sampler(job)

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
        )
        out: list[FromRunner] = [Started(id=job.id, prompt_tokens=len(tokens))]
        if job.echo:
            out.append(Delta(id=job.id, text=prompt, tokens=0))
        return out

    def _sampler(self, job: Generate) -> Any:
        """A sampler chain for one request (the caller frees it); RequestError for bad parameters."""
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        sampling = job.sampling
        bad = [t for t in sampling.logit_bias if not 0 <= t < self.n_vocab]
        if bad:
            raise RequestError(
                "invalid", f"logit_bias names token {bad[0]}, outside this model's vocabulary", "logit_bias"
            )
        gbnf = None
        try:
            if job.json_schema is not None:
                gbnf = json_grammar(job.json_schema)
            elif job.grammar is not None:
                gbnf = job.grammar
            if gbnf is not None:
                # llama-cpp-python's parser explains what is wrong; llama.cpp's only refuses.
                LlamaGrammar.from_string(gbnf, verbose=False)
        except Exception as exc:
            raise RequestError(
                "invalid", f"response_format could not be turned into a grammar: {exc}", "response_format"
            ) from exc

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        parts = []
        if sampling.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))()
            for i, (token, value) in enumerate(sampling.logit_bias.items()):
                biases[i] = llama_cpp.llama_logit_bias(token, value)
            parts.append(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        if sampling.repeat_penalty != 1.0 or sampling.frequency_penalty or sampling.presence_penalty:
            # The binding declares an n_vocab argument that llama.cpp no longer takes; the
            # window size passed twice is right whichever of the two the library reads.
            parts.append(
                llama_cpp.llama_sampler_init_penalties(
                    PENALTY_WINDOW,
                    PENALTY_WINDOW,
                    sampling.repeat_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        if gbnf is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
            if not grammar:
                for part in parts:
                    llama_cpp.llama_sampler_free(part)
                llama_cpp.llama_sampler_free(chain)
                raise RequestError("invalid", "response_format could not be turned into a grammar", "response_format")
            parts.append(grammar)
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**31)
        if sampling.temperature == 0:
            parts.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.temperature > 0:
                parts.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
                parts.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
                parts.append(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
                parts.append(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            parts.append(llama_cpp.llama_sampler_init_dist(seed))
        for part in parts:
            llama_cpp.llama_sampler_chain_add(chain, part)
        return chain

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
        status = llama_cpp.llama_decode(self.ctx, batch)
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
        job_id = sequence.job.id
        token = llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, index)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._flush(slot, "stop")
        sequence.generated += 1
        sequence.unsent += 1
        text, hit = sequence.matcher.feed(sequence.decoder.decode(self.model.detokenize([token])))
        out: list[FromRunner] = []
        if text:
            out.append(Delta(id=job_id, text=text, tokens=sequence.unsent))
            sequence.unsent = 0
        if hit:
            return [*out, *self._flush(slot, "stop")]
        if sequence.generated >= sequence.max_tokens:
            return [*out, *self._flush(slot, "length")]
        sequence.next_token = token
        return out

    def _flush(self, slot: Slot, reason: Literal["stop", "length"]) -> list[FromRunner]:
        sequence = slot.sequence
        assert sequence is not None
        out: list[FromRunner] = []
        tail = sequence.matcher.flush() + sequence.decoder.decode(b"", final=True)
        if tail:
            out.append(Delta(id=sequence.job.id, text=tail, tokens=sequence.unsent))
        out.append(self._finish(slot, reason))
        return out

    def _finish(self, slot: Slot, reason: Literal["stop", "length", "cancelled"]) -> Done:
        sequence = slot.sequence
        assert sequence is not None
        self._release(slot)
        return Done(
            id=sequence.job.id,
            finish_reason=reason,
            prompt_tokens=len(sequence.tokens),
            completion_tokens=sequence.generated,
            cached_tokens=sequence.cached,
        )

    def _release(self, slot: Slot) -> None:
        import llama_cpp

        sequence = slot.sequence
        assert sequence is not None
        llama_cpp.llama_sampler_free(sequence.sampler)
        slot.sequence = None

    def embed(self, job: Embed) -> Embeddings:
        embedder = self._embedding_model()
        n_ctx = embedder.n_ctx()
        counts = [len(embedder.tokenize(text.encode(), add_bos=True, special=True)) for text in job.inputs]
        for index, count in enumerate(counts):
            if count == 0:
                # llama-cpp-python's embed() fails to decode an empty sequence and can corrupt its heap.
                raise RequestError("invalid", f"input[{index}] has no tokens for this model.", "input")
            if count > n_ctx:
                raise RequestError(
                    "context_length",
                    f"input[{index}] has {count} tokens; this model embeds at most {n_ctx} tokens at once",
                )
        vectors = embedder.embed(job.inputs, normalize=True, truncate=False)
        return Embeddings(id=job.id, vectors=[list(map(float, v)) for v in vectors], prompt_tokens=sum(counts))

    def _embedding_model(self) -> Llama:
        # llama.cpp computes either logits or embeddings per context, so embeddings
        # get their own context over the same file (mmap shares the weights).
        if self._embedder is None:
            import llama_cpp
            from llama_cpp import Llama

            metadata = self.metadata
            arch = metadata.get("general.architecture", "")
            has_pooling = f"{arch}.pooling_type" in metadata
            n_ctx = self.n_ctx
            self._embedder = Llama(
                model_path=self.load.model_path,
                embedding=True,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=self.load.threads,
                n_threads_batch=self.load.threads,
                n_gpu_layers=self.load.gpu_layers,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
                if has_pooling
                else llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
            )
        return self._embedder


class Channel:
    """The runner's end of the pipe: framed writes to the saved stdout."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.lock = threading.Lock()

    def send(self, message: FromRunner) -> None:
        data = protocol.encode(message)
        with self.lock:
            self.out.write(data)
            self.out.flush()


def main() -> int:
    """Entry point of ``locopilot _runner``; returns the exit status."""
    # Ctrl-C at a terminal reaches the whole process group; the server drains its requests
    # and then ends this runner by closing stdin, so the runner must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = Channel(out)
    stdin = sys.stdin.buffer

    body = protocol.read_frame_sync(stdin)
    if body is None:
        return 0
    load = protocol.decode_to_runner(body)
    if not isinstance(load, Load):
        channel.send(LoadFailed(message=f"expected a load message, got {type(load).__name__}"))
        return 2
    try:
        engine = Engine(load)
    except (ValueError, RuntimeError, OSError) as exc:
        # llama-cpp-python raises ValueError for a file llama.cpp cannot load.
        channel.send(LoadFailed(message=f"{type(exc).__name__}: {exc}"))
        return 1
    channel.send(engine.ready())

    jobs: queue.Queue[Generate | Embed | None] = queue.Queue()
    cancellations = Cancellations()

    def read_requests() -> None:
        try:
            while (frame := protocol.read_frame_sync(stdin)) is not None:
                match protocol.decode_to_runner(frame):
                    case Cancel(id=job_id):
                        cancellations.cancel(job_id)
                    case Generate() | Embed() as job:
                        cancellations.begin(job.id)
                        jobs.put(job)
                    case Load():
                        log.warning("ignoring a second load message")
        finally:
            cancellations.close()
            jobs.put(None)

    threading.Thread(target=read_requests, name="runner-reader", daemon=True).start()
    serve(engine, jobs, channel, cancellations)
    return 0


def serve(
    engine: Engine,
    jobs: queue.Queue[Generate | Embed | None],
    channel: Channel,
    cancellations: Cancellations,
) -> None:
    """The scheduling loop (continuous batching) until ``jobs`` yields None.

    Between decode steps it takes new jobs, ends cancelled sequences and admits
    waiting jobs to free slots; each step then advances every active sequence.
    An embedding request runs whole between two steps.
    """
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
                    embed_one(engine, job, channel, cancellations)
                else:
                    waiting.append(job)
                job = jobs.get_nowait()
        except queue.Empty:
            pass
        for message in engine.cancel(cancellations.__contains__):
            send_final(channel, message, cancellations)
        for job in [j for j in waiting if j.id in cancellations]:
            waiting.remove(job)
            send_final(
                channel, Done(id=job.id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0), cancellations
            )
        while waiting and engine.free_slot() is not None:
            job = waiting.popleft()
            try:
                for message in engine.start(job):
                    channel.send(message)
            except RequestError as exc:
                send_final(channel, Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param), cancellations)
            except (BrokenPipeError, ProtocolError):
                raise
            except Exception as exc:
                log.exception("request %s failed", job.id)
                failed = Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}")
                send_final(channel, failed, cancellations)
        for message in engine.step():
            send_final(channel, message, cancellations)


def send_final(channel: Channel, message: FromRunner, cancellations: Cancellations) -> None:
    """Send ``message``; a terminal one also ends its job's cancellation record."""
    channel.send(message)
    if isinstance(message, Done | Failed | Embeddings):
        cancellations.finish(message.id)


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


def embed_one(engine: Engine, job: Embed, channel: Channel, cancelled: Cancellations) -> None:
    message: FromRunner
    try:
        if job.id in cancelled:
            message = Done(id=job.id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0)
        else:
            message = engine.embed(job)
    except RequestError as exc:
        message = Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param)
    except (BrokenPipeError, ProtocolError):
        raise
    except Exception as exc:
        log.exception("request %s failed", job.id)
        message = Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}")
    send_final(channel, message, cancelled)
