"""Start time of the one-file binary: exec to ``--version``'s exit and to ``/health`` 200.

Side by side, for the same binary (``just build`` makes ``dist/locopilot``):

- **unpacked each start**: a new empty ``TMPDIR`` for every run, so the bootloader unpacks
  the bundle (about 110 MB) first, as every start did before the kept copy;
- **kept copy**: one ``TMPDIR`` for all runs, so the first run keeps what it unpacked and the
  others check it and use it (build/pyinstaller-bootloader.patch).

``serve`` starts model-less against a data folder made by a first, unmeasured start (a
service's restart finds its database there); ``/health`` answers before any model loads.
Each row gives the median and the spread over ``--runs`` runs, and the CPU time the
process tree had used when ``/health`` answered (less sensitive to a busy machine than
the wall time). Run: ``uv run --frozen --no-sync python bench/start.py [--binary dist/locopilot]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if parent == pid:
                found += [int(entry.name), *children(int(entry.name))]
    return found


def cpu_ms(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def version(binary: Path, env: dict[str, str]) -> tuple[float, float]:
    started = time.perf_counter()
    subprocess.run([str(binary), "--version"], env=env, check=True, capture_output=True)
    wall = (time.perf_counter() - started) * 1000
    return wall, float("nan")


def serve(binary: Path, env: dict[str, str]) -> tuple[float, float]:
    port = free_port()
    env = {**env, "LOCOPILOT_PORT": str(port)}
    started = time.perf_counter()
    process = subprocess.Popen([str(binary), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    answer.read()
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}") from None
                time.sleep(0.005)
        wall = (time.perf_counter() - started) * 1000
        cpu = sum(cpu_ms(pid) for pid in [process.pid, *children(process.pid)])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, default=ROOT / "dist" / "locopilot")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    binary = args.binary.resolve()
    with tempfile.TemporaryDirectory(prefix="locopilot-start-") as work:
        base = {
            **os.environ,
            "LOCOPILOT_DATA_DIR": str(Path(work) / "data"),
            "LOCOPILOT_HOST": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }
        kept = Path(work) / "kept"
        kept.mkdir()
        serve(binary, {**base, "TMPDIR": str(kept)})  # the database, and the kept copy

        def fresh() -> dict[str, str]:
            return {**base, "TMPDIR": tempfile.mkdtemp(dir=work)}

        rows = []
        for what, measure in (("--version", version), ("serve -> /health", serve)):
            for how, env in (("unpacked each start", fresh), ("kept copy", lambda: {**base, "TMPDIR": str(kept)})):
                runs = [measure(binary, env()) for _ in range(args.runs)]
                walls = [wall for wall, _ in runs]
                cpus = [cpu for _, cpu in runs if cpu == cpu]
                rows.append((what, how, statistics.median(walls), min(walls), max(walls), cpus))
    load = os.getloadavg()[0]
    print(f"{binary} ({binary.stat().st_size / 1e6:.1f} MB), {args.runs} runs each, load average {load:.1f}")
    print(f"{'command':<16} {'':<20} {'median ms':>10} {'min':>7} {'max':>7} {'CPU ms':>7}")
    for what, how, median, low, high, cpus in rows:
        cpu = f"{statistics.median(cpus):7.0f}" if cpus else f"{'-':>7}"
        print(f"{what:<16} {how:<20} {median:10.0f} {low:7.0f} {high:7.0f} {cpu}")


if __name__ == "__main__":
    main()
