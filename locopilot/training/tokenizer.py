"""A model's chat template and tokenizer, for counting and building training text.

The model is opened vocabulary-only (no weights), so this is cheap enough for
``train validate``. Rendering goes through the same sandboxed template in the same
memory-capped helper process as serving (:mod:`locopilot.engine.template_process`), so a
trained example looks exactly like a served conversation, and a hostile template in a
GGUF fails with :class:`~locopilot.engine.templates.TemplateError` instead of exhausting
this process's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from locopilot.engine.template_process import IsolatedRenderer
from locopilot.engine.templates import ChatTemplate, TemplateError, choose_template


class ChatTokenizer:
    """Renders messages with the model's chat template and tokenizes the result.

    Raises RuntimeError if llama.cpp cannot open the model's vocabulary, TemplateError if
    its template does not compile (and from the render methods, if a render fails).
    """

    def __init__(self, model_path: Path) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        from locopilot.engine.runner import load_backends

        set_verbose(False)
        load_backends()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model: Any = internals.LlamaModel(path_model=str(model_path), params=params, verbose=False)
        except ValueError as exc:  # llama-cpp-python raises ValueError when the load fails
            raise RuntimeError(f"llama.cpp cannot read the vocabulary of {model_path}") from exc
        metadata = self._model.metadata()
        self.template: ChatTemplate = choose_template(metadata)
        bos, eos = self._model.token_bos(), self._model.token_eos()
        self.bos = bos
        self.eos = eos
        self.renderer = IsolatedRenderer(
            self.template,
            bos_token=self._model.token_get_text(bos) if bos >= 0 else "",
            eos_token=self._model.token_get_text(eos) if eos >= 0 else "",
        )
        try:
            self.renderer.check()
        except TemplateError:
            self.close()
            raise
        self.add_bos = bos >= 0 and metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"

    def render(self, messages: list[dict[str, str]]) -> str:
        """The whole conversation as the model sees it, answers included (no generation prompt)."""
        return self.renderer.render(messages, add_generation_prompt=False)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of ``text``, special tokens parsed, BOS first when the model wants one."""
        tokens: list[int] = self._model.tokenize(text.encode(), add_bos=False, special=True)
        if self.add_bos and (not tokens or tokens[0] != self.bos):
            tokens.insert(0, self.bos)
        return tokens

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def encode_trained(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """The conversation's tokens, and for each whether it belongs to an assistant's answer.

        An answer's tokens are those after the conversation before it rendered with the
        generation prompt, up to the end of the conversation rendered through it (its
        end-of-turn marker included), both found as the longest common token prefix with
        the whole conversation, so a template that renders earlier turns differently marks
        more tokens, never fewer. A conversation where that finds no answer token has every
        token marked.
        """
        tokens = self.encode(messages)
        trained = [False] * len(tokens)

        def common(prefix: list[int]) -> int:
            n = 0
            for a, b in zip(prefix, tokens, strict=False):
                if a != b:
                    break
                n += 1
            return n

        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = common(self.prompt(messages[:i]))
            end = common(self.encode(messages[: i + 1]))
            for j in range(start, end):
                trained[j] = True
        if not any(trained):
            trained = [True] * len(tokens)
        return tokens, trained

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of the conversation followed by the assistant's turn opening (a generation prompt)."""
        return self.tokenize(self.renderer.render(messages, add_generation_prompt=True))

    def count(self, messages: list[dict[str, str]]) -> int:
        return len(self.encode(messages))

    def close(self) -> None:
        self.renderer.close()
        self._model.close()
