"""GGUF conversions around training: the base to F32, and the trained model back to a servable file.

``llama_model_save_to_file`` writes the tensors and a tokenizer, but drops the chat template
and most ``general.*`` keys, records the training context as the context length, and writes
a key for every hyperparameter llama.cpp knows (softcapping, MoE, ...) with its default.
:func:`export` quantizes the trained F32 file and then rewrites it with the base's keys
(see :func:`copy_metadata`), using gguf-py's writer. gguf-py's reader trusts the lengths it
reads; the base's header has already passed :func:`locopilot.models.gguf.read_header`'s bounds
checks, and the other file is our own.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

#: Keys that describe the tensors actually in the file; never taken from the base.
OWN_KEYS = frozenset({"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"})


def quantize(source: Path, target: Path, ftype: int, *, threads: int = 0) -> None:
    """``llama_model_quantize`` every tensor of ``source`` to ``ftype`` (a llama_ftype); raises RuntimeError."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    if ftype == 0:
        params.pure = True  # ALL_F32: every tensor, norms and embeddings included
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not convert {source.name} (status {status})")


def to_f32(base: Path, target: Path, *, threads: int = 0) -> None:
    """The base as F32: llama.cpp's optimizer only trains F32 tensors."""
    quantize(base, target, 0, threads=threads)


def copy_metadata(source: Path, base: Path, target: Path) -> None:
    """Write ``target``: ``source``'s tensors, with the base's keys except the ones describing the tensors.

    Training changes weights, never the architecture's hyperparameters or the tokenizer, so the
    base's keys are the model's description; the saved file's own are llama.cpp's defaults for
    every hyperparameter it knows, the training context as ``context_length``, and no template.
    """
    import gguf

    reader = gguf.GGUFReader(source)
    base_reader = gguf.GGUFReader(base)
    arch_field = base_reader.get_field("general.architecture")
    if arch_field is None:
        raise RuntimeError(f"{base.name} has no general.architecture")
    writer = gguf.GGUFWriter(target, arch=str(arch_field.contents()), endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in base_reader.fields.values():
        # GGUF.* are the reader's own; the writer writes general.architecture itself.
        if field.name.startswith("GGUF.") or field.name in OWN_KEYS:
            continue
        add_field(writer, field)
    for name in sorted(OWN_KEYS - {"general.architecture"}):
        own = reader.get_field(name)
        if own is not None:
            add_field(writer, own)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def add_field(writer: Any, field: Any) -> None:
    import gguf

    value_type = field.types[0]
    if value_type == gguf.GGUFValueType.ARRAY and not field.data:
        return  # gguf-py cannot write an empty array (it cannot know the element type); llama.cpp reads it as absent
    sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def export(trained: Path, base: Path, output: Path, output_type: str, *, threads: int = 0) -> None:
    """The trained F32 file as ``output``: quantized to ``output_type``, the base's metadata restored.

    ``output`` appears whole or not at all (written under a hidden name, then renamed).
    """
    from locopilot.training.trainer import OUTPUT_TYPES

    quantized = trained.with_name(f"{trained.stem}-{output_type}.gguf")
    quantize(trained, quantized, OUTPUT_TYPES[output_type], threads=threads)
    partial = output.with_name(f".{output.name}.partial")
    try:
        copy_metadata(quantized, base, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)
