"""GPU against CPU: the same server and model with and without a GPU companion.

``locopilot serve`` twice, with bench/engine.py's load test (greedy, end-of-generation
tokens banned so each request makes ``--tokens``): once on the CPU alone, once with
``LOCOPILOT_BACKENDS_DIR`` holding a companion (build/gpu_backend.sh) and
``LOCOPILOT_GPU_LAYERS`` as given (default -1: as many as fit). Prints generated tokens/s
and time to first token for each, and what engine health says about the GPU run.

Without a GPU, Mesa's lavapipe (a Vulkan driver on the CPU) shows the companion working,
not a speed-up: run with ``GGML_VK_VISIBLE_DEVICES=0`` (ggml skips CPU drivers unless named).

Usage: python bench/gpu.py --backends-dir DIR [--gpu-layers -1] [--model PATH] [--tokens 64]
                           [--rounds 2] [--clients 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import httpx
from engine import DEFAULT_MODEL, SMOLLM2_STOPS, load_test, start_locopilot, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends-dir", type=Path, required=True)
    parser.add_argument("--gpu-layers", type=int, default=-1)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    ban = {token: -100.0 for token in SMOLLM2_STOPS.split(",")}
    setups = {
        "CPU": {},
        "GPU": {"LOCOPILOT_BACKENDS_DIR": str(args.backends_dir), "LOCOPILOT_GPU_LAYERS": str(args.gpu_layers)},
    }
    rows: dict[str, dict[str, float]] = {}
    for name, env in setups.items():
        with tempfile.TemporaryDirectory() as folder:
            process, url = start_locopilot(args.model, args.threads, args.clients, Path(folder), env=env)
            try:
                rows[name] = load_test(url, args.clients, args.tokens, args.rounds, process.pid, ban)
                engine = httpx.get(f"{url}/v1/engine/health", timeout=30).json()["engine"]
            finally:
                stop(process)
        if name == "GPU":
            print("GPUs:", [f"{g['name']} {g['description']}" for g in engine["gpus"]] or engine["gpu_note"])
            print("offload:", [r["offload"] for r in engine["runners"]])
    print(f"load average {os.getloadavg()[0]:.2f}; {args.clients} client(s), {args.tokens} tokens, {args.model.name}")
    print(f"{'setup':6} {'tokens/s':>9} {'TTFT p50 ms':>12} {'per stream tok/s':>17}")
    for name, row in rows.items():
        print(f"{name:6} {row['aggregate']:9.1f} {row['ttft_p50'] * 1000:12.0f} {row['per_stream']:17.1f}")


if __name__ == "__main__":
    main()
