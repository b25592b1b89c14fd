"""Build llama.cpp's ``llama-server`` from the source inside the llama-cpp-python sdist, once per version.

The sdist ships the whole llama.cpp tree (``vendor/llama.cpp``) at the commit
its bindings were made from, so the binary built here runs the same kernels as
locopilot's embedded engine. The sdist is fetched with pip into a temporary
folder, only the ``llama-server`` target is built (portable CPU flags, no curl),
and the binary is kept in the temporary folder under
``locopilot-bench/llama-server-VERSION/`` (outside the repository, so nothing
built here can be committed; the worktree's ``.cache`` may be shared).

Usage: python bench/llama_server.py [--version 0.3.36] [--jobs N]   (prints the binary's path)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    # The same CPU flags as this project's llama-cpp-python build (pyproject.toml), so neither side
    # gets instructions the other lacks; static, so the binary needs no library path.
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
]


def binary_path(version: str = VERSION) -> Path:
    return Path(tempfile.gettempdir()) / "locopilot-bench" / f"llama-server-{version}" / "llama-server"


def fetch_sdist(version: str, folder: Path) -> Path:
    """Download the sdist (never a wheel) with pip, run through uvx so no pip is needed in the venv."""
    uvx = shutil.which("uvx")
    pip = [uvx, "--from", "pip", "pip"] if uvx else [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={version}", "-d", str(folder)],
        check=True,
    )
    return next(folder.glob("llama_cpp_python-*.tar.gz"))


def build(version: str = VERSION, jobs: int = os.cpu_count() or 1) -> Path:
    """Return the cached binary, building it first if it is missing (many minutes on a small machine)."""
    target = binary_path(version)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as temp:
        folder = Path(temp)
        sdist = fetch_sdist(version, folder)
        with tarfile.open(sdist) as archive:
            archive.extractall(folder, filter="data")
        source = next(folder.glob("llama_cpp_python-*/vendor/llama.cpp"))
        out = folder / "build"
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("building llama-server needs cmake and a C++ compiler")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run([cmake, "-S", str(source), "-B", str(out), *generator, *CMAKE_FLAGS], check=True)
        subprocess.run([cmake, "--build", str(out), "--target", "llama-server", "--parallel", str(jobs)], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(out / "bin" / "llama-server", partial)
        partial.rename(target)  # only a complete binary ever has the final name
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(build(args.version, args.jobs))


if __name__ == "__main__":
    main()
