"""GPU companions (build/gpu_backend.sh) and the layers the runner puts on GPUs (engine/offload.py).

The lavapipe tests use Mesa's Vulkan driver on the CPU (``mesa-vulkan-drivers``), a real Vulkan
device, with ``libggml-vulkan.so`` from ``build/gpu_backend.sh vulkan``; they are skipped, saying
why, where that library (or a Vulkan device) is missing. ggml-vulkan passes over CPU drivers
unless ``GGML_VK_VISIBLE_DEVICES`` names one, which these tests do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from locopilot.engine.offload import ALL_LAYERS, choose, fitting_layers
from locopilot.engine.protocol import GpuDevice, Load, probe_decoder
from locopilot.models.memory import estimate, model_header
from locopilot.settings import ModelRuntime
from tests.conftest import GEMMA, ROOT, SMOL, Server, start_server

GIB = 1024**3
MIB = 1024**2


# -- the automatic choice, a pure function


def test_everything_fits() -> None:
    assert fitting_layers(block_count=30, weights=100 * MIB, kv_cache=60 * MIB, compute=50 * MIB, free=8 * GIB) == 31


def test_nothing_fits_below_the_margin() -> None:
    assert fitting_layers(block_count=30, weights=100 * MIB, kv_cache=60 * MIB, compute=50 * MIB, free=200 * MIB) == 0


def test_part_fits() -> None:
    # 32 layers + output of 8 GiB weights (248 MiB each) and 4 GiB KV cache (128 MiB a layer), in
    # 8 GiB less 0.5 GiB of compute and a 409.6 MiB margin (5%): 7283 MiB / 376 MiB = 19 layers.
    layers = fitting_layers(block_count=32, weights=33 * 248 * MIB, kv_cache=4 * GIB, compute=512 * MIB, free=8 * GIB)
    assert layers == 19


def test_kv_cache_counts() -> None:
    """A longer context leaves room for fewer layers."""
    short = fitting_layers(block_count=32, weights=4 * GIB, kv_cache=1 * GIB, compute=256 * MIB, free=4 * GIB)
    long = fitting_layers(block_count=32, weights=4 * GIB, kv_cache=8 * GIB, compute=256 * MIB, free=4 * GIB)
    assert 0 < long < short < 33


def gpu(free: int) -> GpuDevice:
    return GpuDevice(backend="Vulkan", name="Vulkan0", description="a test GPU", memory_free=free, memory_total=free)


def load(path: Path, gpu_layers: int, ctx_size: int = 2048) -> Load:
    return Load(model_path=str(path), ctx_size=ctx_size, threads=2, gpu_layers=gpu_layers, parallel=1)


def test_choose_from_the_model_header(smollm2_path: Path) -> None:
    """SmolLM2-135M has 30 layers (31 with the output layer); its KV cache at 2048 tokens is 45 MiB."""
    runtime = ModelRuntime(
        ctx_size=2048, parallel=1, gpu_layers=-1, threads=2, decode_threads=2, idle_ttl=0, keep_loaded=False
    )
    need = estimate(model_header(smollm2_path), runtime)
    assert choose(load(smollm2_path, -1), []).layers == 0
    everything = choose(load(smollm2_path, -1), [gpu(4 * GIB)])
    assert (everything.layers, everything.on_gpu) == (ALL_LAYERS, 31)
    assert "31 of 31 layers on Vulkan0 (a test GPU): automatic" in everything.reason
    # Room for about half the model after the compute buffers and the 256 MiB margin.
    half = choose(load(smollm2_path, -1), [gpu(need.compute + 256 * MIB + (need.weights + need.kv_cache) // 2)])
    assert 13 <= half.layers == half.on_gpu <= 17
    # Sixteen times the context: the KV cache takes the room of more layers.
    longer = choose(load(smollm2_path, -1, ctx_size=32768), [gpu(need.compute + 256 * MIB + need.weights // 2)])
    assert longer.on_gpu < half.on_gpu
    fixed = choose(load(smollm2_path, 5), [gpu(4 * GIB)])
    assert (fixed.layers, fixed.on_gpu) == (5, 5)
    assert fixed.reason.endswith(": set")


# -- companions, through the real runner and server


def probe(backends_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "locopilot", "_runner", "--probe", "--backends-dir", str(backends_dir)],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_a_companion_that_does_not_load_leaves_the_cpu(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    """A libggml-vulkan.so that dlopen refuses (here: not an ELF file; on a server: no libvulkan.so.1)
    is named once in the log, and the CPU serves the chat."""
    backends = tmp_path_factory.mktemp("backends")
    (backends / "libggml-vulkan.so").write_text("not a library\n")
    found = probe_decoder.decode(probe(backends).stdout)
    assert found.gpus == []
    assert f"{backends / 'libggml-vulkan.so'} did not load: " in found.gpu_note
    assert "invalid ELF header" in found.gpu_note or "too short" in found.gpu_note
    running = start_server(tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_BACKENDS_DIR": str(backends)})
    try:
        engine = running.engine_health()["engine"]
        assert isinstance(engine, dict)
        assert engine["gpus"] == []
        assert "did not load" in engine["gpu_note"]
        reply = running.client().chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content
        runner = running.engine_health()["engine"]["runners"][0]  # type: ignore[index]
        assert runner["gpu_layers"] == 0
    finally:
        running.stop()
    lines = [line for line in running.log_path.read_text().splitlines() if "running on the CPU" in line]
    assert len(lines) == 1, lines
    assert "libggml-vulkan.so did not load" in lines[0]


def vulkan_companion() -> Path:
    """The folder of build/gpu_backend.sh's cached libggml-vulkan.so; skips the test without one or a device."""
    # The baseline `just gpu-backend` builds for (the binary's), unless GLIBC_BASELINE says another.
    baseline = {"GLIBC_BASELINE": os.environ.get("GLIBC_BASELINE", "2.28")}
    built = subprocess.run(
        [str(ROOT / "build" / "gpu_backend.sh"), "vulkan", "--cached"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **baseline},
    )
    if built.returncode != 0:
        pytest.skip(f"no Vulkan companion built (build/gpu_backend.sh vulkan): {built.stderr.strip()[-300:]}")
    folder = Path(built.stdout.strip()).parent
    found = probe_decoder.decode(probe(folder, LAVAPIPE).stdout)
    if not found.gpus:
        pytest.skip(f"libggml-vulkan.so found no Vulkan device (apt-get install mesa-vulkan-drivers): {found.gpu_note}")
    return folder


# lavapipe is the only device here; on a machine with a GPU, ggml would pick the GPU without this.
LAVAPIPE = {"GGML_VK_VISIBLE_DEVICES": "0"}


@pytest.fixture(scope="module")
def on_lavapipe(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, gemma_path: Path) -> Iterator[Server]:
    """A server whose runners use the Vulkan companion: SmolLM2 with 5 layers on it (its model
    settings), Gemma with as many as fit (the default)."""
    folder = vulkan_companion()
    env = {
        **LAVAPIPE,
        "LOCOPILOT_BACKENDS_DIR": str(folder),
        "LOCOPILOT_MODEL_SETTINGS": json.dumps({"smollm2*": {"gpu_layers": 5}}),
    }
    running = start_server(tmp_path_factory, {SMOL: smollm2_path, GEMMA: gemma_path}, env)
    yield running
    running.stop()


@pytest.mark.slow
def test_lavapipe_serves_with_layers_on_it(on_lavapipe: Server) -> None:
    engine = on_lavapipe.engine_health()["engine"]
    assert isinstance(engine, dict)
    (device,) = engine["gpus"]
    assert device["backend"] == "Vulkan"
    assert device["name"] == "Vulkan0"
    assert "llvmpipe" in device["description"]
    assert device["memory_total"] >= device["memory_free"] > 0
    # lavapipe compiles each of ggml's shaders with LLVM at a runner's first request: minutes here.
    client = on_lavapipe.client().with_options(timeout=900)
    offload: dict[str, tuple[int, str]] = {}
    for model in (SMOL, GEMMA):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
        )
        assert reply.choices[0].message.content
        # Read at once: loading the second model may unload the first (the memory check).
        runners = on_lavapipe.engine_health()["engine"]["runners"]  # type: ignore[index]
        offload |= {r["model"]: (r["gpu_layers"], r["offload"]) for r in runners}
    layers, why = offload[SMOL]
    assert layers == 5
    assert why.startswith("5 of 31 layers on Vulkan0 (llvmpipe")
    assert why.endswith(": set")
    # Gemma 3 270M: 18 layers and the output layer, far less than the 2 GiB lavapipe reports.
    layers, why = offload[GEMMA]
    assert layers == 19
    assert re.match(r"19 of 19 layers on Vulkan0 \(llvmpipe.*\): automatic, for [\d.]+ GiB free", why)


@pytest.mark.slow
def test_doctor_names_the_gpu_and_its_memory(on_lavapipe: Server) -> None:
    env = {**on_lavapipe.env, "COLUMNS": "400"}  # rich wraps the table at the terminal's width
    result = subprocess.run(
        [sys.executable, "-m", "locopilot", "doctor"], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    line = next((line for line in result.stdout.splitlines() if line.strip().startswith("GPU")), "")
    assert re.search(r"GPU\s+ok\s+Vulkan0 llvmpipe.*: [\d.]+ GiB free of [\d.]+ GiB", line), result.stdout
