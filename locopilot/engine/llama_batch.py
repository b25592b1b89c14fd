"""One entry of llama.cpp's ``llama_batch``: the runner's decode steps, the embedder and the
trainer's evaluation context all fill the same C arrays, one token at a time."""

from __future__ import annotations

from typing import Any


def put(batch: Any, n: int, token: int, pos: int, seq_id: int, output: bool) -> None:
    """Entry ``n`` of ``batch`` (a ``llama_batch`` made with room for one sequence id a token):
    ``token`` at position ``pos`` of sequence ``seq_id``; ``output``: llama.cpp keeps its logits
    (or, in an embedding context, its embedding)."""
    batch.token[n] = token
    batch.pos[n] = pos
    batch.n_seq_id[n] = 1
    batch.seq_id[n][0] = seq_id
    batch.logits[n] = output
