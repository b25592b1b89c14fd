"""Time to first token after a restart, for a prompt whose long beginning was served before it.

Agents send the same long system prompt and tool list on every turn. Each server below
serves one request with a ~4k-token prefix, is restarted, and serves a second request
with the same prefix and another question; the table gives both TTFTs side by side:

- locopilot with its prompt cache on disk (the default; engine/kvdisk.py),
- locopilot with it off (``LOCOPILOT_PROMPT_CACHE_MB=0``),
- llama-server (its slot cache lives in memory and is lost on restart).

Run: ``uv run --frozen --no-sync python bench/prompt_cache_disk.py`` (builds llama-server
once, as bench/engine.py does; ``--skip-llama-server`` to leave it out).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import llama_server
from engine import DEFAULT_MODEL, fresh_connections, start_llama_server, start_locopilot, stop, stream

CTX = 8192
TOPICS = ("harbour", "bakery", "observatory", "orchard", "railway", "library", "foundry", "vineyard")
PREFIX = "You are the archivist of a coastal town. Keep to these records.\n" + "\n".join(
    f"Record {n}: in year {1700 + n} the {TOPICS[n % len(TOPICS)]} was rebuilt by a crew of {n % 17 + 3} "
    f"after the storm of the {n % 12 + 1}th month, at a cost of {n * 37 % 900 + 100} silver coins."
    for n in range(110)
)
BAN = {"0": -100.0, "2": -100.0}  # SmolLM2's end tokens: every reply makes its tokens


def prompt_tokens(url: str, prompt: str) -> int:
    body = {"model": "bench", "prompt": prompt, "max_tokens": 1}
    usage = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()["usage"]
    return int(usage["prompt_tokens"])


def restarted(
    start: Callable[[], tuple[object, str]], ready_to_stop: Callable[[], object] = lambda: True
) -> tuple[float, float, int]:
    """TTFT of the first request, then of one after a restart; and the prefix's tokens."""
    process, url = start()
    try:
        with fresh_connections() as http:
            cold = stream(http, url, f"{PREFIX}\nWhat happened to the harbour?", 4, BAN).ttft
        deadline = time.monotonic() + 120
        while not ready_to_stop() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop(process)  # type: ignore[arg-type]
    process, url = start()
    try:
        with fresh_connections() as http:
            after = stream(http, url, f"{PREFIX}\nWho rebuilt the bakery?", 4, BAN).ttft
        tokens = prompt_tokens(url, PREFIX)  # last: it would fill the prompt cache before the timed requests
    finally:
        stop(process)  # type: ignore[arg-type]
    return cold, after, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary (default: built, then cached)")
    args = parser.parse_args()
    binary = None if args.skip_llama_server else (args.llama_server or llama_server.build())

    rows: dict[str, tuple[float, float, int]] = {}
    for name, env in (("locopilot, disk cache", {}), ("locopilot, no disk cache", {"LOCOPILOT_PROMPT_CACHE_MB": "0"})):
        with tempfile.TemporaryDirectory() as folder:
            data = Path(folder)

            def start(env: dict[str, str] = env, data: Path = data) -> tuple[object, str]:
                return start_locopilot(args.model, args.threads, 1, data, ctx=CTX, env=env)

            def written(data: Path = data, env: dict[str, str] = env) -> bool:
                return bool(env) or any((data / "data" / "prompt-cache").glob("*/*.state"))

            rows[name] = restarted(start, written)
    if binary is not None:
        rows["llama-server"] = restarted(lambda: start_llama_server(binary, args.model, args.threads, 1, ctx=CTX))

    load = os.getloadavg()[0]
    print(f"\nmodel {args.model.name}, {args.threads} threads, ctx {CTX}, load average {load:.2f}")
    print(f"{'server':<26} {'prefix tokens':>13} {'TTFT cold':>10} {'TTFT after restart':>19} {'after/cold':>11}")
    for name, (cold, after, tokens) in rows.items():
        print(f"{name:<26} {tokens:>13} {cold * 1000:>8.0f}ms {after * 1000:>17.0f}ms {after / cold:>10.0%}")


if __name__ == "__main__":
    main()
