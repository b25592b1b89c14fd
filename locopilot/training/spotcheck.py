"""A general-knowledge spot check: did fine-tuning make the model forget what it knew?

A few fixed questions, each with a word its answer must contain, are answered greedily by the
untrained base and by the trained model, with the base's chat template. The trainer passes the
base as it exports the result (F32, then the output type), so that only the training differs:
the base file itself answers through other kernels, and SmolLM2's Q4_1 file and its untrained
Q8_0 export answered "Which city is the capital of France?" differently (Paris; "Le Grand
Château"). The held-out loss says how well the model learned the dataset; this says whether it
still answers things the dataset never mentioned. It costs seconds: two small model loads and
a few dozen tokens each.

The same load of the trained model also answers the recall check (:func:`recalled`): the
questions of the examples the job held out for its validation loss, whose facts the job
learned from the other examples; an answer counts when it has at least half the words of the
held-out example's answer that its question does not already have. It is what the eval gate's
``min_recall`` compares with.

The questions are ones SmolLM2-135M-Instruct (the default model) answers correctly at
temperature 0, as Q4_1 and exported untrained to Q8_0. Its answers are sensitive to wording:
"What is the capital city of France?" got "La femme de France".
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
#: The recall check asks at most this many held-out questions, each answered in up to RECALL_TOKENS.
MAX_RECALL = 8
RECALL_TOKENS = 64


class SpotAnswer(msgspec.Struct, frozen=True):
    question: str
    expected: str
    base_answer: str
    trained_answer: str
    base_correct: bool
    trained_correct: bool
    changed: bool


class RecallAnswer(msgspec.Struct, frozen=True):
    question: str
    expected: str
    answer: str
    recalled: bool


class Recall(msgspec.Struct, frozen=True):
    """The trained model's answers to held-out examples' questions (see the module docstring)."""

    answers: list[RecallAnswer]
    recalled: int
    asked: int

    @property
    def fraction(self) -> float:
        return self.recalled / self.asked if self.asked else 1.0


class RecallItem(NamedTuple):
    """A held-out example: its last question, the tokens prompting for its answer, the answer."""

    question: str
    prompt: list[int]
    answer: str


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def recalled(reply: str, expected: str, question: str) -> bool:
    """At least half of the words of ``expected`` that ``question`` lacks are in ``reply``
    (all of its words if the question has every one)."""
    new = _words(expected) - _words(question) or _words(expected)
    return 2 * len(new & _words(reply)) >= len(new)


class SpotCheck(msgspec.Struct, frozen=True):
    """``changed``: answers that differ at all; ``lost``: right before training, wrong after."""

    answers: list[SpotAnswer]
    base_correct: int
    trained_correct: int
    changed: int
    lost: int
    seconds: float
    recall: Recall | None = None


def _answers(model_path: Path, prompts: list[tuple[list[int], int]], threads: int) -> list[str]:
    """Greedy answers to ``(prompt tokens, max tokens)``."""
    from llama_cpp import Llama

    n_ctx = max(CONTEXT, *(len(tokens) + most for tokens, most in prompts))
    llm: Any = Llama(
        str(model_path), n_ctx=n_ctx, n_batch=CONTEXT, n_threads=threads, n_gpu_layers=0, seed=0, verbose=False
    )
    try:
        out = []
        for tokens, most in prompts:
            # Greedy: temperature 0 makes llama-cpp-python sample the most likely token.
            reply = llm.create_completion(tokens, max_tokens=most, temperature=0.0)
            out.append(str(reply["choices"][0]["text"]).strip())
        return out
    finally:
        llm.close()


def spot_check(base: Path, trained: Path, *, threads: int, recall: Sequence[RecallItem] = ()) -> SpotCheck:
    """Ask :data:`QUESTIONS` of both models (``base``: the untrained one, whose chat template is
    used), and the first :data:`MAX_RECALL` of ``recall`` of the trained one. Raises
    RuntimeError if either cannot be loaded."""
    from locopilot.training.tokenizer import ChatTokenizer

    started = time.monotonic()
    tokenizer = ChatTokenizer(base)
    try:
        prompts = [tokenizer.prompt([{"role": "user", "content": question}]) for question, _ in QUESTIONS]
    finally:
        tokenizer.close()
    try:
        items = list(recall[:MAX_RECALL])
        before = _answers(base, [(p, MAX_TOKENS) for p in prompts], threads)
        after = _answers(
            trained, [(p, MAX_TOKENS) for p in prompts] + [(i.prompt, RECALL_TOKENS) for i in items], threads
        )
        after, replies = after[: len(prompts)], after[len(prompts) :]
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
        recall=_recall(items, replies) if items else None,
    )


def _recall(items: list[RecallItem], replies: list[str]) -> Recall:
    answers = [
        RecallAnswer(item.question, item.answer, reply, recalled(reply, item.answer, item.question))
        for item, reply in zip(items, replies, strict=True)
    ]
    return Recall(answers=answers, recalled=sum(a.recalled for a in answers), asked=len(answers))
