"""Per-request sampling in the runner: llama.cpp sampler chains, JSON grammars, stop strings, logprobs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from locopilot.engine.protocol import Generate, RequestError, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from locopilot.engine.toolcalls import ToolPlan

PENALTY_WINDOW = 64


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
    was found (text after it is dropped); ``matched`` is then the one found first.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.pending = self.pending[:at], ""
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


def _tool_grammar(vocab: Any, plan: ToolPlan) -> Any:
    """The grammar sampler of a tool plan: lazy (waiting for a trigger) or from the first token."""
    import ctypes

    import llama_cpp

    assert plan.grammar is not None
    if not plan.lazy:
        return llama_cpp.llama_sampler_init_grammar(vocab, plan.grammar.encode(), b"root")
    patterns = (ctypes.c_char_p * max(1, len(plan.trigger_patterns)))(*(p.encode() for p in plan.trigger_patterns))
    tokens = (llama_cpp.llama_token * max(1, len(plan.trigger_tokens)))(*plan.trigger_tokens)
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab,
        plan.grammar.encode(),
        b"root",
        patterns,
        len(plan.trigger_patterns),
        tokens,
        len(plan.trigger_tokens),
    )


def build_sampler(job: Generate, vocab: Any, n_vocab: int, tools: ToolPlan | None = None, choice: int = 0) -> Any:
    """A llama.cpp sampler chain for one choice of a request (the caller frees it); RequestError for bad
    parameters.

    ``tools``: the request's tool plan (:mod:`locopilot.engine.toolcalls`), whose grammar and
    banned tokens join the chain. Choice ``i`` of a seeded request samples with ``seed + i``, so
    choices differ and each is reproducible.
    """
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    sampling = job.sampling
    bad = [t for t in sampling.logit_bias if not 0 <= t < n_vocab]
    if bad:
        raise RequestError("invalid", f"logit_bias names token {bad[0]}, outside this model's vocabulary", "logit_bias")
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

    tool_grammar = tools is not None and tools.grammar is not None
    if tool_grammar and gbnf is not None:
        raise RequestError("invalid", "response_format cannot be combined with tools on this model", "response_format")
    bias = dict(sampling.logit_bias)
    if tools is not None:
        bias.update((token, float("-inf")) for token in tools.banned)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    parts = []
    if bias:
        biases = (llama_cpp.llama_logit_bias * len(bias))()
        for i, (token, value) in enumerate(bias.items()):
            biases[i] = llama_cpp.llama_logit_bias(token, value)
        parts.append(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
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
        grammar = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not grammar:
            for part in parts:
                llama_cpp.llama_sampler_free(part)
            llama_cpp.llama_sampler_free(chain)
            raise RequestError("invalid", "response_format could not be turned into a grammar", "response_format")
        parts.append(grammar)
    if tools is not None and tools.grammar is not None:
        grammar = _tool_grammar(vocab, tools)
        if not grammar:
            for part in parts:
                llama_cpp.llama_sampler_free(part)
            llama_cpp.llama_sampler_free(chain)
            raise RequestError("invalid", "the tools' schemas could not be turned into a grammar", "tools")
        parts.append(grammar)
    # 0xFFFFFFFF is llama.cpp's "pick a random seed": a seed wraps around below it.
    seed = (
        (sampling.seed + choice) % 0xFFFFFFFF if sampling.seed is not None else random.SystemRandom().randrange(2**31)
    )
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


def token_text(piece: bytes) -> str:
    """A token's bytes as text: the part that is whole UTF-8 (a token may end inside a character)."""
    try:
        return piece.decode()
    except UnicodeDecodeError as exc:
        return piece[: exc.start].decode()


def token_logprob(logits: Any, scratch: Any, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log probability at one position, and with ``top`` > 0 the ``top`` likeliest tokens'.

    ``logits`` is llama.cpp's row for the position (``llama_get_logits_ith``: the model's raw
    output, which samplers only ever copy), so this is the model's own distribution, before
    temperature, penalties, biases, grammars and top-k/p cuts, as OpenAI reports it and as
    llama-server does with ``n_probs``. ``scratch`` is a float32 array of the vocabulary's
    size, reused between calls. ``piece`` gives a token's bytes.
    """
    import numpy as np

    n_vocab = scratch.shape[0]
    row = np.ctypeslib.as_array(logits, shape=(n_vocab,))
    peak = row.max()
    np.subtract(row, peak, out=scratch)
    np.exp(scratch, out=scratch)
    log_total = float(peak) + float(np.log(scratch.sum(dtype=np.float64)))
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(row, n_vocab - top)[n_vocab - top :] if top < n_vocab else np.arange(n_vocab)
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = tuple(
            TopLogprob(token=token_text(p), logprob=min(0.0, float(row[t]) - log_total), bytes=list(p))
            for t in best.tolist()
            for p in (piece(t),)
        )
    own = piece(token)
    # Rounding can put a near-certain token a hair above 0.
    return TokenLogprob(
        token=token_text(own), logprob=min(0.0, float(row[token]) - log_total), bytes=list(own), top=alternatives
    )
