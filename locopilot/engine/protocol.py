"""Messages between the API process and a runner process.

Frames on the runner's stdin/stdout (:mod:`locopilot.children`), each one message from the
tagged unions below. The API process sends ``ToRunner`` messages and reads ``FromRunner``
ones; every request carries an ``id`` so several can be in flight on one pipe.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from locopilot.children import Codec

# "template": the model's chat template failed (its message is the template's own words).
FailureKind = Literal["context_length", "invalid", "template", "internal"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = {}


def sampling_of(**given: Any) -> SamplingParams:
    """SamplingParams from a front's fields, where a field the request left out (None) keeps
    the default (llama-server's): one place that says what an unset field means."""
    return SamplingParams(**{name: value for name, value in given.items() if value is not None})


# Chat content shared by every front, provider and the runner. The OpenAI, Anthropic,
# Ollama and Responses fronts translate into these; providers translate out of them.


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call the model made: ``arguments`` is the JSON text of an object (valid against the tool's schema)."""

    id: str
    name: str
    arguments: str


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    """A function the model may call; ``parameters`` is a JSON Schema of an object."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    """``auto``: the model decides; ``none``: never a call; ``required``: at least one call;
    ``function``: a call of the tool ``name``."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


class ImagePart(msgspec.Struct, frozen=True, kw_only=True):
    """An image in a message: an ``http(s):`` or ``data:`` URL. Upstreams may take it; the runner refuses it."""

    url: str
    detail: str | None = None


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One chat message. ``tool_calls`` only on an assistant message (whose ``content``
    may then be empty); ``tool_call_id`` on a tool message says which call it answers."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: tuple[ImagePart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """A generated token's log probability, and with ``top`` its most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: tuple[TopLogprob, ...] = ()


# API process → runner


class Load(msgspec.Struct, tag="load", frozen=True, kw_only=True):
    model_path: str
    ctx_size: int
    threads: int
    gpu_layers: int  # -1: as many as the GPUs' free memory holds (engine/offload.py)
    parallel: int = 0  # slots; 0 lets the runner choose from the context size
    decode_threads: int = 0  # for a step of one token (llama.cpp's n_threads); 0: measured (engine/threads.py)
    # A chat template over the model's own (LOCOPILOT_MODEL_SETTINGS chat_template); "" keeps the model's.
    template_name: str = ""
    template_source: str = ""
    template_stop: tuple[str, ...] = ()
    # Prompt caches on disk (engine/kvdisk.py): their folder ("" for none), its size bound, and
    # the fewest tokens a slot's cache must hold to be written.
    prompt_cache_dir: str = ""
    prompt_cache_bytes: int = 0
    prompt_cache_min_tokens: int = 1024
    # A folder of GPU companion libraries (libggml-vulkan.so, ...) besides the binary's own
    # (LOCOPILOT_BACKENDS_DIR); "" for none.
    backends_dir: str = ""


class Generate(msgspec.Struct, tag="generate", frozen=True, kw_only=True):
    """Exactly one of ``prompt`` (text completion) or ``messages`` (chat) is set.

    ``grammar`` is GBNF text; ``json_schema`` is a JSON Schema (as JSON text)
    the runner turns into a grammar. ``max_tokens`` None means until the
    context is full. ``suffix``: fill-in-the-middle around ``prompt``. ``tools``
    and ``tool_choice``: see :class:`ToolChoice`. ``logprobs``: None for none, else
    how many alternatives (0-20) to report beside each token's own. ``n``: that many
    choices of the same prompt. ``adapter``: the path of a GGUF LoRA adapter of this model to
    apply ("" for the model alone); the runner batches together only jobs with the same one.
    """

    id: int
    prompt: str | None = None
    messages: list[Message] | None = None
    suffix: str | None = None
    max_tokens: int | None = None
    stop: list[str] = []
    echo: bool = False
    grammar: str | None = None
    json_schema: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    logprobs: int | None = None
    n: int = 1
    sampling: SamplingParams = SamplingParams()
    adapter: str = ""


class Embed(msgspec.Struct, tag="embed", frozen=True, kw_only=True):
    id: int
    inputs: list[str]


class Count(msgspec.Struct, tag="count", frozen=True, kw_only=True):
    """Render and tokenize ``job``'s prompt as ``Generate`` would, and generate nothing: answered by Counted."""

    id: int
    job: Generate


class Cancel(msgspec.Struct, tag="cancel", frozen=True, kw_only=True):
    id: int


ToRunner = Load | Generate | Embed | Count | Cancel


# runner → API process


class Ready(msgspec.Struct, tag="ready", frozen=True, kw_only=True):
    """``threads``/``threads_batch``: what llama.cpp's context uses for one-token and larger steps;
    ``threads_reason`` says why (``Tuned`` reports a later choice: see engine/threads.py)."""

    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    template: str
    pid: int
    slots: int = 1
    threads: int = 0
    threads_batch: int = 0
    threads_reason: str = ""
    # Layers llama.cpp put on GPUs (0 on a CPU-only machine) and why that many (runner.offload).
    gpu_layers: int = 0
    offload: str = ""


class Tuned(msgspec.Struct, tag="tuned", frozen=True, kw_only=True):
    """The runner now gives one-token steps ``threads`` threads, for ``reason`` (it measured)."""

    threads: int
    reason: str


class LoadFailed(msgspec.Struct, tag="load_failed", frozen=True, kw_only=True):
    message: str


class Started(msgspec.Struct, tag="started", frozen=True, kw_only=True):
    """The prompt fit and generation began (sent before the first Delta)."""

    id: int
    prompt_tokens: int


class Delta(msgspec.Struct, tag="delta", frozen=True, kw_only=True):
    """Text of choice ``index``; ``logprobs`` when the job asked for them, one per token."""

    id: int
    text: str
    tokens: int
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


class CallDelta(msgspec.Struct, tag="call_delta", frozen=True, kw_only=True):
    """Part of a tool call of choice ``index``: the ``call``-th call of the reply. Its first
    part carries ``call_id`` and ``name``; its ``arguments`` (JSON text) may come in pieces."""

    id: int
    call: int
    index: int = 0
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""
    tokens: int = 0


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class Done(msgspec.Struct, tag="done", frozen=True, kw_only=True):
    """``finish_reason`` is choice 0's; with ``n`` > 1, ``reasons`` holds every choice's.
    ``tool_parse_failures``: generated calls that could not be parsed (their text was sent instead)."""

    id: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not computed
    reasons: tuple[FinishReason, ...] = ()
    tool_parse_failures: int = 0
    stop: str | None = None  # the request's stop string that ended choice 0, when one did


class Embeddings(msgspec.Struct, tag="embeddings", frozen=True, kw_only=True):
    id: int
    vectors: list[list[float]]
    prompt_tokens: int
    decodes: int = 0  # llama.cpp decode calls it took (several inputs share one)


class Counted(msgspec.Struct, tag="counted", frozen=True, kw_only=True):
    """The tokens of a Count's prompt, as the model would see it."""

    id: int
    prompt_tokens: int


class Failed(msgspec.Struct, tag="failed", frozen=True, kw_only=True):
    """The runner refused or failed one request; ``param`` names the field at fault, if one is."""

    id: int
    kind: FailureKind
    message: str
    param: str | None = None


FromRunner = Ready | Tuned | LoadFailed | Started | Delta | CallDelta | Done | Embeddings | Counted | Failed


# ``_runner --probe``: one JSON object on stdout


class CpuBackend(msgspec.Struct, frozen=True, kw_only=True):
    """Which of ggml's CPU libraries this CPU got (``runner.cpu_backend``).

    ``library``: its file name; ``variant``: the instruction-set level the portable
    build names it by (``x64``, ``sse42``, ``haswell``, ``zen4``, ...), None for a build
    with a single CPU library; ``features``: what it was compiled for (``AVX2``, ...).
    """

    library: str | None = None
    variant: str | None = None
    features: list[str] = []


class GpuDevice(msgspec.Struct, frozen=True, kw_only=True):
    """A GPU (or other accelerator) ggml registered: ``backend`` is its library's name
    (``Vulkan``, ``CUDA``, ``Metal``), ``name`` ggml's (``Vulkan0``), ``description`` the
    driver's (``NVIDIA GeForce RTX 4090``), memory in bytes as the driver reports it."""

    backend: str
    name: str
    description: str
    memory_free: int
    memory_total: int


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """``gpus``: the accelerators found; ``gpu_note``: why a GPU library found none ("" when
    none was there to try, or it found one)."""

    version: str
    devices: list[str]
    cpu: CpuBackend | None = None
    gpus: list[GpuDevice] = []
    gpu_note: str = ""


probe_decoder = msgspec.json.Decoder(Probe)

to_runner: Codec[ToRunner] = Codec(ToRunner)
from_runner: Codec[FromRunner] = Codec(FromRunner)


class RequestError(Exception):
    """Raised inside the runner for a request it refuses; ``kind`` and ``param`` go into ``Failed``."""

    def __init__(self, kind: FailureKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.param = param
