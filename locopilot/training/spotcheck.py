"""A general-knowledge spot check: did fine-tuning make the model forget what it knew?

A few fixed questions, each with a word its answer must contain, are answered greedily by the
untrained base and by the trained model, with the base's chat template. The trainer passes the
base as it exports the result (F32, then the output type), so that only the training differs:
the base file itself answers through other kernels, and SmolLM2's Q4_1 file and its untrained
Q8_0 export answered "Which city is the capital of France?" differently (Paris; "Le Grand
Château"). The held-out loss says how well the model learned the dataset; this says whether it
still answers things the dataset never mentioned. It costs seconds: two small model loads and
a few dozen tokens each.

The questions are ones SmolLM2-135M-Instruct (the default model) answers correctly at
temperature 0, as Q4_1 and exported untrained to Q8_0. Its answers are sensitive to wording:
"What is the capital city of France?" got "La femme de France".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

#: (question, a word the right answer contains, compared case-insensitively). Each was checked
#: on SmolLM2-135M-Instruct Q4_1 and its untrained Q8_0 export, greedy, 32 tokens; ones either
#: gets wrong, or wrong with the word in the answer, were left out ("Which planet do we live
#: on?": "Kepler-41b, a super-Earth"; "How many legs does a spider have?": 8, then "a spider's legs").
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Paris is the capital of which country?", "France"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the opposite of hot?", "cold"),
    ("What language is spoken in Spain?", "Spanish"),
    ("How many days are in a week?", "7"),
    ("What is the chemical symbol for water?", "H2O"),
)
MAX_TOKENS = 32
CONTEXT = 256


class SpotAnswer(msgspec.Struct, frozen=True):
    question: str
    expected: str
    base_answer: str
    trained_answer: str
    base_correct: bool
    trained_correct: bool
    changed: bool


class SpotCheck(msgspec.Struct, frozen=True):
    """``changed``: answers that differ at all; ``lost``: right before training, wrong after."""

    answers: list[SpotAnswer]
    base_correct: int
    trained_correct: int
    changed: int
    lost: int
    seconds: float


def _answers(model_path: Path, prompts: list[list[int]], threads: int) -> list[str]:
    from llama_cpp import Llama

    llm: Any = Llama(
        str(model_path), n_ctx=CONTEXT, n_batch=CONTEXT, n_threads=threads, n_gpu_layers=0, seed=0, verbose=False
    )
    try:
        out = []
        for tokens in prompts:
            # Greedy: temperature 0 makes llama-cpp-python sample the most likely token.
            reply = llm.create_completion(tokens, max_tokens=MAX_TOKENS, temperature=0.0)
            out.append(str(reply["choices"][0]["text"]).strip())
        return out
    finally:
        llm.close()


def spot_check(base: Path, trained: Path, *, threads: int) -> SpotCheck:
    """Ask :data:`QUESTIONS` of both models (``base``: the untrained one, whose chat template is
    used). Raises RuntimeError if either cannot be loaded."""
    from locopilot.training.tokenizer import ChatTokenizer

    started = time.monotonic()
    tokenizer = ChatTokenizer(base)
    try:
        prompts = [tokenizer.prompt([{"role": "user", "content": question}]) for question, _ in QUESTIONS]
    finally:
        tokenizer.close()
    try:
        before = _answers(base, prompts, threads)
        after = _answers(trained, prompts, threads)
    except ValueError as exc:  # llama-cpp-python raises ValueError when a load fails
        raise RuntimeError(f"the spot check could not load a model: {exc}") from exc
    answers = [
        SpotAnswer(
            question=question,
            expected=expected,
            base_answer=b,
            trained_answer=a,
            base_correct=expected.lower() in b.lower(),
            trained_correct=expected.lower() in a.lower(),
            changed=a != b,
        )
        for (question, expected), b, a in zip(QUESTIONS, before, after, strict=True)
    ]
    return SpotCheck(
        answers=answers,
        base_correct=sum(a.base_correct for a in answers),
        trained_correct=sum(a.trained_correct for a in answers),
        changed=sum(a.changed for a in answers),
        lost=sum(a.base_correct and not a.trained_correct for a in answers),
        seconds=time.monotonic() - started,
    )
