"""Embeddings in the runner: many inputs pooled in one llama.cpp decode.

llama.cpp computes either logits or embeddings per context, so embeddings get a
context of their own over the runner's already loaded model (no second copy of
the weights). Each input is one sequence id in a shared batch; a decode fills
the batch with as many whole inputs as fit (``n_ctx`` tokens, ``MAX_SEQUENCES``
inputs), and llama.cpp pools each sequence's token vectors into one.
"""

from __future__ import annotations

import math
from typing import Any

from locopilot.engine.llama_batch import put
from locopilot.engine.protocol import RequestError

MAX_SEQUENCES = 64
"""Inputs per decode; llama.cpp allows 256, and more only adds bookkeeping once the batch is full of tokens."""


class Embedder:
    """Pooled, L2-normalised embeddings for one loaded model. Not thread-safe.

    The context is made on first use, so a runner that only generates never
    allocates it. ``decodes`` counts llama.cpp decode calls (engine health shows it).
    """

    def __init__(self, model: Any, metadata: dict[str, str], n_ctx: int, threads: int) -> None:
        self.model = model  # llama_cpp._internals.LlamaModel, owned by the Engine
        self.metadata = metadata
        self.n_ctx = n_ctx
        self.threads = threads
        self.decodes = 0
        self._context: Any = None
        self._batch: Any = None

    def tokenize(self, inputs: list[str]) -> list[list[int]]:
        """Tokens of each input, the way llama-cpp-python's ``Llama.embed`` made them (BOS if the
        model wants one, special-token text left as text); RequestError for one that cannot fit."""
        tokenized: list[list[int]] = []
        for index, text in enumerate(inputs):
            tokens: list[int] = self.model.tokenize(text.encode(), add_bos=True, special=False)
            if not tokens:
                # An empty sequence cannot be decoded (llama-cpp-python's embed() failed and could corrupt its heap).
                raise RequestError("invalid", f"input[{index}] has no tokens for this model.", "input")
            if len(tokens) > self.n_ctx:
                raise RequestError(
                    "context_length",
                    f"input[{index}] has {len(tokens)} tokens; this model embeds at most {self.n_ctx} tokens at once",
                )
            tokenized.append(tokens)
        return tokenized

    def embed(self, tokenized: list[list[int]]) -> list[list[float]]:
        """One vector per input, in order; each fits (see :meth:`tokenize`)."""
        vectors: list[list[float]] = []
        group: list[list[int]] = []
        size = 0
        for tokens in tokenized:
            if group and (size + len(tokens) > self.n_ctx or len(group) == MAX_SEQUENCES):
                vectors += self._decode(group)
                group, size = [], 0
            group.append(tokens)
            size += len(tokens)
        if group:
            vectors += self._decode(group)
        return vectors

    def _decode(self, group: list[list[int]]) -> list[list[float]]:
        import llama_cpp

        ctx = self._ensure_context()
        memory = llama_cpp.llama_get_memory(ctx)
        if memory:  # an encoder-only model (BERT) keeps no KV cache
            llama_cpp.llama_memory_clear(memory, True)
        batch = self._batch
        n = 0
        for seq_id, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                # Every token is an output: pooling reads them all, and llama.cpp warns
                # (and overrides) when an embedding batch marks fewer.
                put(batch, n, token, pos, seq_id, True)
                n += 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(ctx, batch)
        self.decodes += 1
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for {len(group)} inputs")
        n_embd = self.model.n_embd()
        vectors = []
        for seq_id in range(len(group)):
            pooled = llama_cpp.llama_get_embeddings_seq(ctx, seq_id)
            if not pooled:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            vectors.append(_normalized(pooled[:n_embd]))
        return vectors

    def _ensure_context(self) -> Any:
        if self._context is None:
            import llama_cpp
            from llama_cpp import _internals as internals

            arch = self.metadata.get("general.architecture", "")
            params = llama_cpp.llama_context_default_params()
            params.embeddings = True
            # A model that declares its pooling keeps it; a generative model is mean-pooled.
            has_pooling = f"{arch}.pooling_type" in self.metadata
            params.pooling_type = (
                llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if has_pooling else llama_cpp.LLAMA_POOLING_TYPE_MEAN
            )
            params.n_ctx = self.n_ctx
            # A non-causal model must see each input whole in one micro-batch.
            params.n_batch = params.n_ubatch = self.n_ctx
            params.n_seq_max = min(MAX_SEQUENCES, llama_cpp.llama_max_parallel_sequences())
            # One pool of n_ctx cells for all sequences of a decode (cleared before each);
            # the attention mask keeps each input to itself.
            params.kv_unified = True
            # Flash attention off, as llama-cpp-python's Llama (which embedded before) has it:
            # llama.cpp's default turns it on for CPUs, and vectors then move by ~6e-3.
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.n_threads = params.n_threads_batch = self.threads
            context: Any = internals.LlamaContext(model=self.model, params=params, verbose=False)
            if llama_cpp.llama_pooling_type(context.ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                context.close()
                raise RequestError("invalid", "this model's embeddings are per token, not pooled", "model")
            self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
            self._context = context
        return self._context.ctx


def _normalized(vector: list[float]) -> list[float]:
    """``vector`` / its L2 norm, as llama-cpp-python's ``normalize_embedding`` (a zero vector stays)."""
    norm = math.sqrt(math.fsum(v * v for v in vector))
    return [float(v) for v in vector] if norm == 0.0 else [v / norm for v in vector]
