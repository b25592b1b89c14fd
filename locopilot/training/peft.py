"""LoRA adapters that external frameworks write, to GGUF LoRA, without PyTorch: PEFT's (Unsloth,
Axolotl, Hugging Face PEFT) and MLX-LM's.

A PEFT adapter is a folder with ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``/``alpha_pattern``, ...) and ``adapter_model.safetensors`` holding
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (shape ``(r, n_in)``) and its
``lora_B`` (``(n_out, r)``) for each adapted projection; the served weight is
``W + scale·B·A``. MLX-LM's folder has its own ``adapter_config.json`` (its command's arguments:
``fine_tune_type``, ``lora_parameters`` with ``rank`` and ``scale``) and ``adapters.safetensors``
holding ``model.layers.N.self_attn.q_proj.lora_a`` (``(n_in, r)``) and ``lora_b`` (``(r, n_out)``):
its layer computes ``x·W^T + scale·(x·lora_a)·lora_b``, so PEFT's A and B are ``lora_a^T`` and
``lora_b^T``, with MLX-LM's ``scale`` as it is (not divided by the rank). The safetensors files
are read here with numpy (:func:`read_safetensors`: an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range, then the bytes).

Conversion, as llama.cpp's ``convert_lora_to_gguf.py`` does it:

- Hugging Face module names map to GGUF tensor names (:data:`MODULES`).
- For the ``llama`` architecture, ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj`` and
  ``k_proj`` (the rotary halves interleaved, per head); ``lora_B`` holds those rows, so it gets
  the same permutation (:func:`permute`), with ``head_count`` for q and ``head_count_kv`` for k.
- PEFT's scale per module (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, per-module ranks and
  alphas from the patterns) is folded into ``lora_B`` and the GGUF says ``alpha = 0`` (llama.cpp's
  scale 1), so every module keeps its own scale exactly.

Refused with a clear error: DoRA (``use_dora``; MLX-LM's ``fine_tune_type`` ``dora``),
``modules_to_save`` and MLX-LM's ``full`` (full weights, not LoRA), embedding adapters,
``fan_in_fan_out``, and architectures whose conversion is not known here.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from locopilot.training import lora
from locopilot.training.lora import Adapter, AdapterError, check_fits

if TYPE_CHECKING:
    import numpy as np

    from locopilot.models.catalog import ModelCatalog, ModelEntry

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
#: A safetensors header larger than this is refused before it is read.
MAX_HEADER = 64 * 1024 * 1024
#: Hugging Face module (its last two names) -> GGUF tensor in block N.
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: Architectures converted here, and whether their q/k rows are permuted (convert_hf_to_gguf's LlamaModel).
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
_NAME = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")
_MLX_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([ab])$")
_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor in a safetensors file, as float32; AdapterError for a malformed file."""
    import numpy as np

    data = path.read_bytes()
    if len(data) < 8:
        raise AdapterError(f"{path.name} is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER, len(data) - 8):
        raise AdapterError(f"{path.name}: its header length ({length}) does not fit the file")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise AdapterError(f"{path.name}: its header is not JSON: {exc}") from exc
    body = memoryview(data)[8 + length :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise AdapterError(f"{path.name}: {name} has dtype {info.get('dtype')!r}; F32, F16, BF16, F64 are read")
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(body) or end - begin != count * np.dtype(dtype).itemsize:
            raise AdapterError(f"{path.name}: {name}'s byte range does not match its shape or the file")
        raw = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float32)
    return tensors


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's llama q/k permutation of ``rows`` (per head, the two rotary halves interleaved)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def convert(folder: Path, base: Path, base_name: str) -> Adapter:
    """The adapter in ``folder`` (PEFT's or MLX-LM's) as a GGUF LoRA :class:`Adapter` for the GGUF
    model ``base`` (named ``base_name`` in the models folder); AdapterError for what cannot be converted."""
    import gguf

    pairs = hf_pairs(folder)
    reader = gguf.GGUFReader(base)
    arch = str(_field(reader, "general.architecture"))
    if arch not in ARCHITECTURES:
        raise AdapterError(
            f"converting LoRA adapters for {arch!r} models is not supported (only {sorted(ARCHITECTURES)})"
        )
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv") or heads)
    adapter = Adapter(architecture=arch, base=base_name, alpha=0.0)
    for (block, module), (a, b) in sorted(pairs.items()):
        if ARCHITECTURES[arch] and module == "self_attn.q_proj":
            b = permute(b, heads)
        elif ARCHITECTURES[arch] and module == "self_attn.k_proj":
            b = permute(b, kv_heads)
        adapter.pairs[f"blk.{block}.{MODULES[module]}.weight"] = (a, b)
    if not adapter.pairs:
        raise AdapterError(f"{folder} holds no LoRA weights")
    check_fits(adapter, base)
    return adapter


#: One adapted projection: (block, Hugging Face module) -> (A ``(r, n_in)``, B ``(n_out, r)`` with the scale folded in).
Pairs = dict[tuple[str, str], tuple["np.ndarray", "np.ndarray"]]


def hf_pairs(folder: Path) -> Pairs:
    """The adapter in ``folder`` (PEFT's or MLX-LM's) in Hugging Face's terms: each adapted
    projection's change of its weight is ``B @ A``, the scale folded into B."""
    if (folder / WEIGHTS).is_file():
        return _peft_pairs(folder)
    if (folder / MLX_WEIGHTS).is_file():
        return _mlx_pairs(folder)
    raise AdapterError(f"{folder} has neither {WEIGHTS} (PEFT) nor {MLX_WEIGHTS} (MLX-LM)")


def _halves(weights: Path, pattern: re.Pattern[str]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """The safetensors file's tensors by (block, module) and half (``A``/``B``, either case)."""
    halves: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, tensor in read_safetensors(weights).items():
        match = pattern.match(name)
        if match is None or match[2] not in MODULES:
            raise AdapterError(f"{weights.name}: {name} is not a LoRA weight of a projection converted here")
        halves.setdefault((match[1], match[2]), {})[match[3].upper()] = tensor
    for (block, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{weights.name}: layers.{block}.{module} has only one of its two LoRA matrices")
    return halves


def _peft_pairs(folder: Path) -> Pairs:
    config = _peft_config(folder)
    return {
        (block, module): (pair["A"], pair["B"] * _scale(config, f"model.layers.{block}.{module}", pair["A"].shape[0]))
        for (block, module), pair in _halves(folder / WEIGHTS, _NAME).items()
    }


def _mlx_pairs(folder: Path) -> Pairs:
    path = folder / CONFIG
    config = _read_config(folder, f"MLX-LM writes one beside {MLX_WEIGHTS}")
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"{path}: fine_tune_type {kind!r}; only MLX-LM's LoRA adapters (lora) are converted")
    parameters = config.get("lora_parameters")
    scale = parameters.get("scale") if isinstance(parameters, dict) else None
    if not isinstance(scale, int | float):
        raise AdapterError(f"{path}: needs lora_parameters.scale")
    return {
        key: (pair["A"].T.copy(), pair["B"].T * float(scale))
        for key, pair in _halves(folder / MLX_WEIGHTS, _MLX_NAME).items()
    }


def import_folder(catalog: ModelCatalog, folder: Path, base: str, name: str) -> ModelEntry:
    """Convert the adapter in ``folder`` (PEFT's or MLX-LM's) for the model ``base`` and add it to
    the models folder as ``name``."""
    target = catalog.path_for(name)
    if target.is_symlink() or target.exists():
        raise AdapterError(f"The model '{name}' already exists", param="name")
    lora.write(target, convert(folder, catalog.load_path(base), base))
    return catalog.get(name)


def _read_config(folder: Path, missing: str) -> Any:
    """``folder``'s adapter_config.json, parsed; ``missing`` completes the error when there is none."""
    path = folder / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AdapterError(f"{folder} has no {CONFIG}: {missing}") from exc
    except (ValueError, OSError) as exc:
        raise AdapterError(f"{path} is not readable JSON: {exc}") from exc


def _peft_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    config = _read_config(folder, "not a PEFT adapter folder")
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters (peft_type LORA) are converted")
    for key, why in (
        ("use_dora", "DoRA adapters"),
        ("modules_to_save", "modules_to_save (full weights beside the adapter)"),
        ("fan_in_fan_out", "fan_in_fan_out"),
    ):
        if config.get(key):
            raise AdapterError(f"{path}: {why} cannot be served as a GGUF LoRA adapter")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), int | float):
        raise AdapterError(f"{path}: needs r and lora_alpha")
    return config


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scale for ``module`` (``model.layers.N.self_attn.q_proj``) of ``rank``: alpha / r (alpha /
    sqrt(r) with rsLoRA), alpha from ``alpha_pattern`` where a key names the module or its end."""
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _field(reader: Any, key: str) -> Any:
    found = reader.get_field(key)
    return None if found is None else found.contents()
