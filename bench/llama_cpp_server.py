"""Run llama-cpp-python's own server (``python -m llama_cpp.server``) with ggml's backends loaded.

This project's llama-cpp-python is built with GGML_BACKEND_DL, so ggml's CPU
backend is a separate library that nothing loads unless asked; llama_cpp.server
does not ask, and fails with "Failed to load model from file". This registers
the backends the way locopilot's runner does, without importing locopilot, then
hands over to the server's own ``__main__`` with the command-line arguments intact.

Usage: python bench/llama_cpp_server.py [llama_cpp.server arguments]
(used by bench/engine.py and tests/test_llama_cpp_server.py)
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import runpy

import llama_cpp

lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
# libllama links the versioned libggml; backends registered in another copy stay invisible to it.
name = min(p.name for p in lib.iterdir() if re.match(r"^libggml\.(so\.\d+|\d+\.dylib)$", p.name))
ggml = ctypes.CDLL(str(lib / name))
ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
ggml.ggml_backend_load_all_from_path(str(lib).encode())
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
