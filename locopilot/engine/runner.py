"""The runner: a child process that owns one loaded model.

Started by the API process as ``locopilot _runner`` (the same executable), it
reads framed ``ToRunner`` messages on stdin and writes ``FromRunner`` messages
on stdout (see protocol.py). The first message is ``Load``; the runner answers
``Ready`` or ``LoadFailed``. A llama.cpp crash kills only this process; the API
process sees end-of-stream and fails the requests it had in flight.

Requests run one at a time in arrival order; ``Cancel`` is read by a separate
thread and checked between tokens, so a cancelled generation stops within a
token. stdout is reserved for frames: anything llama.cpp or Python prints to
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
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

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


class Engine:
    """One model in llama.cpp. Not thread-safe: the runner's main thread owns it."""

    def __init__(self, load: Load) -> None:
        from llama_cpp import Llama

        if not load_backends():
            raise RuntimeError("llama.cpp found no usable backend for this CPU")
        self.load = load
        self.llama: Llama = Llama(
            model_path=load.model_path,
            n_ctx=load.ctx_size,
            n_batch=512,
            n_threads=load.threads,
            n_threads_batch=load.threads,
            n_gpu_layers=load.gpu_layers,
            verbose=False,
        )
        self._embedder: Llama | None = None
        metadata = self.llama.metadata
        self.template = choose_template(metadata)
        model = self.llama._model
        bos, eos = self.llama.token_bos(), self.llama.token_eos()
        self.renderer = TemplateRenderer(
            self.template,
            bos_token=model.token_get_text(bos) if bos >= 0 else "",
            eos_token=model.token_get_text(eos) if eos >= 0 else "",
        )
        self.add_bos = bos >= 0 and metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"

    def ready(self) -> Ready:
        return Ready(
            n_ctx=self.llama.n_ctx(),
            n_ctx_train=self.llama._model.n_ctx_train(),
            n_vocab=self.llama.n_vocab(),
            template=self.template.name,
            pid=os.getpid(),
        )

    def tokenize(self, text: str) -> list[int]:
        tokens = self.llama.tokenize(text.encode(), add_bos=False, special=True)
        if self.add_bos and (not tokens or tokens[0] != self.llama.token_bos()):
            tokens.insert(0, self.llama.token_bos())
        return tokens

    def generate(self, job: Generate, cancelled: Callable[[], bool]) -> Iterator[FromRunner]:
        """Yield Started, Deltas and one Done; raise RequestError before Started."""
        import llama_cpp
        from llama_cpp import LogitsProcessorList
        from llama_cpp.llama_grammar import LlamaGrammar

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
        n_ctx = self.llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise RequestError(
                "context_length",
                f"This model's context length is {n_ctx} tokens, but the prompt has {len(tokens)} tokens. "
                "Shorten the prompt or raise LOCOPILOT_CTX_SIZE.",
            )
        budget = n_ctx - len(tokens)
        max_tokens = min(job.max_tokens, budget) if job.max_tokens else budget

        grammar = None
        try:
            if job.json_schema is not None:
                grammar = LlamaGrammar.from_string(json_grammar(job.json_schema), verbose=False)
            elif job.grammar is not None:
                grammar = LlamaGrammar.from_string(job.grammar, verbose=False)
        except Exception as exc:
            raise RequestError(
                "invalid", f"response_format could not be turned into a grammar: {exc}", "response_format"
            ) from exc

        sampling = job.sampling
        n_vocab = self.llama.n_vocab()
        bad = [t for t in sampling.logit_bias if not 0 <= t < n_vocab]
        if bad:
            raise RequestError(
                "invalid", f"logit_bias names token {bad[0]}, outside this model's vocabulary", "logit_bias"
            )
        processors = None
        if sampling.logit_bias:
            ids = np.array(list(sampling.logit_bias), dtype=np.intc)
            biases = np.array(list(sampling.logit_bias.values()), dtype=np.single)

            def bias(_input_ids: Any, scores: Any) -> Any:
                scores[ids] += biases
                return scores

            processors = LogitsProcessorList([bias])

        self.llama.set_seed(sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**31))
        yield Started(id=job.id, prompt_tokens=len(tokens))
        if job.echo:
            yield Delta(id=job.id, text=prompt, tokens=0)

        vocab = self.llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = StopMatcher(stops)
        generated = 0
        unsent = 0
        finish: Literal["stop", "length", "cancelled"] = "length"
        for token in self.llama.generate(
            tokens,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            logits_processor=processors,
            grammar=grammar,
        ):
            if cancelled():
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            generated += 1
            unsent += 1
            text, hit = matcher.feed(decoder.decode(self.llama.detokenize([token])))
            if text:
                yield Delta(id=job.id, text=text, tokens=unsent)
                unsent = 0
            if hit:
                finish = "stop"
                break
            if generated >= max_tokens:
                break
        if finish != "cancelled":
            tail = matcher.flush() + decoder.decode(b"", final=True)
            if tail:
                yield Delta(id=job.id, text=tail, tokens=unsent)
        yield Done(id=job.id, finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=generated)

    def embed(self, job: Embed) -> Embeddings:
        embedder = self._embedding_model()
        n_ctx = embedder.n_ctx()
        counts = [len(embedder.tokenize(text.encode(), add_bos=True, special=True)) for text in job.inputs]
        for index, count in enumerate(counts):
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

            metadata = self.llama.metadata
            arch = metadata.get("general.architecture", "")
            has_pooling = f"{arch}.pooling_type" in metadata
            n_ctx = self.llama.n_ctx()
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
                        jobs.put(job)
                    case Load():
                        log.warning("ignoring a second load message")
        finally:
            cancellations.close()
            jobs.put(None)

    threading.Thread(target=read_requests, name="runner-reader", daemon=True).start()
    while (job := jobs.get()) is not None:
        serve_one(engine, job, channel, cancellations)
    return 0


class Cancellations:
    """Which jobs to stop, written by the reader thread and read between tokens.

    Job ids grow and jobs run in order, so a Cancel for a job already finished
    is dropped instead of kept forever. Once stdin ends (the API process is
    gone) every job counts as cancelled.
    """

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._finished_up_to = 0
        self._closed = False
        self._lock = threading.Lock()

    def cancel(self, job_id: int) -> None:
        with self._lock:
            if job_id > self._finished_up_to:
                self._ids.add(job_id)

    def close(self) -> None:
        self._closed = True

    def __contains__(self, job_id: int) -> bool:
        return self._closed or job_id in self._ids

    def finish(self, job_id: int) -> None:
        with self._lock:
            self._ids.discard(job_id)
            self._finished_up_to = max(self._finished_up_to, job_id)


def serve_one(engine: Engine, job: Generate | Embed, channel: Channel, cancelled: Cancellations) -> None:
    job_id = job.id
    try:
        if job_id in cancelled:
            channel.send(Done(id=job_id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0))
            return
        if isinstance(job, Embed):
            channel.send(engine.embed(job))
            return
        for message in engine.generate(job, lambda: job_id in cancelled):
            channel.send(message)
    except RequestError as exc:
        channel.send(Failed(id=job_id, kind=exc.kind, message=str(exc), param=exc.param))
    except (BrokenPipeError, ProtocolError):
        raise
    except Exception as exc:
        log.exception("request %s failed", job_id)
        channel.send(Failed(id=job_id, kind="internal", message=f"{type(exc).__name__}: {exc}"))
    finally:
        cancelled.finish(job_id)
