"""Embeddings: the inputs of one request share llama.cpp decodes and get the vectors they get alone."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from locopilot.engine.embedding import MAX_SEQUENCES
from tests.conftest import SMOL, Server
from tests.test_engine_lifecycle import runners

WORDS = ["cat", "dog", "bread", "river", "engine", "violin", "winter", "copper", "garden", "thunder"]
INPUTS = [f"{i}: a {WORDS[i % len(WORDS)]}" for i in range(MAX_SEQUENCES + 6)]


def embedding_decodes(server: Server) -> int:
    (smol,) = [runner for runner in runners(server) if runner["model"] == SMOL]
    decodes = smol["embedding_decodes"]
    assert isinstance(decodes, int)
    return decodes


def vectors(client: openai.OpenAI, inputs: list[str]) -> list[list[float]]:
    result = client.embeddings.create(model=SMOL, input=inputs, encoding_format="float")
    assert [item.index for item in result.data] == list(range(len(inputs)))
    return [item.embedding for item in result.data]


def test_many_inputs_in_one_request_share_decodes(server: Server, client: openai.OpenAI) -> None:
    vectors(client, ["warm up"])
    before = embedding_decodes(server)
    batch = vectors(client, INPUTS[:MAX_SEQUENCES])
    assert embedding_decodes(server) - before == 1
    assert len({tuple(v) for v in batch}) == len(batch)  # distinct inputs, distinct vectors

    # One more input than a decode holds: two decodes, and the order still holds across them.
    before = embedding_decodes(server)
    spilled = vectors(client, INPUTS)
    assert embedding_decodes(server) - before == 2
    for got, want in zip(spilled, batch, strict=False):
        assert got == pytest.approx(want, abs=1e-4)
    last = vectors(client, INPUTS[-1:])[0]
    assert spilled[-1] == pytest.approx(last, abs=1e-4)


def test_batched_vectors_are_the_one_at_a_time_vectors(client: openai.OpenAI, smollm2_path: Path) -> None:
    """Against each input embedded alone, here and by llama-cpp-python's own ``Llama.embed`` (the
    implementation locopilot used before batching), which must run in this process to be compared."""
    import llama_cpp

    from locopilot.engine.runner import load_backends

    inputs = INPUTS[:6]
    together = vectors(client, inputs)
    alone = [vectors(client, [text])[0] for text in inputs]
    load_backends()
    reference = llama_cpp.Llama(
        model_path=str(smollm2_path),
        embedding=True,
        n_ctx=2048,  # the test server's LOCOPILOT_CTX_SIZE
        n_batch=2048,
        n_ubatch=2048,
        n_threads=2,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )
    try:
        for text, got, single in zip(inputs, together, alone, strict=True):
            assert got == pytest.approx(single, abs=1e-4)
            want = reference.embed([text], normalize=True, truncate=False)[0]
            assert got == pytest.approx(want, abs=1e-4)
    finally:
        reference.close()
