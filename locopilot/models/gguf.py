"""A bounded GGUF header reader: metadata and tensor shapes, never tensor data.

gguf-py's reader trusts the lengths it reads (a crafted 60-byte file made it
allocate 3.7 GB), so it is no validator for files we did not make. This reader
checks every count and length against the bytes left in the file *before* it
reads or allocates, caps strings, array nesting and the metadata it keeps, and
raises :class:`GGUFError` for anything malformed, truncated or unsupported.
Work and memory are bounded by the file's size, never by a number in it.

Layout (little-endian, versions 2 and 3)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count * (key: string, type: u32, value)
    tensor_count * (name: string, n_dims: u32, dims: n_dims * u64, type: u32, offset: u64)
    padding to general.alignment, then tensor data (offsets are relative to it)

A string is a u64 byte length then UTF-8 bytes; an array is an element type
(u32), a u64 count, then the elements.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

MAX_TENSORS = 1_000_000
MAX_KV = 100_000
MAX_KEY_BYTES = 65_536
# Chat templates reach ~100 KB; 16 MiB leaves room without letting one value dominate.
MAX_STRING_BYTES = 16 * 1024 * 1024
# All strings kept in metadata together; a header is kilobytes to a few MB in real models.
MAX_KEPT_BYTES = 64 * 1024 * 1024
# Arrays up to this length are kept as lists; longer ones (token lists, scores,
# merges) are skipped and recorded as an ArrayInfo.
MAX_KEPT_ARRAY = 64
MAX_ARRAY_DEPTH = 4
MAX_DIMS = 8
MAX_INT64 = 2**63 - 1
DEFAULT_ALIGNMENT = 32
_CHUNK_BYTES = 1024 * 1024


class GGUFError(ValueError):
    """The file is not a GGUF this reader accepts; the message says what and where."""


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALARS: dict[int, struct.Struct] = {
    ValueType.UINT8: struct.Struct("<B"),
    ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: struct.Struct("<I"),
    ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"),
    ValueType.BOOL: struct.Struct("<?"),
    ValueType.UINT64: struct.Struct("<Q"),
    ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = _SCALARS[ValueType.UINT32]
_U64 = _SCALARS[ValueType.UINT64]

# The fewest bytes one element of each type can occupy: a string is at least its
# length prefix, an array at least its type and count.
_MIN_SIZE: dict[int, int] = {t: s.size for t, s in _SCALARS.items()} | {ValueType.STRING: 8, ValueType.ARRAY: 12}

# llama.cpp's llama_ftype, stored as general.file_type.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4",
}

# ggml_type → (elements per block, bytes per block), to find where a tensor's data
# ends: a file cut short inside its tensor data is refused here rather than
# crashing the engine at load. A type missing here (newer than this table) is
# not refused; only its offset is checked.
TENSOR_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}


class ArrayInfo(msgspec.Struct, frozen=True):
    """Stands in :attr:`GGUFHeader.metadata` for an array too long to keep: its element type and length."""

    type: int
    length: int


class GGUFHeader(msgspec.Struct, frozen=True):
    """What a GGUF says about itself.

    ``metadata`` maps each key to an int, float, bool, str, a list (arrays of at
    most ``MAX_KEPT_ARRAY`` elements) or an :class:`ArrayInfo` (longer arrays,
    e.g. ``tokenizer.ggml.tokens``, whose values were skipped).
    ``parameter_count`` is the sum over tensors of the product of their dims.
    """

    version: int
    tensor_count: int
    metadata: dict[str, Any]
    parameter_count: int
    tensor_bytes: int = 0
    """The tensor data's size in bytes (tensors of a type this reader does not know count 0)."""

    @property
    def architecture(self) -> str | None:
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        return self._str("general.name")

    @property
    def context_length(self) -> int | None:
        return self._arch_int("context_length")

    @property
    def embedding_length(self) -> int | None:
        return self._arch_int("embedding_length")

    @property
    def quantization(self) -> str | None:
        """llama.cpp's name for ``general.file_type`` (``Q4_K_M``), ``unknown(N)``, or None if absent."""
        file_type = self._int("general.file_type")
        if file_type is None:
            return None
        return FILE_TYPES.get(file_type, f"unknown({file_type})")

    @property
    def chat_template(self) -> str | None:
        return self._str("tokenizer.chat_template")

    @property
    def bos_token_id(self) -> int | None:
        return self._int("tokenizer.ggml.bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        return self._int("tokenizer.ggml.eos_token_id")

    def _str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None

    def _int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        # bool is an int subclass; a bool where a number belongs is not a number.
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _arch_int(self, suffix: str) -> int | None:
        arch = self.architecture
        return self._int(f"{arch}.{suffix}") if arch else None


def read_header(path: Path) -> GGUFHeader:
    """Read and validate the header of the GGUF at ``path``.

    Raises :class:`GGUFError` if the file is malformed, truncated (including
    tensor data that ends past the end of the file) or of an unsupported
    version or byte order; ``OSError`` if it cannot be opened or read.
    """
    with path.open("rb") as f:
        reader = _Reader(f, os.fstat(f.fileno()).st_size)
        return _parse(reader)


class _Reader:
    """Reads from a file while tracking the position itself, refusing any read past the end."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size
        self.pos = 0
        self.kept = 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise GGUFError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, {self.remaining} left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise GGUFError(f"file shrank while reading {what} at offset {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self._f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALARS[vtype]
        return fmt.unpack(self.take(fmt.size, what))[0]

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack(self.take(8, what))[0]
        return value

    def string_length(self, what: str, limit: int) -> int:
        at = self.pos
        n = self.u64(f"{what} length")
        if n > limit:
            raise GGUFError(f"{what} at offset {at} is {n} bytes, over the {limit}-byte limit")
        self.need(n, what)
        return n

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` strings, walking their lengths in 1 MiB chunks.

        A tokenizer holds ~10⁵ strings; one read and seek per string took seconds.
        """
        pos = self.pos
        chunk = b""
        chunk_start = pos
        for n in range(count):
            if pos + 8 > chunk_start + len(chunk):
                self._f.seek(pos)
                chunk = self._f.read(min(_CHUNK_BYTES, self.size - pos))
                chunk_start = pos
                if len(chunk) < 8:
                    raise GGUFError(f"truncated file: {what}[{n}] length at offset {pos}, {self.size - pos} bytes left")
            (length,) = _U64.unpack_from(chunk, pos - chunk_start)
            if length > MAX_STRING_BYTES:
                raise GGUFError(
                    f"{what}[{n}] at offset {pos} is {length} bytes, over the {MAX_STRING_BYTES}-byte limit"
                )
            pos += 8 + length
            if pos > self.size:
                raise GGUFError(f"truncated file: {what}[{n}] ends at offset {pos}, file has {self.size} bytes")
        self._f.seek(pos)
        self.pos = pos

    def string(self, what: str, limit: int) -> bytes:
        n = self.string_length(what, limit)
        self.kept += n
        if self.kept > MAX_KEPT_BYTES:
            raise GGUFError(f"metadata strings exceed {MAX_KEPT_BYTES} bytes at offset {self.pos}")
        return self.take(n, what)


def _parse(r: _Reader) -> GGUFHeader:
    if r.take(4, "magic") != MAGIC:
        raise GGUFError("not a GGUF file: bad magic")
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise GGUFError(f"big-endian GGUF (version {swapped}) is not supported")
        raise GGUFError(f"GGUF version {version} is not supported (only {' and '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count = r.u64("tensor count")
    kv_count = r.u64("metadata count")
    if tensor_count > MAX_TENSORS:
        raise GGUFError(f"tensor count {tensor_count} is over the limit of {MAX_TENSORS}")
    if kv_count > MAX_KV:
        raise GGUFError(f"metadata count {kv_count} is over the limit of {MAX_KV}")
    # key length (8) + type (4) + the smallest value (1)
    r.need(kv_count * 13, f"{kv_count} metadata entries")

    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        at = r.pos
        key_bytes = r.string(f"metadata key {i}", MAX_KEY_BYTES)
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"metadata key {i} at offset {at} is not UTF-8") from exc
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r} at offset {at}")
        vtype = r.u32(f"type of {key!r}")
        metadata[key] = _value(r, vtype, key, depth=0)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment must be a positive power of two, got {alignment!r}")

    # name length (8) + n_dims (4) + type (4) + offset (8)
    r.need(tensor_count * 24, f"{tensor_count} tensor infos")
    parameter_count = 0
    tensor_bytes = 0
    data_end = 0
    for i in range(tensor_count):
        at = r.pos
        r.skip(r.string_length(f"tensor {i} name", MAX_KEY_BYTES), f"tensor {i} name")
        n_dims = r.u32(f"tensor {i} n_dims")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"tensor {i} at offset {at} has {n_dims} dimensions, over the limit of {MAX_DIMS}")
        dims = [r.u64(f"tensor {i} dims") for _ in range(n_dims)]
        ggml_type = r.u32(f"tensor {i} type")
        offset = r.u64(f"tensor {i} offset")
        elements = 1
        for dim in dims:
            elements *= dim
            if elements > MAX_INT64:
                raise GGUFError(f"tensor {i} at offset {at} has too many elements: dims {dims}")
        parameter_count += elements
        block = TENSOR_BLOCKS.get(ggml_type)
        if block is None:
            data_end = max(data_end, offset)
            continue
        per_block, block_bytes = block
        row = dims[0] if dims else 1
        if row % per_block:
            raise GGUFError(f"tensor {i} at offset {at}: first dim {row} is not a multiple of block size {per_block}")
        data_end = max(data_end, offset + elements // per_block * block_bytes)
        tensor_bytes += elements // per_block * block_bytes

    data_start = -(-r.pos // alignment) * alignment
    # With no tensor bytes to place, a file may end before the padding that would precede them.
    if data_end and data_start + data_end > r.size:
        raise GGUFError(f"truncated file: tensor data ends at byte {data_start + data_end}, file has {r.size}")
    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        metadata=metadata,
        parameter_count=parameter_count,
        tensor_bytes=tensor_bytes,
    )


def _value(r: _Reader, vtype: int, what: str, *, depth: int) -> Any:
    """Read one value of ``vtype``: arrays longer than ``MAX_KEPT_ARRAY`` become an ArrayInfo."""
    if vtype in _SCALARS:
        return r.scalar(vtype, what)
    if vtype == ValueType.STRING:
        # Values are bytes to llama.cpp; a stray invalid byte should not make a model unlistable.
        return r.string(what, MAX_STRING_BYTES).decode("utf-8", "replace")
    if vtype != ValueType.ARRAY:
        raise GGUFError(f"{what}: unknown value type {vtype} at offset {r.pos - 4}")
    if depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {r.pos}")
    element_type = r.u32(f"{what} element type")
    min_size = _MIN_SIZE.get(element_type)
    if min_size is None:
        raise GGUFError(f"{what}: unknown array element type {element_type} at offset {r.pos - 4}")
    count = r.u64(f"{what} length")
    r.need(count * min_size, f"{what} ({count} elements)")
    if count <= MAX_KEPT_ARRAY:
        return [_value(r, element_type, f"{what}[{n}]", depth=depth + 1) for n in range(count)]
    _skip_array(r, element_type, count, what, depth=depth + 1)
    return ArrayInfo(element_type, count)


def _skip_array(r: _Reader, element_type: int, count: int, what: str, *, depth: int) -> None:
    """Move past ``count`` elements without keeping them; each is still bounds-checked."""
    if element_type in _SCALARS:
        r.skip(count * _SCALARS[element_type].size, what)
    elif element_type == ValueType.STRING:
        r.skip_strings(count, what)
    else:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {r.pos}")
        for n in range(count):
            inner_type = r.u32(f"{what}[{n}] element type")
            min_size = _MIN_SIZE.get(inner_type)
            if min_size is None:
                raise GGUFError(f"{what}[{n}]: unknown array element type {inner_type} at offset {r.pos - 4}")
            inner_count = r.u64(f"{what}[{n}] length")
            r.need(inner_count * min_size, f"{what}[{n}] ({inner_count} elements)")
            _skip_array(r, inner_type, inner_count, f"{what}[{n}]", depth=depth + 1)
