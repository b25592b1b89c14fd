"""Symbol-version audit of the one-file binary: which glibc and libstdc++ it needs.

    python build/glibc_audit.py [--baseline 2.28] [dist/locopilot]

Lists every ELF file the binary carries (the bootloader, which is the executable's own
head, and each ELF entry of its PyInstaller archive: libpython, the lib-dynload and
wheel extension modules, llama.cpp's and ggml's libraries, anything bundled beside
them) with the highest version it needs of each versioned system library: GLIBC_ (libc,
libm, libpthread, libdl, librt), GLIBCXX_ and CXXABI_ (libstdc++), GCC_ (libgcc_s).
Exits 1 when a file needs a GLIBC_ version above the baseline, or GLIBC_PRIVATE, or a
GLIBCXX_/CXXABI_ version that neither a bundled libstdc++ nor the baseline's system
one provides (the baseline's system libstdc++ is the one of that glibc's era: RHEL 8's
GCC 8 for 2.28, Debian 11's GCC 10 for 2.31).

Reads the archive with PyInstaller's own reader (run it with a Python that has
PyInstaller: the build environment or .venv) and the version needs with binutils'
readelf, which the build already uses (build/locopilot.spec).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PyInstaller.archive.readers import CArchiveReader  # type: ignore[import-untyped]

# The libstdc++ of each baseline's era, as (GLIBCXX, CXXABI) versions it defines:
# RHEL 8 (glibc 2.28) has GCC 8's libstdc++ (GLIBCXX_3.4.25, CXXABI_1.3.11), Ubuntu
# 20.04 and Debian 11 (2.31) GCC 9-10's (3.4.28, 1.3.12), RHEL 9 (2.34) GCC 11's (3.4.29, 1.3.13).
SYSTEM_LIBSTDCXX = [
    ((2, 28), (3, 4, 25), (1, 3, 11)),
    ((2, 31), (3, 4, 28), (1, 3, 12)),
    ((2, 34), (3, 4, 29), (1, 3, 13)),
    ((2, 35), (3, 4, 30), (1, 3, 13)),
    ((2, 36), (3, 4, 30), (1, 3, 13)),
]
PREFIXES = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")
VERSION = re.compile(r"\b(GLIBCXX|GLIBC|CXXABI|GCC)_(PRIVATE|[0-9][0-9.]*)\b")
# Typecodes of the entries that are files on disk once unpacked ('b' binary and
# extension, 'x' data: the llama.cpp libraries may be either); others are Python code,
# the PYZ, options and symlinks.
FILE_TYPECODES = {"b", "x"}


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def show(version: tuple[int, ...] | None) -> str:
    return "-" if version is None else ".".join(map(str, version))


READELF = shutil.which("readelf") or sys.exit("glibc_audit: readelf is missing (binutils)")


def readelf(path: Path, option: str) -> str:
    result = subprocess.run([READELF, option, "--wide", str(path)], capture_output=True, text=True, check=True)
    return result.stdout


def needed_versions(path: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Highest needed version per prefix (from .gnu.version_r), and whether GLIBC_PRIVATE is needed."""
    highest: dict[str, tuple[int, ...]] = {}
    private = False
    section = readelf(path, "--version-info").split("Version needs section", 1)
    if len(section) < 2:
        return highest, private
    for line in section[1].splitlines():
        if "Name:" not in line:
            continue
        match = VERSION.search(line.split("Name:", 1)[1])
        if match is None:
            continue
        prefix, version = match.groups()
        if version == "PRIVATE":
            private |= prefix == "GLIBC"
            continue
        parsed = parse_version(version)
        if parsed > highest.get(prefix, ()):
            highest[prefix] = parsed
    return highest, private


def defined_versions(path: Path) -> dict[str, tuple[int, ...]]:
    """Highest version per prefix that a library defines (.gnu.version_d): what a bundled libstdc++ provides."""
    highest: dict[str, tuple[int, ...]] = {}
    section = readelf(path, "--version-info").split("Version definition section", 1)
    if len(section) < 2:
        return highest
    body = section[1].split("Version needs section", 1)[0]
    for match in VERSION.finditer(body):
        prefix, version = match.groups()
        if version != "PRIVATE":
            parsed = parse_version(version)
            if parsed > highest.get(prefix, ()):
                highest[prefix] = parsed
    return highest


def elf_entries(binary: Path, folder: Path) -> list[tuple[str, Path]]:
    """The bootloader and every ELF file in the binary's archive, written to folder."""
    files = [("(bootloader)", binary)]
    archive = CArchiveReader(str(binary))
    for name, (_, _, _, _, typecode) in sorted(archive.toc.items()):
        if typecode not in FILE_TYPECODES:
            continue
        data = archive.extract(name)
        if data[:4] != b"\x7fELF":
            continue
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files.append((name, target))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", nargs="?", default="dist/locopilot", type=Path)
    parser.add_argument("--baseline", default="2.28", help="highest GLIBC_ version allowed (default 2.28)")
    parser.add_argument("--quiet", action="store_true", help="print only the files above the baseline and the summary")
    args = parser.parse_args()
    baseline = parse_version(args.baseline)
    era = [entry for entry in SYSTEM_LIBSTDCXX if entry[0] <= baseline]
    if not era:
        parser.error(f"no known libstdc++ for glibc {args.baseline} (lowest known: 2.28)")
    system_glibcxx, system_cxxabi = era[-1][1], era[-1][2]

    with tempfile.TemporaryDirectory(prefix="glibc-audit-") as tmp:
        files = elf_entries(args.binary, Path(tmp))
        rows = [(name, *needed_versions(path)) for name, path in files]
        bundled = [path for name, path in files if Path(name).name.startswith("libstdc++.so")]
        if bundled:
            provided = defined_versions(bundled[0])
            glibcxx_limit = provided.get("GLIBCXX", ())
            cxxabi_limit = provided.get("CXXABI", ())
            source = f"the bundled {Path(bundled[0]).name}"
        else:
            glibcxx_limit, cxxabi_limit = system_glibcxx, system_cxxabi
            source = f"the system libstdc++ of glibc {args.baseline}'s era"

    width = max(len(name) for name, _, _ in rows)
    header = f"{'file':<{width}}  {'GLIBC':>6}  {'GLIBCXX':>8}  {'CXXABI':>7}  {'GCC':>5}  verdict"
    if not args.quiet:
        print(header)
    failures = 0
    for name, highest, private in rows:
        problems = []
        if highest.get("GLIBC", ()) > baseline:
            problems.append(f"GLIBC_{show(highest['GLIBC'])} > {args.baseline}")
        if private:
            problems.append("GLIBC_PRIVATE")
        if highest.get("GLIBCXX", ()) > glibcxx_limit:
            problems.append(f"GLIBCXX_{show(highest['GLIBCXX'])} > {show(glibcxx_limit)}")
        if highest.get("CXXABI", ()) > cxxabi_limit:
            problems.append(f"CXXABI_{show(highest['CXXABI'])} > {show(cxxabi_limit)}")
        if args.quiet and not problems:
            continue
        if args.quiet and not failures:
            print(header)
        failures += bool(problems)
        cells = [show(highest.get(prefix)) for prefix in PREFIXES]
        verdict = "FAIL " + ", ".join(problems) if problems else "ok"
        print(f"{name:<{width}}  {cells[0]:>6}  {cells[1]:>8}  {cells[2]:>7}  {cells[3]:>5}  {verdict}")
    print(
        f"{len(rows)} ELF files, {failures} above the baseline (GLIBC {args.baseline};"
        f" GLIBCXX {show(glibcxx_limit)}, CXXABI {show(cxxabi_limit)} from {source})"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
