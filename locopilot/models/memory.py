"""Will a model fit? Its memory estimated from the GGUF header, and what the machine (or cgroup) has free.

:func:`estimate` adds, for the settings a model runs with (:class:`~locopilot.settings.ModelRuntime`):

- weights: the tensor data's size (llama.cpp maps the file; every page is read while generating);
- KV cache: layers x context tokens of every slot x KV heads x (key + value head size) x 2 bytes (f16);
- compute: the logits of one token per slot (vocabulary x slots x 4 bytes), the activations of one
  batch, and :data:`RUNNER_OVERHEAD` for the runner process itself (Python, llama-cpp-python, the
  tokenizer).

:func:`available` is ``MemAvailable`` from ``/proc/meminfo``, lowered to what the cgroup
(v2 ``memory.max`` - ``memory.current``) allows; None where neither can be read (macOS),
and then no check is made. README "Memory check" gives how close the estimate came to
the runner's real RSS for the two test models.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from locopilot.engine.batching import BATCH, DEFAULT_KV_TOKENS, DEFAULT_SLOTS
from locopilot.models.catalog import split_parts
from locopilot.models.gguf import GGUFHeader, read_header
from locopilot.settings import ModelRuntime

RUNNER_OVERHEAD = 96 * 1024 * 1024
KV_BYTES = 2  # f16 cache, llama.cpp's default type
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


class Estimate(msgspec.Struct, frozen=True):
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


def model_header(path: Path) -> GGUFHeader:
    """The header of the model whose (first) file is ``path``, its ``tensor_bytes`` summed over every part
    of a split model (the first part's header counts only its own tensors). Raises as read_header does."""
    header = read_header(path)
    if not isinstance(header.metadata.get("split.count"), int) or header.metadata["split.count"] < 2:
        return header
    parts = split_parts(path)
    return msgspec.structs.replace(header, tensor_bytes=sum(read_header(part).tensor_bytes for part in parts))


def _arch_int(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(f"{header.architecture}.{key}")
    if isinstance(value, list):  # per-layer values (some models vary KV heads by layer)
        numbers = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(numbers) if numbers else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def estimate(header: GGUFHeader, runtime: ModelRuntime) -> Estimate:
    """The memory one runner of this model needs, in bytes (see the module docstring)."""
    n_ctx_slot = runtime.ctx_size or header.context_length or 4096
    slots = runtime.parallel or max(1, min(DEFAULT_SLOTS, DEFAULT_KV_TOKENS // n_ctx_slot))
    layers = _arch_int(header, "block_count") or 0
    embedding = header.embedding_length or 0
    heads = _arch_int(header, "attention.head_count") or 1
    kv_heads = _arch_int(header, "attention.head_count_kv") or heads
    key_size = _arch_int(header, "attention.key_length") or embedding // heads
    value_size = _arch_int(header, "attention.value_length") or embedding // heads
    kv_cache = layers * n_ctx_slot * slots * kv_heads * (key_size + value_size) * KV_BYTES
    vocab = header.metadata.get("tokenizer.ggml.tokens")
    n_vocab = getattr(vocab, "length", 0) or (len(vocab) if isinstance(vocab, list) else 0)
    feed_forward = _arch_int(header, "feed_forward_length") or 4 * embedding
    # Logits are kept for one token per slot (the batcher asks for no more); activations for a whole batch.
    compute = n_vocab * slots * 4 + (2 * feed_forward + 4 * embedding) * BATCH * 4 + RUNNER_OVERHEAD
    return Estimate(header.tensor_bytes, kv_cache, compute)


def available(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> int | None:
    """Bytes a new process may use now; None when unknown."""
    free: int | None = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int((cgroup / "memory.current").read_text().strip())
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return None if free is None else max(0, free)


def gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB"
