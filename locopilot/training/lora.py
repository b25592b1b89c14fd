"""GGUF LoRA adapters as llama.cpp loads them at run time, and merging one into its base.

The format (llama.cpp's ``src/llama-adapter.cpp`` reads it, ``convert_lora_to_gguf.py`` writes it):

- keys: ``general.architecture`` (the base's: llama.cpp refuses another), ``general.type =
  "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (f32);
- for each adapted base tensor ``W`` (numpy shape ``(n_out, n_in)``, ggml's ``ne = [n_in, n_out]``),
  ``<W's name>.lora_a`` of shape ``(r, n_in)`` and ``<W's name>.lora_b`` of shape ``(n_out, r)``.
  llama.cpp computes ``W·x + s·B·(A·x)`` with ``s = alpha / r``, or ``s = 1`` when alpha is 0,
  times the scale the context gives the adapter (1 here). So the weight it serves is
  ``W + s·B·A``, which :func:`merge` writes out.

locopilot adds ``locopilot.adapter.base``: the base model's name in the models folder, which
serves the adapter (the catalog reads it). Tensors are written as F32; an adapter of rank 8 on
every projection of SmolLM2-135M is about 10 MB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from locopilot.errors import InvalidRequest

if TYPE_CHECKING:
    import numpy as np

    from locopilot.models.catalog import ModelCatalog, ModelEntry

ADAPTER_TYPE = "adapter"
BASE_KEY = "locopilot.adapter.base"
#: Merged tensors' type: as the base had it (requantized where gguf-py can), or F16, or F32.
MergeType = Literal["f32", "f16", "source"]


class AdapterError(InvalidRequest):
    """A file is not a LoRA adapter this base can take (400)."""


@dataclass
class Adapter:
    """A LoRA adapter: ``pairs`` maps a base tensor's GGUF name to its ``(A, B)`` (float32)."""

    architecture: str
    base: str
    alpha: float = 0.0
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def scale(self, name: str) -> float:
        """``s`` for tensor ``name`` (see the module docstring)."""
        a, _ = self.pairs[name]
        return self.alpha / a.shape[0] if self.alpha else 1.0

    def delta(self, name: str) -> np.ndarray:
        """``s·B·A``: what the adapter adds to tensor ``name`` (float32, the base tensor's shape)."""
        a, b = self.pairs[name]
        delta: np.ndarray = (self.scale(name) * (b @ a)).astype("float32")
        return delta

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.pairs.values()), default=0)


def write(path: Path, adapter: Adapter) -> None:
    """Write ``adapter`` as a GGUF LoRA adapter at ``path`` (under a hidden name, then renamed)."""
    import gguf
    import numpy as np

    if not adapter.pairs:
        raise AdapterError("an adapter needs at least one pair of tensors")
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, arch=adapter.architecture)
    try:
        writer.add_type(ADAPTER_TYPE)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        writer.add_string(BASE_KEY, adapter.base)
        for name in sorted(adapter.pairs):
            a, b = adapter.pairs[name]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise AdapterError(f"{name}: A {a.shape} and B {b.shape} are not a rank-r pair (r, n_in), (n_out, r)")
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read(path: Path) -> Adapter:
    """The adapter in ``path``; AdapterError if it is not a GGUF LoRA adapter."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise AdapterError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    if _value(reader, "general.type") != ADAPTER_TYPE or _value(reader, gguf.Keys.Adapter.TYPE) != "lora":
        raise AdapterError(f"{path.name} is not a LoRA adapter (general.type 'adapter', adapter.type 'lora')")
    adapter = Adapter(
        architecture=str(_value(reader, "general.architecture") or ""),
        base=str(_value(reader, BASE_KEY) or ""),
        alpha=float(_value(reader, gguf.Keys.Adapter.LORA_ALPHA) or 0.0),
    )
    halves: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        stem, _, half = tensor.name.rpartition(".")
        if half not in ("lora_a", "lora_b"):
            continue
        data = tensor.data
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.dequantize(data, tensor.tensor_type)
        halves.setdefault(stem, {})[half] = np.asarray(data, dtype=np.float32)
    for stem, pair in halves.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{path.name}: the pair for {stem} is missing one of lora_a, lora_b")
        adapter.pairs[stem] = (pair["lora_a"], pair["lora_b"])
    return adapter


def base_of(metadata: dict[str, Any]) -> str | None:
    """The base model's name if ``metadata`` (a GGUF header's) is a locopilot LoRA adapter's, else None."""
    if metadata.get("general.type") != ADAPTER_TYPE:
        return None
    base = metadata.get(BASE_KEY)
    return base if isinstance(base, str) and base else None


def check_fits(adapter: Adapter, base: Path) -> None:
    """AdapterError unless every pair matches a tensor of ``base`` (same architecture, shapes)."""
    import gguf

    reader = gguf.GGUFReader(base)
    arch = _value(reader, "general.architecture")
    if arch != adapter.architecture:
        raise AdapterError(f"the adapter is for {adapter.architecture!r} models, the base is {arch!r}")
    shapes = {tensor.name: _shape(tensor) for tensor in reader.tensors}
    for name, (a, b) in adapter.pairs.items():
        if name not in shapes:
            raise AdapterError(f"the base has no tensor {name} for the adapter's pair")
        if (b.shape[0], a.shape[1]) != shapes[name]:
            raise AdapterError(f"{name}: the adapter makes {(b.shape[0], a.shape[1])}, the base has {shapes[name]}")


def merge(base: Path, adapter: Adapter, output: Path, out_type: MergeType = "f32") -> int:
    """Write ``output``: ``base`` with ``W + s·B·A`` for each adapted tensor; returns how many were changed.

    Adapted tensors are dequantized (gguf-py's quants module) and written as F32, F16, or with
    ``source`` requantized to the base's type (which loses a small adapter's change in rounding);
    every other tensor is copied as it is. Raises AdapterError for an adapter that does not fit.
    """
    import gguf
    import numpy as np

    from locopilot.training.export import add_field

    check_fits(adapter, base)
    reader = gguf.GGUFReader(base)
    partial = output.with_name(f".{output.name}.partial")
    writer = gguf.GGUFWriter(partial, arch=adapter.architecture, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    try:
        for item in reader.fields.values():
            # GGUF.* are the reader's own; the writer writes general.architecture itself.
            if not item.name.startswith("GGUF.") and item.name != "general.architecture":
                add_field(writer, item)
        changed = 0
        for tensor in reader.tensors:
            if tensor.name not in adapter.pairs:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
                continue
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            weight += adapter.delta(tensor.name)
            changed += 1
            if out_type == "f32":
                writer.add_tensor(tensor.name, weight)
            elif out_type == "f16" or tensor.tensor_type == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, weight.astype(np.float16))
            else:
                try:
                    packed = gguf.quants.quantize(weight, tensor.tensor_type)
                except NotImplementedError as exc:
                    raise AdapterError(
                        f"{tensor.name} is {tensor.tensor_type.name}, which gguf-py cannot quantize; merge as f16"
                    ) from exc
                writer.add_tensor(tensor.name, packed, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return changed


def extract(base: Path, tuned: Path, rank: int, base_name: str) -> Adapter:
    """The rank-``rank`` adapter closest to what training changed: for each matrix that differs
    between the F32 files ``base`` and ``tuned``, the truncated SVD of ``W_tuned - W_base``
    (``A`` the top right singular vectors, ``B`` the left ones times the singular values; alpha 0,
    so ``s = 1``). Vectors (norms) that training changed are not kept: llama.cpp's adapters
    carry matrices only."""
    import gguf
    import numpy as np

    before = {tensor.name: tensor for tensor in gguf.GGUFReader(base).tensors}
    reader = gguf.GGUFReader(tuned)
    adapter = Adapter(architecture=str(_value(reader, "general.architecture")), base=base_name)
    for tensor in reader.tensors:
        old = before.get(tensor.name)
        if old is None or len(tensor.shape) != 2 or tensor.name.startswith("token_embd"):
            continue
        delta = np.asarray(tensor.data, dtype=np.float32) - np.asarray(old.data, dtype=np.float32)
        if not delta.any():
            continue
        u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
        r = min(rank, sigma.size)
        adapter.pairs[tensor.name] = (vt[:r].copy(), (u[:, :r] * sigma[:r]).astype(np.float32))
    if not adapter.pairs:
        raise AdapterError("training changed no matrix: there is no adapter to extract")
    return adapter


def _shape(tensor: Any) -> tuple[int, ...]:
    """A GGUFReader tensor's numpy shape (rows first), whatever its type."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _value(reader: Any, key: str) -> Any:
    found = reader.get_field(key)
    return None if found is None else found.contents()


def merge_model(catalog: ModelCatalog, adapter_name: str, name: str | None, out_type: MergeType = "f16") -> ModelEntry:
    """Merge the adapter ``adapter_name`` of the models folder into its base, as the model ``name``
    (default ``<adapter>-merged``); InvalidRequest for a model that is not an adapter, or a name taken."""
    entry = catalog.get(adapter_name)
    if entry.adapter_of is None:
        raise AdapterError(f"The model '{adapter_name}' is not a LoRA adapter", param="model")
    target = catalog.path_for(name or f"{adapter_name}-merged")
    if target.is_symlink() or target.exists():
        raise AdapterError(f"The model '{target.stem}' already exists", param="name")
    merge(catalog.load_path(entry.adapter_of), read(catalog.load_path(adapter_name)), target, out_type)
    return catalog.get(target.stem)
