"""The embedded provider's model listing, which every routing plan asks for: the folder is listed
again when it changed (a model added shows at once), not on every ask nor once a second."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from locopilot.engine.supervisor import ModelManager
from locopilot.models.catalog import ModelCatalog, ModelEntry
from locopilot.providers.embedded import UNSETTLED_TTL, EmbeddedProvider
from locopilot.settings import load_settings


class CountingCatalog(ModelCatalog):
    def __init__(self, models_dir: Path) -> None:
        super().__init__(models_dir)
        self.listings = 0

    def list(self) -> list[ModelEntry]:
        self.listings += 1
        return super().list()


def age(folder: Path, ns: int | None = None) -> int:
    """Date the folder's last change back 10 s, or to ``ns``, as if nothing had changed since; that time."""
    ns = time.time_ns() - 10 * 10**9 if ns is None else ns
    os.utime(folder, ns=(ns, ns))
    return ns


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_folder_is_listed_again_only_when_it_changed(tmp_path: Path, smollm2_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a.gguf").symlink_to(smollm2_path)
    age(folder)
    settings = load_settings({"LOCOPILOT_DATA_DIR": str(tmp_path), "LOCOPILOT_MODELS_DIR": str(folder)})
    catalog = CountingCatalog(folder)
    async with anyio.create_task_group() as tasks:
        provider = EmbeddedProvider(ModelManager(settings, catalog.load_path, tasks), catalog, 4)
        models = provider.models
        assert await models() == ["a"]
        assert await models() == ["a"]
        assert catalog.listings == 1  # unchanged: no second listing
        # A model added shows on the next ask, however soon.
        (folder / "b.gguf").symlink_to(smollm2_path)
        assert await models() == ["a", "b"]
        # Right after a change the folder's time may not show the next one (a coarse clock): listed every time.
        listed = catalog.listings
        assert await models() == ["a", "b"]
        assert catalog.listings == listed + 1
        age(folder)
        assert await models() == ["a", "b"]
        assert await models() == ["a", "b"]
        assert catalog.listings == listed + 2
        # A file that is not a model (yet: one still being copied in) keeps a listing UNSETTLED_TTL
        # only: once complete it changes nothing in the folder.
        partial = folder / "c.gguf"
        partial.write_bytes(b"GGUF")
        then = age(folder)
        assert await models() == ["a", "b"]
        partial.unlink()
        partial.symlink_to(smollm2_path)
        age(folder, then)  # the folder as it was
        assert await models() == ["a", "b"]
        await anyio.sleep(UNSETTLED_TTL + 0.1)
        assert await models() == ["a", "b", "c"]
        # Removed: gone at once.
        (folder / "a.gguf").unlink()
        assert await models() == ["b", "c"]
        await provider.aclose()
