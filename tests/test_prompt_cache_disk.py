"""Prompt caches kept on disk (engine/kvdisk.py): a long prefix outlives a restart of the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam

from locopilot.engine.kvdisk import DiskPromptCache
from tests.conftest import SMOL, Server, start_server
from tests.test_prompt_cache_usage import cached

RULES = " ".join(
    f"Rule {n}: a visitor who brings a {thing} to the {place} must leave it at the desk before noon."
    for n, (thing, place) in enumerate(
        [(t, p) for t in ("umbrella", "bicycle", "parrot", "drum", "kite") for p in ("library", "museum", "park")]
    )
)
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": f"You are the clerk of a small town. {RULES}"},
    {"role": "user", "content": "Where do I leave my kite?"},
]


def states(server: Server) -> list[Path]:
    return sorted((server.data_dir / "prompt-cache").glob("*/*.state"))


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def test_a_long_prefix_is_reused_from_disk_after_a_restart(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    server = start_server(
        tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_PROMPT_CACHE_MIN_TOKENS": "200", "LOCOPILOT_PARALLEL": "1"}
    )
    try:
        client = server.client()
        first = client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=16, temperature=0)
        assert first.usage is not None and first.usage.prompt_tokens > 300
        assert cached(first.usage) == 0
        # The runner writes its slot's cache once it has nothing to do.
        wait_for(lambda: states(server), "a prompt cache file is written")
        server.stop()
        server.start()
        client = server.client()
        second = client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=16, temperature=0)
        assert second.usage is not None
        # All but the prompt's last token came from the file (its logits start the reply), and the
        # reply is the one decoded from scratch.
        assert cached(second.usage) == second.usage.prompt_tokens - 1
        assert second.choices[0].message.content == first.choices[0].message.content
    finally:
        server.stop()


def test_short_prompts_and_a_zero_budget_write_nothing(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    server = start_server(tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_PROMPT_CACHE_MB": "0"})
    try:
        client = server.client()
        client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=4, temperature=0)
        client.chat.completions.create(model=SMOL, messages=MESSAGES[1:], max_tokens=4, temperature=0)
        time.sleep(1)
        assert states(server) == []
    finally:
        server.stop()


def fake_state(size: int) -> Callable[[Path], bool]:
    def write(path: Path) -> bool:
        path.write_bytes(b"s" * size)
        return True

    return write


def test_files_are_bounded_used_ones_kept_and_shorter_beginnings_replaced(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    root = tmp_path / "cache"
    disk = DiskPromptCache(root, str(model), max_bytes=2500, min_tokens=3)
    a, b = [1, 2, 3, 4], [9, 8, 7, 6]
    assert disk.save(a, fake_state(1000)) and disk.save(b, fake_state(1000))
    assert disk.best([1, 2, 3, 4, 5]) == (*(disk.best(a) or ("", 0))[0:1], 4)
    assert disk.best([1, 2, 5]) is None  # shares only two tokens: fewer than min_tokens
    # a longer prompt that begins with ``a`` replaces ``a``'s file: it holds all of it
    longer = [*a, 5, 6]
    assert disk.save(longer, fake_state(1000))
    assert disk.holds(a) and disk.holds(longer) and len(disk.entries) == 2
    # ``b`` is used, so a new file pushes out ``longer`` (least recently used) instead
    time.sleep(0.01)
    disk.used(disk.best(b)[0])  # type: ignore[index]
    time.sleep(0.01)
    assert disk.save([5, 5, 5], fake_state(1000))
    assert disk.holds(b) and not disk.holds(longer)
    assert sum(p.stat().st_size for p in root.glob("*/*.state")) <= 2500
    # A new runner finds the files; a half-written one (a crash) is removed.
    (disk.folder / "x.state.tmp").write_bytes(b"partial")
    again = DiskPromptCache(root, str(model), max_bytes=2500, min_tokens=3)
    assert sorted(again.entries.values()) == sorted(disk.entries.values())
    assert not list(disk.folder.glob("*.tmp"))
    # A model file replaced on disk starts afresh.
    model.write_bytes(b"GGUF v2")
    assert DiskPromptCache(root, str(model), max_bytes=2500, min_tokens=3).entries == {}
