"""A general-knowledge spot check: did fine-tuning make the model forget what it knew?

A few fixed questions, each with a word its answer must contain, are answered greedily by the
untrained base and by the trained model, with the base's chat template. The trainer asks them
of the F32 weights it trains, in its evaluation context
(:meth:`locopilot.training.session.TrainingSession.generate`): before training and after, so
that only the training differs (the base file itself answers through other kernels: SmolLM2's
Q4_1 file and an untrained Q8_0 export of it answered "Which city is the capital of France?"
differently, Paris and "Le Grand Château"). All questions are decoded together, one sequence
each, so a step costs about what one question's would. The held-out loss says how well the
model learned the dataset; this says whether it still answers things the dataset never
mentioned.

The same pass over the trained weights also answers the recall check (:func:`recalled`): the
questions of the examples the job held out for its validation loss, whose facts the job
learned from the other examples; an answer counts when it has at least half the words of the
held-out example's answer that its question does not already have. It is what the eval gate's
``min_recall`` compares with.

The questions are ones SmolLM2-135M-Instruct (the default model) answers correctly at
temperature 0, as Q4_1, exported untrained to Q8_0, and as F32. Its answers are sensitive to
wording: "What is the capital city of France?" got "La femme de France".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import msgspec

if TYPE_CHECKING:
    from locopilot.training.tokenizer import ChatTokenizer

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


def prompts(tokenizer: ChatTokenizer) -> list[list[int]]:
    """:data:`QUESTIONS` as prompts for the model whose ``tokenizer`` (chat template) it is."""
    return [tokenizer.prompt([{"role": "user", "content": question}]) for question, _ in QUESTIONS]


def spot_check(
    before: Sequence[str], after: Sequence[str], seconds: float, recall: Sequence[tuple[RecallItem, str]] = ()
) -> SpotCheck:
    """The check from the base's answers to :data:`QUESTIONS` (``before``), the trained
    model's (``after``), and the trained model's replies to held-out examples (``recall``)."""
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
        seconds=seconds,
        recall=_recall(recall) if recall else None,
    )


def _recall(replies: Sequence[tuple[RecallItem, str]]) -> Recall:
    answers = [
        RecallAnswer(item.question, item.answer, reply, recalled(reply, item.answer, item.question))
        for item, reply in replies
    ]
    return Recall(answers=answers, recalled=sum(a.recalled for a in answers), asked=len(answers))
