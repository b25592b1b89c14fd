"""The bounded GGUF header reader, on files written by gguf-py and on crafted hostile ones."""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from locopilot.models.gguf import (
    FILE_TYPES,
    MAX_KEPT_ARRAY,
    TENSOR_BLOCKS,
    ArrayInfo,
    GGUFError,
    GGUFHeader,
    ValueType,
    read_header,
)

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    template: str | None = TEMPLATE,
    tokens: int = 1000,
    file_type: int = 15,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """A small valid GGUF: metadata, a tokenizer of ``tokens`` strings, two f32 tensors (4x8 and 8: 40 params).

    Both tensors are multiples of the 32-byte alignment, so the file ends exactly
    where the last tensor's data does and every shorter prefix is truncated.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("Tiny Test")
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_file_type(file_type)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_token_list([f"tok{i}" for i in range(tokens)])
    writer.add_token_scores([float(i) for i in range(tokens)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if extra is not None:
        extra(writer)
    writer.add_tensor("weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("bias", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


def test_reads_metadata(model: Path) -> None:
    header = read_header(model)
    assert header.version == 3
    assert header.tensor_count == 2
    assert header.parameter_count == 40
    assert header.architecture == "llama"
    assert header.name == "Tiny Test"
    assert header.context_length == 2048
    assert header.embedding_length == 64
    assert header.quantization == "Q4_K_M"
    assert header.chat_template == TEMPLATE
    assert header.bos_token_id == 1
    assert header.eos_token_id == 2


def test_long_arrays_are_skipped_but_measured(tmp_path: Path) -> None:
    def arrays(writer: gguf.GGUFWriter) -> None:
        writer.add_array("test.short", [1, 2, 3])
        writer.add_array("test.edge", list(range(MAX_KEPT_ARRAY)))
        writer.add_array("test.long", list(range(MAX_KEPT_ARRAY + 1)))
        writer.add_array("test.words", ["a", "bc"])

    header = read_header(write_gguf(tmp_path / "a.gguf", extra=arrays))
    assert header.metadata["tokenizer.ggml.tokens"] == ArrayInfo(ValueType.STRING, 1000)
    assert header.metadata["tokenizer.ggml.scores"] == ArrayInfo(ValueType.FLOAT32, 1000)
    assert header.metadata["test.short"] == [1, 2, 3]
    assert header.metadata["test.edge"] == list(range(MAX_KEPT_ARRAY))
    assert header.metadata["test.long"] == ArrayInfo(ValueType.INT32, MAX_KEPT_ARRAY + 1)
    assert header.metadata["test.words"] == ["a", "bc"]
    # Values after the skipped arrays are still read in place.
    assert header.bos_token_id == 1


@pytest.mark.parametrize(
    ("file_type", "expected"),
    [(0, "F32"), (2, "Q4_0"), (7, "Q8_0"), (15, "Q4_K_M"), (32, "BF16"), (38, "MXFP4"), (99, "unknown(99)")],
)
def test_quantization_names(file_type: int, expected: str) -> None:
    header = GGUFHeader(3, 0, {"general.file_type": file_type}, 0)
    assert header.quantization == expected


def test_file_types_follow_llama_cpp() -> None:
    names = {
        int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for t in gguf.LlamaFileType
        if t.name != "GUESSED" and t.name != "MOSTLY_MXFP4_MOE"
    }
    for number, name in FILE_TYPES.items():
        if number != 38:
            assert names[number] == name


def test_tensor_block_sizes_follow_ggml() -> None:
    for ggml_type, block in TENSOR_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)] == block


def test_absent_fields_are_none() -> None:
    header = GGUFHeader(3, 0, {"general.architecture": "llama", "llama.context_length": True}, 0)
    assert header.quantization is None
    assert header.context_length is None  # a bool is not a length
    assert header.embedding_length is None
    assert header.chat_template is None
    assert header.bos_token_id is None
    assert GGUFHeader(3, 0, {"llama.context_length": 5}, 0).context_length is None  # no architecture


def test_version_2_is_accepted(model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    model.write_bytes(bytes(data))
    assert read_header(model).version == 2


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GGML\x03\x00\x00\x00", "bad magic"),
        (b"GGUF\x01\x00\x00\x00", "version 1 is not supported"),
        (b"GGUF\x04\x00\x00\x00", "version 4 is not supported"),
        (b"GGUF\x00\x00\x00\x03", "big-endian"),
    ],
)
def test_refuses_other_formats(model: Path, head: bytes, message: str) -> None:
    model.write_bytes(head + model.read_bytes()[8:])
    with pytest.raises(GGUFError, match=message):
        read_header(model)


def test_truncation_is_a_gguf_error(tmp_path: Path, model: Path) -> None:
    data = model.read_bytes()
    cut = tmp_path / "cut.gguf"
    # Every cut through the header, template and the start of the token list; a
    # sample through the rest; every cut through the tensor infos and data.
    sizes = [*range(512), *range(512, len(data) - 600, 41), *range(len(data) - 600, len(data))]
    for size in sizes:
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFError):
            read_header(cut)


def test_mutations_raise_only_gguf_errors(tmp_path: Path, model: Path) -> None:
    data = model.read_bytes()
    header_end = len(data) - 160  # the tensor data: mutations there are not the reader's business
    rng = random.Random(1234)
    mutant = tmp_path / "mutant.gguf"
    failures = 0
    for _ in range(400):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(header_end)] = rng.randrange(256)
        mutant.write_bytes(bytes(buf))
        try:
            read_header(mutant)
        except GGUFError:
            failures += 1
    assert failures > 0


# Crafted files, byte by byte.


def _str(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _kv(key: bytes, vtype: int, value: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + value


def _file(*kvs: bytes, tensors: bytes = b"", n_tensors: int = 0, n_kv: int | None = None) -> bytes:
    count = len(kvs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, count) + b"".join(kvs) + tensors


def _tensor(name: bytes, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def _array(element_type: int, count: int, body: bytes = b"") -> bytes:
    return struct.pack("<IQ", element_type, count) + body


def _nested(depth: int) -> bytes:
    value = _array(ValueType.UINT8, 1, b"\x01")
    for _ in range(depth - 1):
        value = _array(ValueType.ARRAY, 1, value)
    return value


HOSTILE: dict[str, tuple[bytes, str]] = {
    "key claims 2^60 bytes": (_file(struct.pack("<Q", 2**60) + b"k" * 20), "over the 65536-byte limit"),
    "key longer than the file": (_file(struct.pack("<Q", 1000) + b"k" * 20), "truncated"),
    "string claims 2^60 bytes": (_file(_kv(b"k", ValueType.STRING, struct.pack("<Q", 2**60))), "over the"),
    "string longer than the file": (_file(_kv(b"k", ValueType.STRING, struct.pack("<Q", 10_000) + b"x")), "truncated"),
    "2^40 uint8 array": (_file(_kv(b"k", ValueType.ARRAY, _array(ValueType.UINT8, 2**40))), "2^40"),
    "2^40 string array": (_file(_kv(b"k", ValueType.ARRAY, _array(ValueType.STRING, 2**40))), "2^40"),
    "2^40 nested arrays": (_file(_kv(b"k", ValueType.ARRAY, _array(ValueType.ARRAY, 2**40))), "2^40"),
    "string in skipped array claims 2^60": (
        _file(_kv(b"k", ValueType.ARRAY, _array(ValueType.STRING, 100, struct.pack("<Q", 2**60) + b"\0" * 800))),
        "over the",
    ),
    "arrays nested too deep": (_file(_kv(b"k", ValueType.ARRAY, _nested(5))), "nested deeper"),
    "2^50 tensors": (_file(n_tensors=2**50), "tensor count"),
    "2^40 metadata entries": (_file(n_kv=2**40), "metadata count"),
    "50k entries in a tiny file": (_file(n_kv=50_000), "truncated"),
    "unknown value type": (_file(_kv(b"k", 13, b"\0" * 8)), "unknown value type 13"),
    "unknown array element type": (_file(_kv(b"k", ValueType.ARRAY, _array(99, 1, b"\0" * 8))), "element type 99"),
    "duplicate key": (_file(_kv(b"k", ValueType.UINT8, b"\1"), _kv(b"k", ValueType.UINT8, b"\2")), "duplicate"),
    "key not UTF-8": (_file(_kv(b"\xff", ValueType.UINT8, b"\1")), "not UTF-8"),
    "alignment not a power of two": (
        _file(_kv(b"general.alignment", ValueType.UINT32, struct.pack("<I", 24))),
        "power of two",
    ),
    "tensor with 9 dims": (_file(tensors=_tensor(b"t", [1] * 9), n_tensors=1), "9 dimensions"),
    "tensor with 2^100 elements": (_file(tensors=_tensor(b"t", [2**50, 2**50]), n_tensors=1), "too many elements"),
    "tensor data past the end": (_file(tensors=_tensor(b"t", [1024]), n_tensors=1), "tensor data ends"),
    "tensor offset past the end": (_file(tensors=_tensor(b"t", [1], ggml_type=200, offset=2**40), n_tensors=1), "ends"),
    "tensor row not a block multiple": (_file(tensors=_tensor(b"t", [33], ggml_type=2), n_tensors=1), "multiple"),
    "more tensors than bytes": (_file(tensors=_tensor(b"t", [1]), n_tensors=1000), "truncated"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_fail_small(tmp_path: Path, case: str) -> None:
    data, message = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError) as info:
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.replace("2^40", str(2**40)) in str(info.value)
    assert peak < 2**20, f"{case}: {peak} bytes allocated"


def test_crafted_minimal_file_is_valid(tmp_path: Path) -> None:
    # The builders above make valid files when nothing is wrong, so the hostile cases fail for the stated reason.
    path = tmp_path / "ok.gguf"
    path.write_bytes(
        _file(
            _kv(b"general.architecture", ValueType.STRING, _str(b"gemma3")),
            _kv(b"k", ValueType.ARRAY, _nested(4)),
            _kv(b"f", ValueType.FLOAT64, struct.pack("<d", 0.5)),
            tensors=_tensor(b"t", [2, 3], ggml_type=200),
            n_tensors=1,
        )
    )
    header = read_header(path)
    expected: dict[str, Any] = {"general.architecture": "gemma3", "k": [[[[1]]]], "f": 0.5}
    assert header.metadata == expected
    assert header.parameter_count == 6
