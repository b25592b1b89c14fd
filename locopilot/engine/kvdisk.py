"""Prompt caches kept on disk, so a long shared prefix outlives its runner.

Agents send the same long system prompt and tool list on every turn. A runner keeps
what each slot's KV cache holds in memory, but a restart, an idle unload or a model
swap loses it, and the next turn decodes the whole prompt again. So when a runner has
nothing to do, it writes each slot whose cache holds at least ``min_tokens`` tokens that
no file already holds (llama.cpp's ``llama_state_seq_save_file``: the sequence's KV
cells and its tokens), and a new request whose prompt shares a longer beginning with a
file than with any slot loads that file into its slot (``llama_state_seq_load_file``)
and decodes only the rest.

Layout: ``FOLDER/<model key>/<sha256 of the tokens>.state`` with a ``.tokens`` file
beside it (the token ids, int32), written under temporary names and renamed into place.
The model key is a hash of the model file's path, size and modification time, so a file
replaced on disk starts afresh. All models share ``max_bytes``; the files used least
recently go first. A file llama.cpp refuses (another build, another context layout) is
removed when it is found so.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("locopilot.runner")

GAIN = 64
"""Tokens a file must reuse beyond what the slot already holds to be worth loading."""


def model_key(model_path: str) -> str:
    """The folder name of ``model_path``'s files: changes when the file is replaced."""
    stat = os.stat(model_path)
    identity = f"{os.path.realpath(model_path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _write_atomically(path: Path, write: Callable[[Path], bool]) -> bool:
    temporary = path.with_name(path.name + ".tmp")
    try:
        if not write(temporary):
            temporary.unlink(missing_ok=True)
            return False
        temporary.replace(path)
        return True
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


class DiskPromptCache:
    """The files of one model; see the module's text."""

    def __init__(self, root: Path, model_path: str, max_bytes: int, min_tokens: int) -> None:
        self.root = root
        self.folder = root / model_key(model_path)
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, list[int]] = {}
        for leftover in self.folder.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        for tokens_file in self.folder.glob("*.tokens"):
            state = tokens_file.with_suffix(".state")
            ids = array.array("i")
            try:
                ids.frombytes(tokens_file.read_bytes())
            except (OSError, ValueError):
                ids = array.array("i")
            if state.is_file() and ids:
                self.entries[tokens_file.stem] = ids.tolist()
            else:
                self._remove(tokens_file.stem)

    def state_path(self, name: str) -> Path:
        return self.folder / f"{name}.state"

    def best(self, tokens: list[int]) -> tuple[str, int] | None:
        """The file sharing the longest beginning with ``tokens`` (at least ``min_tokens``), and that length."""
        found: tuple[str, int] | None = None
        for name, held in self.entries.items():
            common = common_prefix(held, tokens)
            if common >= self.min_tokens and (found is None or common > found[1]):
                found = (name, common)
        return found

    def holds(self, tokens: list[int]) -> bool:
        """Whether some file already holds ``tokens`` (they begin it)."""
        return any(len(held) >= len(tokens) and held[: len(tokens)] == tokens for held in self.entries.values())

    def used(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.state_path(name))

    def save(self, tokens: list[int], write_state: Callable[[Path], bool]) -> bool:
        """Write ``tokens``' state with ``write_state(path)``; files it makes redundant (shorter
        beginnings of it) go, then the least recently used past ``max_bytes``."""
        ids = array.array("i", tokens)
        name = hashlib.sha256(ids.tobytes()).hexdigest()[:32]
        try:
            if not _write_atomically(self.state_path(name), write_state):
                return False
            _write_atomically(self.folder / f"{name}.tokens", lambda path: path.write_bytes(ids.tobytes()) > 0)
        except OSError as exc:
            log.warning("prompt cache: could not write %s: %s", self.state_path(name), exc)
            self._remove(name)
            return False
        for other, held in list(self.entries.items()):
            if len(held) <= len(tokens) and tokens[: len(held)] == held:
                self._remove(other)
        self.entries[name] = list(tokens)
        self.evict(keep=name)
        return True

    def evict(self, keep: str = "") -> None:
        """Remove the least recently used files of every model until all fit in ``max_bytes``."""
        files = []
        for state in self.root.glob("*/*.state"):
            with contextlib.suppress(OSError):
                stat = state.stat()
                files.append((stat.st_mtime, stat.st_size, state))
        total = sum(size for _, size, _ in files)
        for _, size, state in sorted(files):
            if total <= self.max_bytes:
                break
            if state.parent == self.folder and state.stem == keep:
                continue
            state.unlink(missing_ok=True)
            state.with_suffix(".tokens").unlink(missing_ok=True)
            if state.parent == self.folder:
                self.entries.pop(state.stem, None)
            total -= size

    def load_into(self, ctx: Any, seq_id: int, tokens: list[int], have: int, room: int) -> list[int] | None:
        """Load into sequence ``seq_id`` of llama.cpp context ``ctx`` the file sharing the longest beginning
        with ``tokens``, when it reuses :data:`GAIN` more tokens than the ``have`` the sequence already
        shares with them and holds fewer than ``room``; the tokens it holds, or None (nothing loaded). The
        caller has emptied the sequence's cells when a load was tried: a failed one leaves them empty."""
        import llama_cpp

        found = self.best(tokens)
        if found is None:
            return None
        name, common = found
        held = self.entries[name]
        if common < have + GAIN or len(held) >= room:
            return None
        memory = llama_cpp.llama_get_memory(ctx)
        llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
        out = (llama_cpp.llama_token * len(held))()
        count = ctypes.c_size_t(0)
        started = time.perf_counter()
        path = str(self.state_path(name)).encode()
        loaded = llama_cpp.llama_state_seq_load_file(ctx, path, seq_id, out, len(held), ctypes.byref(count))
        if not loaded or out[: count.value] != held:
            llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
            self.drop(name)
            return []
        self.used(name)
        log.info("prompt cache: %d tokens from disk in %.0f ms", len(held), (time.perf_counter() - started) * 1000)
        return list(held)

    def save_from(self, ctx: Any, seq_id: int, cached: list[int]) -> None:
        """Write what sequence ``seq_id`` of ``ctx`` holds (``cached``, its tokens) unless it is too short
        or a file already holds it."""
        import llama_cpp

        if len(cached) < self.min_tokens or self.holds(cached):
            return
        ids = (llama_cpp.llama_token * len(cached))(*cached)

        def write(path: Path) -> bool:
            return bool(llama_cpp.llama_state_seq_save_file(ctx, str(path).encode(), seq_id, ids, len(cached)))

        started = time.perf_counter()
        if self.save(cached, write):
            log.info("prompt cache: %d tokens to disk in %.0f ms", len(cached), (time.perf_counter() - started) * 1000)

    def drop(self, name: str) -> None:
        """Forget a file llama.cpp would not load."""
        log.warning("prompt cache: %s could not be loaded; removed", self.state_path(name))
        self._remove(name)

    def _remove(self, name: str) -> None:
        self.entries.pop(name, None)
        self.state_path(name).unlink(missing_ok=True)
        (self.folder / f"{name}.tokens").unlink(missing_ok=True)
