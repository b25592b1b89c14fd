"""Pools of replicas behind one locopilot front: throughput of one replica against two, and a replica killed
mid-load.

Everything runs on 127.0.0.1 with SmolLM2-135M:

- **throughput**: the same load (--clients clients sending --requests streamed chat requests of
  --max-tokens tokens between them) through a front whose pool is one replica, then through a front
  whose pool is two, for replicas of two kinds: locopilot servers with the embedded engine, and
  llama.cpp's ``llama-server`` (built by ``bench/llama_server.py`` from the same llama.cpp as the
  embedded engine). Each replica gets --threads threads and --slots slots. The table gives requests,
  completion tokens, wall time, aggregate completion tokens/s and how the front spread the requests.
- **kill**: the same load through the two-llama-server front; once --kill-after requests have ended,
  one llama-server is killed (SIGKILL). Every request that had not started streaming must still
  succeed (the front fails over before the first byte); requests that were streaming from the killed
  replica end with an error event and are counted apart. Exits 1 if any request failed before
  streaming.

Run it at low priority on a shared machine (``nice -n 10 python bench/pool.py``); the load average is
printed before and after, and numbers are only comparable within one run.

Usage: python bench/pool.py [--clients 4] [--requests 24] [--max-tokens 32] [--threads 1] [--slots 2]
           [--kill-after 6] [--only throughput|kill]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import llama_server
from affinity import MODEL, MODEL_FILE, free_port, loadavg, serve
from ready import wait_ready

PROMPTS = (
    "Write a short poem about the sea.",
    "Tell me a story about a lighthouse keeper.",
    "Describe a busy market in the morning.",
    "Explain how bread is made, step by step.",
)


@contextmanager
def run_llama_server(root: Path, name: str, threads: int, slots: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``llama-server`` serving SmolLM2 as MODEL on a free port, in its own process group; yields (URL, process)."""
    binary = llama_server.build()
    port = free_port()
    argv = [
        str(binary), "-m", str(MODEL_FILE), "-a", MODEL, "--host", "127.0.0.1", "--port", str(port),
        "-c", str(1024 * slots), "-np", str(slots), "-t", str(threads), "-tb", str(threads),
    ]  # fmt: skip
    log = (root / f"{name}.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/health", log=root / f"{name}.log")
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


@dataclass
class Outcome:
    replica: str
    streamed: bool  # a content delta arrived before the end
    ok: bool
    tokens: int
    error: str = ""


def one_request(client: httpx.Client, front: str, prompt: str, max_tokens: int) -> Outcome:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    replica, streamed, tokens = "-", False, 0
    try:
        with client.stream("POST", f"{front}/v1/chat/completions", json=body) as response:
            replica = response.headers.get("x-locopilot-provider", "-")
            if response.status_code != 200:
                response.read()
                return Outcome(replica, False, False, 0, f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return Outcome(replica, streamed, False, tokens, str(event["error"].get("message")))
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    streamed = True
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Outcome(replica, streamed, False, tokens, f"{type(exc).__name__}: {exc}")
    return Outcome(replica, streamed, True, tokens)


def load(front: str, args: argparse.Namespace, on_done: threading.Event | None = None) -> tuple[list[Outcome], float]:
    """--requests requests through ``front`` from --clients threads; sets ``on_done`` after --kill-after ended."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def worker() -> None:
        with httpx.Client(timeout=httpx.Timeout(120), trust_env=False) as client:
            while True:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                outcome = one_request(client, front, PROMPTS[number % len(PROMPTS)], args.max_tokens)
                with lock:
                    outcomes.append(outcome)
                    if on_done is not None and len(outcomes) >= args.kill_after:
                        on_done.set()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


def row(label: str, outcomes: list[Outcome], wall: float) -> list[str]:
    tokens = sum(o.tokens for o in outcomes)
    spread = Counter(o.replica for o in outcomes)
    return [
        label,
        str(len(outcomes)),
        str(sum(not o.ok for o in outcomes)),
        str(tokens),
        f"{wall:.1f}",
        f"{tokens / wall:.1f}",
        " ".join(f"{k}={v}" for k, v in sorted(spread.items())),
    ]


def front_for(stack: ExitStack, root: Path, name: str, replicas: list[tuple[str, str]]) -> str:
    upstreams = [{"name": n, "url": f"{u}/v1", "locality": "local", "priority": 10} for n, u in replicas]
    return stack.enter_context(serve(root, name, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)}))


def warm(url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).raise_for_status()


def throughput(root: Path, args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    engine = {
        "LOCOPILOT_THREADS": str(args.threads),
        "LOCOPILOT_PARALLEL": str(args.slots),
        "LOCOPILOT_CTX_SIZE": str(1024 * args.slots),
    }
    with ExitStack() as stack:
        embedded = [
            (f"embedded{i}", stack.enter_context(serve(root, f"embedded{i}", engine, {MODEL: MODEL_FILE})))
            for i in range(2)
        ]
        for _, url in embedded:
            warm(url)
        for count in (1, 2):
            front = front_for(stack, root, f"front-embedded-{count}", embedded[:count])
            rows.append(row(f"embedded x{count}", *load(front, args)))
    with ExitStack() as stack:
        servers = [
            (f"llama{i}", stack.enter_context(run_llama_server(root, f"llama{i}", args.threads, args.slots))[0])
            for i in range(2)
        ]
        for count in (1, 2):
            front = front_for(stack, root, f"front-llama-{count}", servers[:count])
            rows.append(row(f"llama-server x{count}", *load(front, args)))
    return rows


def kill(root: Path, args: argparse.Namespace) -> tuple[list[str], list[Outcome]]:
    with ExitStack() as stack:
        started = [stack.enter_context(run_llama_server(root, f"pool{i}", args.threads, args.slots)) for i in range(2)]
        front = front_for(stack, root, "front-kill", [(f"pool{i}", url) for i, (url, _) in enumerate(started)])
        ready = threading.Event()

        def killer() -> None:
            ready.wait()
            os.killpg(started[1][1].pid, signal.SIGKILL)
            print(f"  killed pool1 after {args.kill_after} requests", file=sys.stderr)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        outcomes, wall = load(front, args, ready)
        return row("llama-server x2, one killed", outcomes, wall), outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads of each replica")
    parser.add_argument("--slots", type=int, default=2, help="slots of each replica")
    parser.add_argument("--kill-after", type=int, default=6)
    parser.add_argument("--only", choices=("throughput", "kill"))
    args = parser.parse_args()
    if not MODEL_FILE.is_file():
        raise SystemExit(f"{MODEL_FILE} is missing; run `just setup` first")
    print(f"load average before: {loadavg()} ({os.cpu_count()} CPUs, nice {os.nice(0)})")
    rows: list[list[str]] = []
    failed_before_stream: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
        root = Path(tmp)
        if args.only != "kill":
            rows.extend(throughput(root, args))
        if args.only != "throughput":
            killed, outcomes = kill(root, args)
            rows.append(killed)
            failed_before_stream = [o for o in outcomes if not o.ok and not o.streamed]
            cut = [o for o in outcomes if not o.ok and o.streamed]
    print(f"load average after:  {loadavg()}")
    print(
        f"\n{args.requests} requests from {args.clients} clients, max_tokens {args.max_tokens}, SmolLM2-135M, "
        f"each replica {args.threads} thread(s) and {args.slots} slots\n"
    )
    header = ["pool", "requests", "failed", "tokens", "wall s", "tokens/s", "requests per replica"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if args.only != "throughput":
        print(f"\nkilled replica: {len(failed_before_stream)} failed before streaming, {len(cut)} cut mid-stream")
        for outcome in failed_before_stream:
            print(f"  failed before streaming on {outcome.replica}: {outcome.error}")
        if failed_before_stream:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
