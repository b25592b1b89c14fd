"""How many of a model's layers the runner puts on the GPUs.

``LOCOPILOT_GPU_LAYERS`` (or the model's ``gpu_layers`` in ``LOCOPILOT_MODEL_SETTINGS``)
set to a number gives that many; -1, the default, gives as many as the GPUs' free
memory holds (:func:`fitting_layers`), counting for each layer its share of the weights
and its KV cache (``models/memory.estimate``), after the compute buffers and a margin.

llama.cpp counts a model's repeating layers (``block_count``) and one more, the output
layer: ``n_gpu_layers`` of ``block_count + 1`` or more puts the whole model on the GPUs,
and the first layer offloaded is the output layer, then the last repeating ones.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from locopilot.engine.protocol import GpuDevice, Load
from locopilot.models.gguf import GGUFError
from locopilot.models.memory import estimate, gib, model_header
from locopilot.settings import ModelRuntime

#: Device memory kept free beyond the estimate: the larger of this and MARGIN_SHARE of the free memory.
MARGIN_BYTES = 256 * 1024 * 1024
MARGIN_SHARE = 0.05
#: ``n_gpu_layers`` that llama.cpp reads as "every layer" (what -1 means for it).
ALL_LAYERS = 0x7FFFFFFF


class Placement(msgspec.Struct, frozen=True):
    """``layers``: llama.cpp's ``n_gpu_layers``; ``on_gpu``: how many that is for this model; ``reason``: why."""

    layers: int
    on_gpu: int
    reason: str


def fitting_layers(*, block_count: int, weights: int, kv_cache: int, compute: int, free: int) -> int:
    """The most layers (of ``block_count + 1``, the output layer counted) whose weights and KV cache
    fit in ``free`` bytes after ``compute`` bytes of buffers and a margin; 0 when none does.

    Each layer is taken to hold an equal share of ``weights``; the KV cache is spread over the
    repeating layers only (the output layer has none).
    """
    units = block_count + 1
    room = free - compute - max(MARGIN_BYTES, int(free * MARGIN_SHARE))
    if room <= 0:
        return 0
    per_layer = weights / units + (kv_cache / block_count if block_count else 0)
    if per_layer <= 0:
        return units
    return min(units, int(room // per_layer))


def choose(load: Load, gpus: list[GpuDevice]) -> Placement:
    """The layers of ``load``'s model to put on ``gpus`` (all of them together, as llama.cpp splits
    layers across every GPU it has); 0 without a GPU."""
    if not gpus:
        return Placement(0, 0, "no GPU: every layer on the CPU")
    names = ", ".join(f"{g.name} ({g.description})" for g in gpus)
    try:
        header = model_header(Path(load.model_path))
    except (GGUFError, OSError) as exc:
        layers = ALL_LAYERS if load.gpu_layers < 0 else load.gpu_layers
        return Placement(layers, 0, f"the model's header does not read ({exc}); n_gpu_layers {load.gpu_layers}")
    runtime = ModelRuntime(
        ctx_size=load.ctx_size,
        parallel=load.parallel,
        gpu_layers=load.gpu_layers,
        threads=load.threads,
        decode_threads=load.decode_threads,
        idle_ttl=0,
        keep_loaded=False,
    )
    need = estimate(header, runtime)
    count = header.metadata.get(f"{header.architecture}.block_count")
    block_count = count if isinstance(count, int) and not isinstance(count, bool) else 0
    units = block_count + 1
    if load.gpu_layers >= 0:
        on_gpu = min(load.gpu_layers, units)
        return Placement(load.gpu_layers, on_gpu, f"{on_gpu} of {units} layers on {names}: set")
    free = sum(g.memory_free for g in gpus)
    on_gpu = fitting_layers(
        block_count=block_count, weights=need.weights, kv_cache=need.kv_cache, compute=need.compute, free=free
    )
    why = (
        f"{on_gpu} of {units} layers on {names}: automatic, for {gib(free)} free "
        f"(weights {gib(need.weights)}, KV cache {gib(need.kv_cache)}, compute {gib(need.compute)})"
    )
    return Placement(ALL_LAYERS if on_gpu == units else on_gpu, on_gpu, why)
