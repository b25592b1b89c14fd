"""Which unpacked one-file folders count as leftovers (locopilot/bundle.py).

The frozen binary's own run of this (a SIGKILLed server's folder removed at the next
start) is in build/smoke_test.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from locopilot import bundle


def unpacked(parent: Path, pid: int, suffix: str = "AbC123", *, llama: bool = True) -> Path:
    folder = parent / f"_MEI{pid:08x}{suffix}"
    folder.mkdir()
    if llama:
        (folder / "llama_cpp" / "lib").mkdir(parents=True)
    (folder / "libpython3.11.so.1.0").write_bytes(b"")
    return folder


def test_a_dead_unmapped_folder_of_ours_is_a_leftover(tmp_path: Path) -> None:
    dead = unpacked(tmp_path, 0x1234)
    found = bundle.leftovers(tmp_path, own=None, alive=lambda pid: False, mapped=list)
    assert found == [dead]


def test_folders_in_use_or_not_ours_are_kept(tmp_path: Path) -> None:
    own = unpacked(tmp_path, 0x10)
    alive = unpacked(tmp_path, 0x20)
    mapped = unpacked(tmp_path, 0x30)  # its bootloader was killed, the program still runs
    unpacked(tmp_path, 0x40, llama=False)  # another program's bundle
    (tmp_path / "_MEIabc123").mkdir()  # PyInstaller < 6.22.1's name, without a pid
    (tmp_path / "_MEI00000050XyZ789").symlink_to(own)
    gone = unpacked(tmp_path, 0x60)
    found = bundle.leftovers(
        tmp_path,
        own=own,
        alive=lambda pid: pid in {0x10, 0x20},
        mapped=lambda: [f"{mapped}/libpython3.11.so.1.0", f"{gone}-other/x.so"],
    )
    assert alive not in found
    assert found == [gone]


def kept(parent: Path, key: str = "ab" * 16, *, uid: int | None = None, suffix: str = "", age: float = 0) -> Path:
    folder = parent / f"locopilot-{os.getuid() if uid is None else uid}-{key}{suffix}"
    folder.mkdir()
    (folder / "libpython3.11.so.1.0").write_bytes(b"")
    os.utime(folder, (NOW - age, NOW - age))
    return folder


NOW = 1_800_000_000.0


def test_kept_copies_of_other_builds_go_once_unused_for_an_hour(tmp_path: Path) -> None:
    own = kept(tmp_path, "00" * 16, age=bundle.STALE_AFTER * 5)
    recent = kept(tmp_path, "11" * 16, age=bundle.STALE_AFTER - 60)
    old = kept(tmp_path, "22" * 16, age=bundle.STALE_AFTER + 60)
    old_in_use = kept(tmp_path, "33" * 16, age=bundle.STALE_AFTER * 24)
    kept(tmp_path, "44" * 16, uid=os.getuid() + 1, age=bundle.STALE_AFTER * 24)  # another user's name
    kept(tmp_path, "55" * 15, age=bundle.STALE_AFTER * 24)  # not a key's length
    found = bundle.leftovers(
        tmp_path, own=own, alive=lambda pid: True, mapped=lambda: [f"{old_in_use}/libpython3.11.so.1.0"], now=NOW
    )
    assert recent not in found
    assert found == [old]


def test_a_copy_that_failed_its_check_goes_when_its_remover_is_gone(tmp_path: Path) -> None:
    being_removed = kept(tmp_path, "66" * 16, suffix=".stale-100")
    abandoned = kept(tmp_path, "77" * 16, suffix=".stale-200")
    found = bundle.leftovers(tmp_path, own=None, alive=lambda pid: pid == 100, mapped=list, now=NOW)
    assert being_removed not in found
    assert found == [abandoned]


def test_pid_alive_and_mapped_files_read_the_real_system() -> None:
    assert bundle.pid_alive(os.getpid())
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    assert not bundle.pid_alive(int(child.stdout))
    # This interpreter's own shared libraries are mapped.
    assert any(path.endswith(".so") or ".so." in path for path in bundle.mapped_files())


def test_nothing_is_removed_outside_a_one_file_bundle() -> None:
    assert bundle.own_folder() is None
    assert bundle.remove_leftovers() == []
