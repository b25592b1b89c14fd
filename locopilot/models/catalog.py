"""The models folder: every ``NAME.gguf`` directly in it is the model ``NAME``.

A model file is a regular file or a symlink to one elsewhere (``models add
--link`` makes those). A model name never addresses a path outside the folder:
names are checked against :data:`MODEL_NAME_RE` (no ``/``, no leading ``.``),
and removing a model unlinks the name in the folder, never a link's target.

A split model (``NAME-00001-of-0000N.gguf`` and its other parts) is a folder
``.splits/NAME/`` holding the parts under their own names (copies, or links to
them), and ``NAME.gguf``, a link to the first part: llama.cpp finds the other parts
by the first part's file name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec

from locopilot.engine.templates import choose_template
from locopilot.engine.toolformats import capability
from locopilot.errors import InvalidModelName, InvalidRequest, ModelNotFound
from locopilot.models.gguf import GGUFError, GGUFHeader, read_header
from locopilot.models.refs import SPLIT_RE
from locopilot.training.lora import base_of

logger = logging.getLogger(__name__)

MODEL_NAME_RE = re.compile(r"^[a-zA-Z0-9:._-]+$")
MAX_MODEL_NAME = 200
SUFFIX = ".gguf"
SPLITS = ".splits"
#: Links followed at most when looking for the file to load (the kernel's own limit is 40).
MAX_LINKS = 40


class ModelEntry(msgspec.Struct, frozen=True):
    """One model in the folder, as listings show it.

    ``path`` is the file's path in the folder (for a link, the link). ``size_bytes``
    and ``modified`` (unix seconds) are the target's. A file whose header does
    not parse has ``error`` set, and None for everything read from the header.
    ``chat_template`` is ``gguf`` when the file carries its own, else the name of
    the fallback :func:`choose_template` picks. ``tools`` says how the engine calls tools with
    it: ``native:<format>`` (the template's own syntax, see :mod:`locopilot.engine.toolcalls`)
    or ``generic`` (a template that knows no tools). ``adapter_of``: for a LoRA adapter
    (:mod:`locopilot.training.lora`), the model it runs on, whose runner serves it.
    """

    name: str
    path: str
    size_bytes: int
    modified: int
    architecture: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    parameter_count: int | None = None
    chat_template: str | None = None
    tools: str | None = None
    error: str | None = None
    adapter_of: str | None = None


def validate_model_name(name: str) -> str:
    """Return ``name`` if it can name a model file in the folder, else raise InvalidModelName."""
    if (
        not name
        or len(name) > MAX_MODEL_NAME
        or name.startswith(".")
        # fullmatch: `$` alone would accept a trailing newline.
        or MODEL_NAME_RE.fullmatch(name) is None
    ):
        raise InvalidModelName(
            f"Invalid model name {name[:MAX_MODEL_NAME]!r}: use up to {MAX_MODEL_NAME} letters, digits and ':._-', "
            "not starting with '.'",
            param="model",
        )
    return name


# (device, inode, size, mtime_ns) of the file a name points to: a replaced or rewritten file misses the cache.
_Key = tuple[int, int, int, int]


def _key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def split_parts(first: Path) -> list[Path]:
    """The parts of the split model whose first part is ``first`` (beside it, by name), in order; ``[first]``
    for a file that is not a split's first part. Raises InvalidRequest if a part is missing."""
    match = SPLIT_RE.search(first.name)
    if match is None or int(match.group(1)) != 1:
        return [first]
    count = int(match.group(2))
    stem, suffix = first.name[: match.start()], first.name[-len(SUFFIX) :]
    parts = [first.with_name(f"{stem}-{index:05d}-of-{count:05d}{suffix}") for index in range(1, count + 1)]
    for index, part in enumerate(parts, start=1):
        if not part.is_file():
            raise InvalidRequest(f"{first} is part 1 of {count} of a split model; part {index} ({part}) is missing")
    return parts


class ModelCatalog:
    """The models in one folder. Headers are parsed once per file version and cached.

    Safe to share between threads: the cache is a dict replaced per entry, and
    the worst a race does is parse one header twice. The folder may be missing
    until the first :meth:`add`; it then lists as empty.
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._cache: dict[Path, tuple[_Key, GGUFHeader | str]] = {}

    def path_for(self, name: str) -> Path:
        """The path of model ``name`` in the folder (it may not exist). Raises InvalidModelName."""
        validate_model_name(name)
        folder = self.models_dir.resolve()
        path = folder / f"{name}{SUFFIX}"
        # The name rules already forbid separators; this guards against a rule change letting one through.
        # The file itself is not resolved: a link may point outside, by design.
        if path.parent != folder or not path.is_relative_to(folder):
            raise InvalidModelName(f"Invalid model name {name!r}", param="model")
        return path

    def load_path(self, name: str) -> Path:
        """The file llama.cpp loads for ``name``: links resolved, but only up to a split model's first
        part, which must keep its own name (``-00001-of-0000N``) for llama.cpp to find the others beside
        it (a Hugging Face cache links that name to a blob named by its hash). Raises InvalidModelName or
        ModelNotFound."""
        path = self._existing(name)
        for _ in range(MAX_LINKS):
            if not path.is_symlink() or SPLIT_RE.search(path.name):
                break
            path = path.parent / os.readlink(path)
        # The folders on the way are resolved; the name is kept.
        return path.parent.resolve() / path.name if SPLIT_RE.search(path.name) else path.resolve()

    def stamp(self) -> tuple[int, int, int] | None:
        """The folder's device, inode and modification time (ns), which a name added, removed or
        renamed in it changes; None if it is missing. One stat: cheap enough for every request."""
        try:
            st = os.stat(self.models_dir)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns)

    def list(self) -> list[ModelEntry]:
        """All models, sorted by name. Files that fail to parse are listed with ``error`` set."""
        folder = self.models_dir.resolve()
        try:
            children = sorted(folder.iterdir())
        except FileNotFoundError:
            return []
        entries = []
        for child in children:
            name = child.name.removesuffix(SUFFIX)
            # Hidden files include our own partial copies.
            if not child.name.endswith(SUFFIX) or name.startswith("."):
                continue
            try:
                validate_model_name(name)
            except InvalidModelName:
                logger.warning("ignoring %s: %r is not a valid model name", child, name)
                continue
            if child.is_symlink() or child.is_file():
                entries.append(self._entry(name, child))
        return sorted(entries, key=lambda entry: entry.name)

    def get(self, name: str) -> ModelEntry:
        """The entry for ``name``. Raises InvalidModelName, or ModelNotFound if there is no such model."""
        return self._entry(name, self._existing(name))

    def header(self, name: str) -> GGUFHeader:
        """The parsed header of model ``name``.

        Raises InvalidModelName, ModelNotFound, GGUFError if the file is not a
        valid GGUF, or OSError if it cannot be read.
        """
        path = self._existing(name)
        key = _key(path.stat())
        cached = self._cache.get(path)
        if cached is not None and cached[0] == key and isinstance(cached[1], GGUFHeader):
            return cached[1]
        # A cached error is re-raised by reading again, so the caller gets the real exception.
        header = read_header(path)
        self._cache[path] = (key, header)
        return header

    def add(self, source: Path, *, name: str | None = None, link: bool = False) -> ModelEntry:
        """Add the GGUF at ``source`` as model ``name`` (default: its file name without ``.gguf``).

        Copies it (to a hidden temporary file in the folder, renamed into place
        once complete) or, with ``link``, symlinks to its absolute path. Creates
        the folder (mode 0700) if missing. Raises InvalidRequest if the source is
        missing, not a regular file or not a valid GGUF, or if the model exists;
        InvalidModelName if the name is not valid.
        """
        if name is None:
            name = source.name[: -len(SUFFIX)] if source.name.lower().endswith(SUFFIX) else source.name
        target = self.path_for(name)
        if not source.exists():
            raise InvalidRequest(f"The file {source} does not exist")
        if not source.is_file():
            raise InvalidRequest(f"{source} is not a regular file")
        try:
            read_header(source)
        except (GGUFError, OSError) as exc:
            raise InvalidRequest(f"{source} is not a usable GGUF file: {exc}") from exc
        if target.is_symlink() or target.exists():
            raise InvalidRequest(f"The model '{name}' already exists")

        self.models_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        parts = split_parts(source)
        if len(parts) > 1:
            self._add_split(parts, target, link=link)
        elif link:
            try:
                # symlink refuses an existing name, so a racing add cannot be overwritten.
                target.symlink_to(source.resolve())
            except FileExistsError as exc:
                raise InvalidRequest(f"The model '{name}' already exists") from exc
        else:
            self._copy(source, target)
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete model ``name``: the file, or for a link the link alone, its lineage manifest (see
        :mod:`locopilot.training.lineage`) and a split model's folder of parts. Raises ModelNotFound if absent."""
        path = self._existing(name)
        path.unlink()
        path.with_name(path.name + ".lineage.json").unlink(missing_ok=True)
        shutil.rmtree(self.split_folder(name), ignore_errors=True)
        self._cache.pop(path, None)

    def split_folder(self, name: str) -> Path:
        """Where split model ``name`` keeps its parts."""
        return self.models_dir / SPLITS / validate_model_name(name)

    def place_split(self, folder: Path, first: str, target: Path) -> None:
        """Make ``folder`` (complete, holding the parts, in the models folder) split model ``target``'s parts:
        it is moved to :meth:`split_folder` and ``target`` becomes a link to its part ``first``, atomically."""
        name = target.name.removesuffix(SUFFIX)
        home = self.split_folder(name)
        if home.exists():
            shutil.rmtree(home)
        home.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.rename(home)
        link = target.with_name(f".{target.name}.link")
        link.unlink(missing_ok=True)
        link.symlink_to(Path(SPLITS) / name / first)
        os.replace(link, target)

    def _existing(self, name: str) -> Path:
        path = self.path_for(name)
        if not (path.is_symlink() or path.is_file()):
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return path

    def _add_split(self, parts: Sequence[Path], target: Path, *, link: bool) -> None:
        """Copy (or link to) every part into a folder of their own, then place it (see the module docstring)."""
        staging = Path(tempfile.mkdtemp(dir=self.models_dir, prefix=f".{target.name}.", suffix=".parts"))
        try:
            for part in parts:
                if link:
                    # The part's own file: a Hugging Face cache's snapshot name links to a blob.
                    (staging / part.name).symlink_to(part.resolve())
                else:
                    self._copy(part, staging / part.name)
            if target.is_symlink() or target.exists():
                raise InvalidRequest(f"The model '{target.name.removesuffix(SUFFIX)}' already exists")
            self.place_split(staging, parts[0].name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _copy(self, source: Path, target: Path) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, length=1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            # Checked again just before the rename, which would replace a model added meanwhile.
            if target.is_symlink() or target.exists():
                raise InvalidRequest(f"The model '{target.name.removesuffix(SUFFIX)}' already exists")
            tmp.rename(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _entry(self, name: str, path: Path) -> ModelEntry:
        try:
            st = path.stat()
        except OSError as exc:
            # A dangling link or unreadable file is listed, so that it can be seen and removed.
            modified = int(path.lstat().st_mtime) if path.is_symlink() else 0
            return ModelEntry(name, str(path), 0, modified, error=f"cannot read {path}: {exc.strerror or exc}")
        if not stat.S_ISREG(st.st_mode):
            return ModelEntry(name, str(path), 0, int(st.st_mtime), error=f"{path} is not a regular file")
        key = _key(st)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            result = cached[1]
        else:
            try:
                result = read_header(path)
            except (GGUFError, OSError) as exc:
                logger.warning("cannot read the model %s: %s", path, exc)
                result = str(exc)
            self._cache[path] = (key, result)
        if isinstance(result, str):
            return ModelEntry(name, str(path), st.st_size, int(st.st_mtime), error=result)
        if result.metadata.get("general.type") == "adapter":
            base = base_of(result.metadata)
            error = None if base else "a LoRA adapter that names no base model (locopilot.adapter.base)"
            size = (st.st_size, int(st.st_mtime))
            return ModelEntry(name, str(path), *size, architecture=result.architecture, error=error, adapter_of=base)
        template = choose_template(result.metadata)
        return ModelEntry(
            name,
            str(path),
            st.st_size,
            int(st.st_mtime),
            architecture=result.architecture,
            quantization=result.quantization,
            context_length=result.context_length,
            parameter_count=result.parameter_count,
            chat_template=template.name,
            tools=capability(template.source if template.name == "gguf" else None),
        )
