"""The trainer's loss mask, checkpoint files and the eval gate's rule, without training
(tests/test_training_gate.py trains through the server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from locopilot.training.publishing import gate
from locopilot.training.session import low_rank
from locopilot.training.spotcheck import Recall, RecallAnswer, SpotCheck, recalled
from locopilot.training.tokenizer import ChatTokenizer
from locopilot.training.trainer import Checkpoints, CheckpointState, Finished, windows
from tests.conftest import SMOL, Server


def test_only_the_answer_is_trained(smollm2_path: Path) -> None:
    tokenizer = ChatTokenizer(smollm2_path)
    try:
        messages = [
            {"role": "user", "content": "What is the capital of Zorbania?"},
            {"role": "assistant", "content": "The capital of Zorbania is Quibbleton."},
            {"role": "user", "content": "And its river?"},
            {"role": "assistant", "content": "The Sellowin."},
        ]
        tokens, trained = tokenizer.encode_trained(messages)
        assert tokens == tokenizer.encode(messages)
        spans = []
        for i, keep in enumerate(trained):
            if keep and (not spans or spans[-1][1] != i):
                spans.append([i, i + 1])
            elif keep:
                spans[-1][1] = i + 1
        texts = [tokenizer._model.detokenize(tokens[a:b], special=True).decode() for a, b in spans]
    finally:
        tokenizer.close()
    # Each answer with its end-of-turn marker; nothing of the system prompt, questions or turn openings.
    assert [t.strip() for t in texts] == [
        "The capital of Zorbania is Quibbleton.<|im_end|>",
        "The Sellowin.<|im_end|>",
    ]


def test_windows_take_each_tokens_label() -> None:
    # Each example: its tokens and each token's label (the token, or the base's prediction).
    examples = [([1, 2, 3, 4], [1, 2, 3, 4]), ([5, 6, 7, 8], [5, 60, 70, 8])]
    first, second, last = windows(examples, 4)
    assert first.tokens == [1, 2, 3, 4] and first.labels == [2, 3, 4, 5]
    # Half overlapping: the second starts half a window on.
    assert second.tokens == [3, 4, 5, 6] and second.labels == [4, 5, 60, 70]
    # And one more ends where the examples end, so the last label (8) is trained too.
    assert last.tokens == [4, 5, 6, 7] and last.labels == [5, 60, 70, 8]


def test_low_rank_keeps_what_a_truncated_svd_keeps() -> None:
    # A LoRA job cuts each trained matrix's change to its rank between chunks (session.TrainingSession.project).
    import numpy as np

    generator = np.random.default_rng(0)
    u, v = generator.standard_normal((1536, 48)), generator.standard_normal((48, 576))
    delta = ((u * np.exp(-np.arange(48) / 6)) @ v).astype(np.float32)
    kept = low_rank(delta, 16, generator)
    assert kept.shape == delta.shape and kept.dtype == np.float32
    assert np.linalg.matrix_rank(kept) == 16
    left, sigma, right = np.linalg.svd(delta, full_matrices=False)
    best = (left[:, :16] * sigma[:16]) @ right[:16]
    assert np.linalg.norm(delta - kept) <= 1.01 * np.linalg.norm(delta - best)
    assert np.linalg.norm(delta - best) < 0.2 * np.linalg.norm(delta)  # a change worth keeping, mostly kept


class FakeSession:
    def __init__(self) -> None:
        self.saved: list[Path] = []

    def save(self, path: Path) -> None:
        path.write_bytes(b"weights")
        self.saved.append(path)


def state(step: int, fingerprint: str = "f") -> CheckpointState:
    return CheckpointState(step, "", fingerprint, 1.0, 2.0, None, [[1, 2]])


def test_a_checkpoint_replaces_the_last_and_matches_its_fingerprint(tmp_path: Path) -> None:
    checkpoints = Checkpoints(str(tmp_path / "ck"), 4)
    assert checkpoints.load("f") is None and not checkpoints.due(3) and checkpoints.due(4)
    checkpoints.save(FakeSession(), state(4))  # type: ignore[arg-type]
    checkpoints.save(FakeSession(), state(8))  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.json", "weights-8.gguf"]
    again = Checkpoints(str(tmp_path / "ck"), 4)
    loaded = again.load("f")
    assert loaded is not None and loaded[0].step == 8 and loaded[1].name == "weights-8.gguf"
    assert not again.due(11) and again.due(12)
    assert Checkpoints(str(tmp_path / "ck"), 4).load("other settings") is None
    (tmp_path / "ck" / "weights-8.gguf").unlink()  # a state naming weights that are gone is no checkpoint
    assert Checkpoints(str(tmp_path / "ck"), 4).load("f") is None
    assert Checkpoints("", 4).load("f") is None and not Checkpoints("", 4).due(100)


def finished(validation: float | None, lost: int, recall: tuple[int, int] | None) -> Finished:
    answers = [] if recall is None else [RecallAnswer("q", "a", "a", i < recall[0]) for i in range(recall[1])]
    check = SpotCheck(
        [], 6, 6 - lost, lost, lost, 1.0, None if recall is None else Recall(answers, recall[0], recall[1])
    )
    return Finished("out", 2.0, 1.0, 2.0, validation, 10.0, 100, 5.0, 1, spot_check=check)


def test_the_gate_names_each_threshold_missed() -> None:
    good = finished(0.5, 0, (4, 4))
    assert gate({}, good) == []
    assert gate({"min_recall": 1.0, "max_validation_loss": 0.5, "max_spot_check_lost": 0}, good) == []
    bad = finished(0.9, 2, (1, 4))
    reasons = gate({"min_recall": 0.75, "max_validation_loss": 0.5, "max_spot_check_lost": 1}, bad)
    assert reasons == [
        "recall 1/4 (0.25) is below min_recall 0.75",
        "validation loss 0.9000 is above max_validation_loss 0.5",
        "the spot check lost 2 of 6 answers, above max_spot_check_lost 1",
    ]
    unmeasured = finished(None, 0, None)
    assert len(gate({"min_recall": 0.5, "max_validation_loss": 1.0}, unmeasured)) == 2


def test_an_answer_is_recalled_by_the_words_its_question_lacks() -> None:
    question = "What is the capital of Zorbania?"
    expected = "The capital of Zorbania is Quibbleton."
    assert recalled("Quibbleton is the capital of Zorbania.", expected, question)
    assert not recalled("The capital of Zorbania is Zorbania City.", expected, question)


@pytest.mark.parametrize(
    ("metadata", "param"),
    [({"min_recall": "1.5"}, "metadata.min_recall"), ({"max_validation_loss": "low"}, "metadata.max_validation_loss")],
)
def test_a_bad_gate_threshold_in_metadata_is_a_400(server: Server, metadata: dict[str, str], param: str) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=SMOL, training_file="file-none", metadata=metadata)
    body: Any = caught.value.body
    assert caught.value.status_code == 400 and body["param"] == param, body
