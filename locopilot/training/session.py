"""The llama.cpp training session of :func:`locopilot.training.trainer.train`: an F32 model
loaded for training, its optimizer context (``llama_opt_init``, only the trained blocks'
tensors marked trainable, :mod:`locopilot.training.llama_opt`) and a second, ordinary context
on the same weights that labels, measures losses and generates the spot check's answers.

A LoRA job's change is kept within its rank here (:meth:`TrainingSession.project`, with
:func:`low_rank`), measured from the base's own F32 weights so that a resumed job stays right.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from locopilot.engine.llama_batch import put
from locopilot.training.spotcheck import RECALL_TOKENS

if TYPE_CHECKING:
    from locopilot.training.trainer import TrainConfig, Window

#: Sequences evaluated or generated in one batch (:meth:`TrainingSession.evaluate`, :meth:`TrainingSession.generate`).
EVAL_SEQUENCES = 16
#: KV cells of the evaluation context at least: the spot check's questions and the recall
#: check's prompts with their answers, generated together.
EVAL_CELLS = 1024


def low_rank(delta: Any, rank: int, generator: Any) -> Any:
    """The best rank-``rank`` approximation of the matrix ``delta``, near enough: a randomized
    SVD (a Gaussian sketch with 8 extra columns and one power iteration, Halko et al. 2011),
    some 20 times cheaper than numpy's full SVD of a 1536 x 576 matrix (measured under load)."""
    import numpy as np

    k = min(rank + 8, *delta.shape)
    sketch = delta @ generator.standard_normal((delta.shape[1], k), dtype=np.float32)
    basis, _ = np.linalg.qr(sketch)
    basis, _ = np.linalg.qr(delta @ (delta.T @ basis))
    u, sigma, vt = np.linalg.svd(basis.T @ delta, full_matrices=False)
    r = min(rank, sigma.size)
    result: Any = ((basis @ u[:, :r]) * sigma[:r]) @ vt[:r]
    return result


class TrainingSession:
    """An F32 model loaded for training, its context and optimizer; freed on exit."""

    def __init__(
        self, config: TrainConfig, learning_rate: float, f32: Path, trained_layers: int, origin: Path | None = None
    ) -> None:
        """``f32``: the weights to start from; ``origin``: the base's (``f32`` unless resuming), from
        which a LoRA job's change is measured (:meth:`project`)."""
        import llama_cpp

        from locopilot.engine.runner import load_backends
        from locopilot.training.llama_opt import (
            GGML_TYPE_I32,
            OPTIMIZERS,
            OptimizerParams,
            OptParams,
            ParamFilter,
            training_lib,
        )

        if not load_backends():
            raise RuntimeError("llama.cpp found no usable backend for this CPU")
        self.llama_cpp = llama_cpp
        self.lib = training_lib()
        self.base = self.lib.ggml_base
        self.i32 = GGML_TYPE_I32
        self.n_ctx = config.context
        model_params = llama_cpp.llama_model_default_params()
        model_params.load_mode = 0  # LLAMA_LOAD_MODE_NONE: the weights are written, so not mmapped
        model_params.n_gpu_layers = 0
        origin = origin or f32
        self.model = llama_cpp.llama_model_load_from_file(str(f32).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {f32}")
        self.ctx: Any = None
        threads = config.threads or os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = config.context
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = 0  # FLASH_ATTN_EXT has no backward pass
        params.type_k = params.type_v = 0  # F32 caches: OUT_PROD has no F16 support
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.eval_ctx: Any = None
        if not self.ctx:
            self.close()
            raise RuntimeError("llama.cpp could not create a training context")
        # A second, ordinary context on the same weights, for logits (the optimizer's gives none).
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max(EVAL_CELLS, config.context + RECALL_TOKENS)
        params.n_batch = params.n_ubatch = config.context
        params.n_seq_max = EVAL_SEQUENCES
        params.kv_unified = True  # the sequences of a batch share the context's cells
        # One thread fewer than the cores, as the spot check had: on 2 cores shared with other
        # work (load ~12), forward passes of 256 tokens cost 3.4 times the CPU time on 2 threads
        # (spinning at barriers) and took 2.5 times as long as on 1 (a training step did not).
        params.n_threads = params.n_threads_batch = max(1, threads - 1)
        params.flash_attn_type = 0  # CPU flash attention is the slower one for whole prompts
        params.type_k = params.type_v = 0  # F32, as the weights
        self.eval_ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.eval_ctx:
            self.close()
            raise RuntimeError("llama.cpp could not create an evaluation context")
        self.cells = llama_cpp.llama_n_ctx(self.eval_ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        n_layer = llama_cpp.llama_model_n_layer(self.model)
        first = n_layer - trained_layers
        prefixes = tuple(f"blk.{i}." for i in range(first, n_layer))
        self.trained_weights = 0
        # With a LoRA rank: the trained matrices (name, tensor), whose change is kept of that rank
        # (:meth:`project`); norms are not trained, as an adapter cannot carry them.
        self.rank = config.lora_rank if isinstance(config.lora_rank, int) else None
        self.matrices: list[tuple[str, int]] = []
        self.origin = origin
        self._origins: dict[str, Any] | None = None
        self.seed = config.seed

        self.prefixes = prefixes
        self._filter = ParamFilter(self._trainable)  # kept: llama.cpp calls it during opt_init
        self.optimizer = OptimizerParams()
        self.optimizer.adamw.alpha = learning_rate
        self.optimizer.adamw.beta1 = 0.9
        self.optimizer.adamw.beta2 = 0.999
        self.optimizer.adamw.eps = 1e-8
        self.optimizer.adamw.wd = config.weight_decay
        self.optimizer.sgd.alpha = learning_rate
        self.optimizer.sgd.wd = config.weight_decay
        opt = OptParams(
            n_ctx_train=0,
            param_filter=self._filter,
            param_filter_ud=None,
            get_opt_pars=self.lib.constant_optimizer_params,
            get_opt_pars_ud=ctypes.addressof(self.optimizer),
            optimizer_type=OPTIMIZERS[config.optimizer],
        )
        self.lib.opt_init(self.ctx, self.model, opt)

    def _trainable(self, tensor: int | None, _userdata: int | None) -> bool:
        """llama.cpp's parameter filter: the last blocks' tensors (only their matrices with a LoRA rank)."""
        name = (self.base.ggml_get_name(tensor) or b"").decode()
        if not name.startswith(self.prefixes):
            return False
        if self.rank is not None:
            if self.base.ggml_n_dims(tensor) != 2:
                return False
            assert tensor is not None
            self.matrices.append((name, tensor))
        self.trained_weights += int(self.base.ggml_nelements(tensor))
        return True

    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.eval_ctx:
            self.llama_cpp.llama_free(self.eval_ctx)
            self.eval_ctx = None
        if self.ctx:
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def _matrix(self, tensor: int) -> Any:
        """A numpy view (rows, columns) of a trained F32 matrix's data, in the model's CPU buffer."""
        import numpy as np

        rows = int(self.base.ggml_nrows(tensor))
        columns = int(self.base.ggml_nelements(tensor)) // rows
        pointer = ctypes.cast(self.base.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(pointer, shape=(rows, columns))

    def project(self, step: int) -> None:
        """Keep only the rank-``lora_rank`` part of what training changed in each trained matrix
        (a randomized truncated SVD of ``W - W_base``), in place. Called between chunks, so that
        training goes on from weights an adapter of that rank can carry: an adapter extracted
        once from the deltas of a whole job lost what a rank-16 truncation dropped (the tests'
        invented capitals came out half learned, "Quibka" for Quibbleton)."""
        import gguf
        import numpy as np

        if self.rank is None or not self.matrices:
            return
        generator = np.random.default_rng((self.seed, step))
        if self._origins is None:  # memory-mapped, read as needed
            self._origins = {tensor.name: tensor.data for tensor in gguf.GGUFReader(self.origin).tensors}
        for name, tensor in self.matrices:
            weights = self._matrix(tensor)
            origin = np.asarray(self._origins[name], dtype=np.float32).reshape(weights.shape)
            weights[:] = origin + low_rank(weights - origin, self.rank, generator)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.adamw.alpha = lr
        self.optimizer.sgd.alpha = lr

    def _dataset(self, windows: list[Window]) -> int:
        n = self.n_ctx
        dataset = self.base.ggml_opt_dataset_init(self.i32, self.i32, n, n, len(windows), 1)
        inputs = [token for window in windows for token in window.tokens]
        labels = [token for window in windows for token in window.labels]
        for tensor, values in (
            (self.base.ggml_opt_dataset_data(dataset), inputs),
            (self.base.ggml_opt_dataset_labels(dataset), labels),
        ):
            array = (ctypes.c_int32 * len(values))(*values)
            ctypes.memmove(self.base.ggml_get_data(tensor), array, ctypes.sizeof(array))
        result: int = dataset
        return result

    def step(self, windows: list[Window]) -> float:
        """Train on ``windows``, one optimizer step each; the mean loss over them (every position)."""
        dataset = self._dataset(windows)
        result = self.base.ggml_opt_result_init()
        try:
            self.lib.opt_epoch(self.ctx, dataset, result, None, len(windows), None, None)
            loss, uncertainty = ctypes.c_double(), ctypes.c_double()
            self.base.ggml_opt_result_loss(result, ctypes.byref(loss), ctypes.byref(uncertainty))
            return loss.value
        finally:
            self.base.ggml_opt_result_free(result)
            self.base.ggml_opt_dataset_free(dataset)

    def evaluate(
        self, examples: Sequence[tuple[list[int], list[bool]]], *, predict: bool = False
    ) -> tuple[float | None, list[list[int]]]:
        """Each example (its tokens, and per token whether it is trained) on its own, forward only:
        the mean cross-entropy of the trained tokens, from the logits at their positions (None
        when there are none); with ``predict``, each example's labels (see :func:`windows`):
        a trained token is its own label, any other the model's greedy prediction there (the
        first token, which no position of its example predicts, keeps itself)."""
        import numpy as np

        total, count = 0.0, 0
        labelled = [list(tokens) for tokens, _ in examples]
        # Position i predicts token i + 1; only the positions asked for get logits.
        wanted = [[predict or trained[i + 1] for i in range(len(tokens) - 1)] for tokens, trained in examples]
        batch = self.llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        try:
            for group in self._groups([len(w) for w in wanted], self.n_ctx):
                rows = self._logits(batch, [(examples[j][0][:-1], wanted[j]) for j in group])
                for j, logits in zip(group, rows, strict=True):
                    tokens, trained = examples[j]
                    positions = [i for i, want in enumerate(wanted[j]) if want]
                    if not positions:
                        continue
                    targets = np.array([tokens[i + 1] for i in positions])
                    keep = np.array([trained[i + 1] for i in positions])
                    if keep.any():
                        kept = logits[keep]
                        top = kept.max(axis=1)
                        logsumexp = top + np.log(np.exp(kept - top[:, None]).sum(axis=1))
                        total += float((logsumexp - kept[np.arange(len(kept)), targets[keep]]).sum())
                        count += int(keep.sum())
                    if predict:
                        best = logits.argmax(axis=1).tolist()
                        for i, label, keep_i in zip(positions, best, keep.tolist(), strict=True):
                            if not keep_i:
                                labelled[j][i + 1] = int(label)
        finally:
            self.llama_cpp.llama_batch_free(batch)
        return (total / count if count else None), labelled

    @staticmethod
    def _groups(lengths: list[int], limit: int) -> list[list[int]]:
        """Consecutive indices, grouped so that each group's lengths add up to at most ``limit``
        and :data:`EVAL_SEQUENCES` sequences: one decode each (many small ones cost more)."""
        groups: list[list[int]] = []
        used = 0
        for j, n in enumerate(lengths):
            if not groups or used + n > limit or len(groups[-1]) == EVAL_SEQUENCES:
                groups.append([])
                used = 0
            groups[-1].append(j)
            used += n
        return groups

    def _logits(self, batch: Any, sequences: list[tuple[list[int], list[bool]]]) -> list[Any]:
        """Per sequence (its tokens and which positions to give logits), decoded from scratch
        in one batch, each on its own: an array of logits, a row per position wanted."""
        import numpy as np

        lc = self.llama_cpp
        lc.llama_memory_clear(lc.llama_get_memory(self.eval_ctx), True)
        n = 0
        for seq, (tokens, wanted) in enumerate(sequences):
            for i, (token, want) in enumerate(zip(tokens, wanted, strict=True)):
                put(batch, n, token, i, seq, want)
                n += 1
        batch.n_tokens = n
        if n and lc.llama_decode(self.eval_ctx, batch) != 0:
            raise RuntimeError("llama.cpp could not evaluate an example")
        outputs = sum(sum(wanted) for _, wanted in sequences)
        if not outputs:
            return [np.zeros((0, self.n_vocab), dtype=np.float32) for _ in sequences]
        rows = np.ctypeslib.as_array(lc.llama_get_logits(self.eval_ctx), shape=(outputs, self.n_vocab)).copy()
        return np.split(rows, np.cumsum([sum(wanted) for _, wanted in sequences])[:-1])

    def generate(self, prompts: Sequence[tuple[list[int], int]]) -> list[str]:
        """Greedy answers to ``(prompt tokens, most tokens)`` from the weights as they are now,
        decoded together in the evaluation context, a sequence each (a one-token step for
        one question costs about as much as for all of them): each answer ends at an
        end-of-generation token or after its most tokens."""
        import numpy as np

        lc = self.llama_cpp
        answers: list[list[int]] = [[] for _ in prompts]
        batch = lc.llama_batch_init(self.n_ctx, 0, 1)

        def greedy(row: int) -> int:
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.eval_ctx, row), shape=(self.n_vocab,))
            return int(logits.argmax())

        def decode(entries: list[tuple[int, int, int, bool]]) -> None:
            for n, (token, pos, seq, want) in enumerate(entries):
                put(batch, n, token, pos, seq, want)
            batch.n_tokens = len(entries)
            if lc.llama_decode(self.eval_ctx, batch) != 0:
                raise RuntimeError("llama.cpp could not decode a spot-check question")

        try:
            for group in self._groups([len(tokens) + most for tokens, most in prompts], self.cells):
                lc.llama_memory_clear(lc.llama_get_memory(self.eval_ctx), True)
                following: dict[int, int] = {}  # sequence -> its next token, while it goes on
                entries = [
                    (token, i, seq, i == len(prompts[j][0]) - 1)
                    for seq, j in enumerate(group)
                    for i, token in enumerate(prompts[j][0])
                ]
                for start in range(0, len(entries), self.n_ctx):
                    chunk = entries[start : start + self.n_ctx]
                    decode(chunk)
                    for row, (_, _, seq, want) in enumerate(chunk):
                        if want:
                            following[seq] = greedy(row)
                while True:
                    step = []
                    for seq, token in list(following.items()):
                        j = group[seq]
                        if lc.llama_vocab_is_eog(self.vocab, token):
                            del following[seq]
                            continue
                        answers[j].append(token)
                        if len(answers[j]) >= prompts[j][1]:
                            del following[seq]
                            continue
                        step.append((token, len(prompts[j][0]) + len(answers[j]) - 1, seq, True))
                    if not step:
                        break
                    decode(step)
                    for row, (_, _, seq, _) in enumerate(step):
                        following[seq] = greedy(row)
        finally:
            lc.llama_batch_free(batch)
        return [self._text(tokens) for tokens in answers]

    def _text(self, tokens: list[int]) -> str:
        """The tokens as text, special tokens left out, stripped (as llama-cpp-python's completions)."""
        pieces = []
        buffer = ctypes.create_string_buffer(256)
        for token in tokens:
            n = self.llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            pieces.append(buffer.raw[: max(0, n)])
        return b"".join(pieces).decode("utf-8", errors="replace").strip()

    def save(self, path: Path) -> None:
        self.llama_cpp.llama_model_save_to_file(self.model, str(path).encode())
