"""The models folder: listing, adding (copy and link), removing, and names that cannot escape it."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import gguf
import msgspec
import numpy as np
import pytest

from locopilot.errors import InvalidModelName, InvalidRequest, ModelNotFound
from locopilot.models import catalog as catalog_module
from locopilot.models.catalog import ModelCatalog, ModelEntry, validate_model_name
from locopilot.models.gguf import GGUFError, GGUFHeader, read_header

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def make_gguf(path: Path, *, arch: str = "llama", template: str | None = TEMPLATE, file_type: int = 7) -> Path:
    """A small valid GGUF with one 4x8 f32 tensor (32 parameters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(4096)
    writer.add_file_type(file_type)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_token_list([f"t{i}" for i in range(200)])
    writer.add_tensor("weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def catalog(folder: Path) -> ModelCatalog:
    return ModelCatalog(folder)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_gguf(tmp_path / "src" / "tiny-chat.Q8_0.gguf")


@pytest.mark.parametrize("name", ["ok:tag", "ok.v1_2-x", "llama3.2:3b", "A", "a" * 200, "x.gguf"])
def test_valid_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", "a/b", "a\\b", "..", ".", "", ".hidden", "a" * 201, "x\n", "a b", "ü", "x\0"],
)
def test_invalid_names(catalog: ModelCatalog, name: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_model_name(name)
    for method in (catalog.get, catalog.remove, catalog.path_for, catalog.header):
        with pytest.raises(InvalidModelName):
            method(name)


def test_path_for_stays_in_folder(catalog: ModelCatalog, folder: Path) -> None:
    assert catalog.path_for("ok:tag") == folder.resolve() / "ok:tag.gguf"


def test_missing_folder_lists_empty(catalog: ModelCatalog) -> None:
    assert catalog.list() == []


def test_add_copies(catalog: ModelCatalog, folder: Path, source: Path) -> None:
    entry = catalog.add(source)
    path = folder / "tiny-chat.Q8_0.gguf"
    assert entry == ModelEntry(
        name="tiny-chat.Q8_0",
        path=str(path.resolve()),
        size_bytes=source.stat().st_size,
        modified=int(path.stat().st_mtime),
        architecture="llama",
        quantization="Q8_0",
        context_length=4096,
        parameter_count=32,
        chat_template="gguf",
        tools="generic",  # TEMPLATE knows no tools
    )
    assert not path.is_symlink()
    assert path.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-chat.Q8_0.gguf"]  # no partial copy left behind
    assert catalog.list() == [entry]
    assert catalog.get("tiny-chat.Q8_0") == entry
    msgspec.json.encode(entry)


def test_add_links(catalog: ModelCatalog, folder: Path, source: Path) -> None:
    entry = catalog.add(source, name="linked", link=True)
    path = folder / "linked.gguf"
    assert path.is_symlink()
    assert Path(os.readlink(path)) == source.resolve()
    assert entry.name == "linked"
    assert entry.size_bytes == source.stat().st_size
    assert entry.quantization == "Q8_0"
    assert entry.error is None


def test_add_refuses_existing(catalog: ModelCatalog, source: Path) -> None:
    catalog.add(source, name="m")
    before = catalog.path_for("m").read_bytes()
    for link in (False, True):
        with pytest.raises(InvalidRequest, match="The model 'm' already exists"):
            catalog.add(make_gguf(source.parent / "other.gguf", arch="qwen2"), name="m", link=link)
    assert catalog.path_for("m").read_bytes() == before


def test_add_refuses_bad_sources(catalog: ModelCatalog, folder: Path, tmp_path: Path) -> None:
    (tmp_path / "text.gguf").write_text("not a model")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(InvalidRequest, match="does not exist"):
        catalog.add(tmp_path / "missing.gguf")
    with pytest.raises(InvalidRequest, match="not a regular file"):
        catalog.add(tmp_path / "dir.gguf")
    with pytest.raises(InvalidRequest, match="not a usable GGUF") as info:
        catalog.add(tmp_path / "text.gguf")
    assert isinstance(info.value.__cause__, GGUFError)
    assert not folder.exists()


def test_add_needs_a_valid_name(catalog: ModelCatalog, tmp_path: Path) -> None:
    spaced = make_gguf(tmp_path / "my model.gguf")
    with pytest.raises(InvalidModelName):
        catalog.add(spaced)
    with pytest.raises(InvalidModelName):
        catalog.add(spaced, name="../escape")
    assert catalog.add(spaced, name="my-model").name == "my-model"
    assert not (tmp_path / "escape.gguf").exists()


def test_list_is_sorted_and_reports_broken_files(
    catalog: ModelCatalog, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_gguf(folder / "b.gguf", arch="gemma3", template=None)
    make_gguf(folder / "a.gguf", arch="llama", template=None)
    make_gguf(folder / "c.gguf")
    (folder / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.gguf").write_text("ignored")
    (folder / "dir.gguf").mkdir()
    (folder / "bad name.gguf").write_text("ignored")
    (folder / "dangling.gguf").symlink_to(tmp_path / "gone.gguf")
    with caplog.at_level(logging.WARNING, logger="locopilot.models.catalog"):
        entries = catalog.list()
    assert [e.name for e in entries] == ["a", "b", "broken", "c", "dangling"]
    by_name = {e.name: e for e in entries}
    assert by_name["a"].chat_template == "chatml"
    assert by_name["b"].chat_template == "gemma"
    assert by_name["c"].chat_template == "gguf"
    assert by_name["broken"].error is not None and "truncated" in by_name["broken"].error
    assert by_name["broken"].architecture is None
    assert by_name["dangling"].error is not None
    assert all(e.error is None for e in (by_name["a"], by_name["b"], by_name["c"]))
    assert "broken.gguf" in caplog.text


def test_list_parses_each_file_once(catalog: ModelCatalog, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_gguf(folder / "m.gguf")
    (folder / "broken.gguf").write_bytes(b"junk")
    calls: list[Path] = []
    real = read_header

    def counting(path: Path) -> GGUFHeader:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(catalog_module, "read_header", counting)
    first = catalog.list()
    assert catalog.list() == first
    catalog.get("m")
    catalog.header("m")
    assert sorted(p.name for p in calls) == ["broken.gguf", "m.gguf"]

    make_gguf(folder / "m.gguf", file_type=2)
    os.utime(folder / "m.gguf", ns=(1, 1))  # a different mtime even on a coarse clock
    assert catalog.get("m").quantization == "Q4_0"
    assert len(calls) == 3


def test_get_missing(catalog: ModelCatalog, folder: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"^The model 'nope' does not exist$"):
        catalog.get("nope")
    folder.mkdir()
    (folder / "dir.gguf").mkdir()
    with pytest.raises(ModelNotFound):
        catalog.get("dir")
    with pytest.raises(ModelNotFound):
        catalog.header("nope")


def test_header(catalog: ModelCatalog, folder: Path) -> None:
    make_gguf(folder / "m.gguf")
    (folder / "broken.gguf").write_bytes(b"junk")
    assert catalog.header("m").chat_template == TEMPLATE
    catalog.list()  # caches the error; header() must still raise it
    with pytest.raises(GGUFError, match="bad magic"):
        catalog.header("broken")


def test_remove_file(catalog: ModelCatalog, source: Path) -> None:
    catalog.add(source, name="m")
    catalog.remove("m")
    assert catalog.list() == []
    assert source.exists()
    with pytest.raises(ModelNotFound, match="The model 'm' does not exist"):
        catalog.remove("m")


def test_remove_link_keeps_target(catalog: ModelCatalog, folder: Path, source: Path, tmp_path: Path) -> None:
    catalog.add(source, name="m", link=True)
    catalog.remove("m")
    assert not (folder / "m.gguf").is_symlink()
    assert source.exists()
    # A dangling link can be removed too.
    (folder / "gone.gguf").symlink_to(tmp_path / "nowhere.gguf")
    catalog.remove("gone")
    assert not (folder / "gone.gguf").is_symlink()


def test_real_gemma_model(catalog: ModelCatalog, gemma_path: Path) -> None:
    entry = catalog.add(gemma_path, name="gemma3:270m", link=True)
    assert entry.error is None
    assert entry.architecture is not None and entry.architecture.startswith("gemma3")
    assert entry.quantization == "Q4_K_M"
    assert entry.chat_template == "gemma"
    assert entry.context_length == 32768
    assert entry.parameter_count is not None and 200_000_000 < entry.parameter_count < 300_000_000
    header = catalog.header("gemma3:270m")
    assert header.chat_template is None
    assert header.metadata["tokenizer.ggml.tokens"].length == 262_144
