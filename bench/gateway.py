"""Gateway overhead: a fast upstream directly, through locopilot, and through LiteLLM's proxy.

One run, one table. A fast OpenAI-compatible upstream (bench/fast_upstream.py,
one process) answers POST /v1/chat/completions as JSON or as SSE. The same load
goes to three targets in turn:

  direct      the upstream itself: the floor every gateway adds to
  floor       the smallest proxy on locopilot's stack (bench/floor_proxy.py: granian,
              Litestar, aiohttp; forwards the body, relays the answer, nothing else):
              what any gateway built on that stack adds before doing any work
  locopilot   ``python -m locopilot serve`` with the upstream as its only provider
  loco-httpx  the same with LOCOPILOT_UPSTREAM_TRANSPORT=httpx: httpx's own transport
              under the upstream client instead of aiohttp (the issue asks for both)
  litellm     LiteLLM's proxy (one worker) with ``openai/fast-model`` at the same
              upstream; only with --litellm, pointing at the ``litellm`` program
              of a separate virtual environment (never the project's)

For each target, mode (JSON, streaming) and concurrency (1, 16, 64 clients by
default), each client sends requests back to back on one keep-alive connection:
first a warm-up (--warmup seconds, longer until every client has had an answer),
then a window of --duration seconds (or three times the warm-up, if longer) in
which finished requests are counted. Before each cell the target may go idle,
so work it queued in one cell (logging, accounting) is not billed to the next.

The table gives requests/s, p50 and p99 latency of the whole response, the
p50/p99 added over direct at the same mode and concurrency, the target's CPU
time per request, and the peak memory of its process tree (sum of VmHWM over
the server process and its children).

The load generator is one asyncio process on raw sockets, on the same cores as
the upstream and the target; its own CPU use is in the last column, so a cell
where it nears 100 % is limited by the client, not by the target.

Usage: python bench/gateway.py [--litellm /tmp/litellm-venv/bin/litellm]
           [--clients 1,16,64] [--duration 3] [--warmup 0.5] [--chunks 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ready
from loadgen import Cell, run_cell, settle, tree_hwm_kib
from ready import StartError

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fast-model"
PATH = "/v1/chat/completions"
LOCOPILOT_TARGETS = {"locopilot": "aiohttp", "loco-httpx": "httpx"}
"""locopilot as shipped, and with httpx's own transport under its upstream client."""

# Variables that would send loopback traffic through a proxy or leak settings into a child.
_DROPPED_ENV = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def request_body(stream: bool) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in eight words."}],
        "max_tokens": 16,
        "stream": stream,
    }
    return json.dumps(body).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- targets --------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_") and k not in _DROPPED_ENV}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def wait_ready(process: subprocess.Popen[bytes], url: str, seconds: float, log: Path) -> None:
    """:func:`ready.wait_ready`, stopping ``process`` when it fails."""
    try:
        ready.wait_ready(process, url, seconds, log)
    except StartError:
        stop(process)
        raise


def check_chat(port: int, name: str) -> httpx.Response:
    """One request of each kind through ``port``; raises StartError unless both succeed. Returns the last."""
    url = f"http://127.0.0.1:{port}{PATH}"
    for stream in (False, True):
        headers = {"Content-Type": "application/json"}
        response = httpx.post(url, content=request_body(stream), headers=headers, timeout=30, trust_env=False)
        if response.status_code != 200 or (stream and b"[DONE]" not in response.content):
            raise StartError(f"{name}: the check request failed: {response.status_code} {response.text[:500]}")
    return response


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to the process group this script started it in."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def started(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop(process)


def floor_proxy(
    port: int, upstream_port: int, folder: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    script = ROOT / "bench" / "floor_proxy.py"
    command = [sys.executable, str(script), "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}"]
    return started(command, child_env(), folder / "floor.log")


def upstream(port: int, chunks: int, folder: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    command = [sys.executable, str(ROOT / "bench" / "fast_upstream.py"), "--port", str(port), "--chunks", str(chunks)]
    return started(command, child_env(), folder / "upstream.log")


def locopilot(
    port: int, upstream_port: int, transport: str, folder: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    folder = folder / f"locopilot-{transport}"
    (folder / "models").mkdir(parents=True)
    upstreams = [
        {
            "name": "fast",
            "url": f"http://127.0.0.1:{upstream_port}/v1",
            "locality": "local",
            "priority": 1,
            "models": [MODEL],
        }
    ]
    env = child_env(
        LOCOPILOT_PORT=str(port),
        LOCOPILOT_DATA_DIR=str(folder / "data"),
        LOCOPILOT_MODELS_DIR=str(folder / "models"),
        LOCOPILOT_UPSTREAMS=json.dumps(upstreams),
        LOCOPILOT_LOG_LEVEL="warning",
        LOCOPILOT_UPSTREAM_TRANSPORT=transport,
    )
    return started([sys.executable, "-m", "locopilot", "serve"], env, folder / "locopilot.log")


def litellm(
    program: Path, port: int, upstream_port: int, folder: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    config = folder / "litellm.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                            "api_key": "dummy",
                        },
                    }
                ],
            },
            indent=2,
        )
    )
    env = child_env(
        # No fetches from GitHub at import or startup: bundled copies only.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS="True",
        LITELLM_LOCAL_BLOG_POSTS="True",
        LITELLM_LOCAL_POLICY_TEMPLATES="True",
        LITELLM_LOCAL_AUTOROUTER_PRESETS="True",
        LITELLM_TELEMETRY="False",
        LITELLM_DONT_SHOW_FEEDBACK_BOX="True",
        # Same footing as locopilot without API keys: no auth on loopback, no access log.
        LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
        LITELLM_LOG="WARNING",
    )
    command = [str(program), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return started(command, env, folder / "litellm.log")


def litellm_description(program: Path) -> str:
    """LiteLLM's version, and whether opentelemetry-sdk is installed beside it.

    Without opentelemetry-sdk (``litellm[proxy]`` does not pull it in), LiteLLM
    1.106's auth step retries a failing import of its OTel module on every
    request, which costs it a third of its CPU per request here.
    """
    site = sorted(program.resolve().parent.parent.glob("lib/python*/site-packages"))
    if not site:
        return "litellm (version unknown)"
    found = sorted(site[0].glob("litellm-*.dist-info"))
    version = found[0].name.removeprefix("litellm-").removesuffix(".dist-info") if found else "(version unknown)"
    otel = "with" if any(site[0].glob("opentelemetry_sdk-*.dist-info")) else "without"
    return f"litellm {version} ({otel} opentelemetry-sdk)"


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    stream: bool
    clients: int
    cell: Cell


def print_table(rows: list[Row], notes: list[str]) -> None:
    direct = {(r.stream, r.clients): r.cell for r in rows if r.target == "direct"}
    header = (
        f"{'target':<10} {'mode':<6} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
        f"{'+p99 ms':>8} {'CPU ms/req':>10} {'peak RSS MiB':>12} {'errors':>6} {'window s':>8} {'loadgen CPU':>11}"
    )
    print()
    for note in notes:
        print(note)
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        cell, base = row.cell, direct.get((row.stream, row.clients))
        p50, p99 = cell.quantile(0.5) * 1e3, cell.quantile(0.99) * 1e3
        if row.target == "direct" or base is None:
            added50 = added99 = "-"
        else:
            added50 = f"{p50 - base.quantile(0.5) * 1e3:+.2f}"
            added99 = f"{p99 - base.quantile(0.99) * 1e3:+.2f}"
        per_request = cell.server_cpu * 1e3 / len(cell.latencies) if cell.latencies else float("nan")
        print(
            f"{row.target:<10} {'stream' if row.stream else 'json':<6} {row.clients:>7} {cell.rps:>8.0f} "
            f"{p50:>8.2f} {p99:>8.2f} {added50:>8} {added99:>8} {per_request:>10.3f} "
            f"{cell.peak_rss_kib / 1024:>12.1f} {cell.errors:>6} {cell.window:>8.1f} "
            f"{cell.client_cpu / cell.window:>11.0%}"
        )
    errors = [f"  {r.target} {'stream' if r.stream else 'json'} {r.clients}: {r.cell.first_error}" for r in rows]
    errors = [e for e, r in zip(errors, rows, strict=True) if r.cell.errors]
    if errors:
        print("\nfirst error per cell:")
        print("\n".join(errors))
    print_goals(rows)


def print_goals(rows: list[Row]) -> None:
    """The issue's goals, as observations (a benchmark prints, it does not assert)."""
    cells = {(r.target, r.stream, r.clients): r.cell for r in rows}
    if not any(r.target == "locopilot" for r in rows):
        return
    clients = sorted({r.clients for r in rows})
    print("\ngoals (issue 17):")
    for stream in (False, True):
        mode = "stream" if stream else "json"
        loco, direct = cells.get(("locopilot", stream, clients[0])), cells.get(("direct", stream, clients[0]))
        if loco and direct and clients[0] == 1:
            added = (loco.quantile(0.5) - direct.quantile(0.5)) * 1e3
            print(f"  {mode}: added p50 at 1 client {added:.2f} ms (goal <= 1 ms)")
            if floor := cells.get(("floor", stream, clients[0])):
                stack = (floor.quantile(0.5) - direct.quantile(0.5)) * 1e3
                own = (loco.quantile(0.5) - floor.quantile(0.5)) * 1e3
                print(f"  {mode}:   of which the stack (floor proxy) {stack:.2f} ms, locopilot's own work {own:.2f} ms")
        rates = [cells[("locopilot", stream, c)].rps for c in clients if ("locopilot", stream, c) in cells]
        rising = all(b >= a * 0.97 for a, b in itertools.pairwise(rates))
        shown = " -> ".join(f"{r:.0f}" for r in rates)
        trend = "never falls" if rising else "FALLS"
        print(f"  {mode}: locopilot req/s by clients {shown} ({trend}; 3 % noise allowed)")
        if any(("loco-httpx", stream, c) in cells for c in clients):
            other = [cells[("loco-httpx", stream, c)].rps for c in clients if ("loco-httpx", stream, c) in cells]
            print(f"  {mode}: with the httpx transport instead: {' -> '.join(f'{r:.0f}' for r in other)}")
        top = clients[-1]
        if ("litellm", stream, top) in cells and ("locopilot", stream, top) in cells:
            peer = cells[("litellm", stream, top)].rps
            ratio = f"{cells[('locopilot', stream, top)].rps / peer:.1f}x" if peer else "n/a (litellm finished none)"
            print(f"  {mode}: locopilot / litellm req/s at {top} clients {ratio} (goal >= 10x)")


# --- main -----------------------------------------------------------------------------------------


def measure(name: str, pid: int, port: int, args: argparse.Namespace, rows: list[Row]) -> None:
    for stream in (False, True):
        for clients in args.clients:
            settle(pid)
            cell = asyncio.run(
                run_cell(
                    port,
                    PATH,
                    request_body(stream),
                    stream=stream,
                    clients=clients,
                    warmup=args.warmup,
                    duration=args.duration,
                    pid=pid,
                )
            )
            rows.append(Row(name, stream, clients, cell))
            mode = "stream" if stream else "json"
            print(
                f"  {name:<10} {mode:<6} {clients:>3} clients: {cell.rps:7.0f} req/s, "
                f"p50 {cell.quantile(0.5) * 1e3:.2f} ms, errors {cell.errors}",
                file=sys.stderr,
                flush=True,
            )


def main() -> None:
    try:
        run()
    except StartError as exc:
        raise SystemExit(str(exc)) from exc


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--litellm", type=Path, help="the litellm program of a separate venv with litellm[proxy]")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="seconds run before measuring, per cell (longer until every client has had an answer)",
    )
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per streamed answer")
    args = parser.parse_args()

    notes = [
        f"gateway overhead, {' '.join(['python bench/gateway.py', *sys.argv[1:]])}",
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f">= {args.duration:g} s measured after >= {args.warmup:g} s warm-up per cell; "
        f"POST {PATH}, max_tokens 16, stream: {args.chunks} content chunks + finish + [DONE]",
        "load generator: one asyncio process, raw sockets, one keep-alive connection per client, "
        f"on the same {os.cpu_count()} CPUs as the upstream and the target (its CPU use: last column)",
        "latency: whole response; +p50/+p99: over direct at the same mode and clients; "
        "CPU ms/req: the target's process tree; peak RSS: sum of VmHWM over that tree",
    ]
    program = args.litellm
    if program is None:
        notes.append("litellm: skipped (no --litellm given; install litellm[proxy] in a separate venv)")
    elif not (program.is_file() and os.access(program, os.X_OK)):
        notes.append(f"litellm: skipped ({program} is not an executable file)")
        program = None
    else:
        notes.append(f"{litellm_description(program)}: one uvicorn worker, no master key, LITELLM_LOG=WARNING")
    print(notes[-1], file=sys.stderr)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="locopilot-bench-") as tmp:
        folder = Path(tmp)
        upstream_port = free_port()
        with upstream(upstream_port, args.chunks, folder) as up:
            wait_ready(up, f"http://127.0.0.1:{upstream_port}/v1/models", 30, folder / "upstream.log")
            measure("direct", up.pid, upstream_port, args, rows)

            port = free_port()
            with floor_proxy(port, upstream_port, folder) as server:
                wait_ready(server, f"http://127.0.0.1:{port}/health", 60, folder / "floor.log")
                check_chat(port, "floor")
                measure("floor", server.pid, port, args, rows)

            for name, transport in LOCOPILOT_TARGETS.items():
                port = free_port()
                with locopilot(port, upstream_port, transport, folder) as server:
                    log = folder / f"locopilot-{transport}" / "locopilot.log"
                    wait_ready(server, f"http://127.0.0.1:{port}/v1/engine/health", 60, log)
                    served_by = check_chat(port, name).headers.get("x-locopilot-provider")
                    if served_by != "fast":
                        raise StartError(f"{name} served the check request from {served_by!r}, not 'fast'")
                    idle = tree_hwm_kib(server.pid, "VmRSS")
                    notes.append(f"{name}: LOCOPILOT_UPSTREAM_TRANSPORT={transport}, idle RSS {idle / 1024:.1f} MiB")
                    measure(name, server.pid, port, args, rows)

            if program is not None:
                port = free_port()
                try:
                    with litellm(program, port, upstream_port, folder) as server:
                        wait_ready(server, f"http://127.0.0.1:{port}/health/liveliness", 180, folder / "litellm.log")
                        check_chat(port, "litellm")
                        idle = tree_hwm_kib(server.pid, "VmRSS")
                        notes.append(f"litellm: idle RSS {idle / 1024:.1f} MiB after start")
                        measure("litellm", server.pid, port, args, rows)
                except StartError as exc:
                    notes.append(f"litellm: skipped, it did not start: {exc}")
    print_table(rows, notes)


if __name__ == "__main__":
    main()
