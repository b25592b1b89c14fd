"""The runner: a child process that owns one loaded model.

Started by the API process as ``locopilot _runner`` (the same executable), it
reads framed ``ToRunner`` messages on stdin and writes ``FromRunner`` messages
on stdout (see protocol.py, children.py). The first message is ``Load``; the runner answers
``Ready`` or ``LoadFailed``. A llama.cpp crash kills only this process; the API
process sees end-of-stream and fails the requests it had in flight.

This module is the process: its pipes and the backend registration. The work
itself is continuously batched by :func:`locopilot.engine.scheduling.serve`, whose
loop also reads the requests, between steps (no reader thread: nothing to hand a
request over to, so an idle runner starts on one at once). stdout is
reserved for frames: anything llama.cpp or Python prints to file descriptor 1
is redirected to stderr (:func:`locopilot.children.prologue`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

from locopilot.children import Receiver, Sender, prologue
from locopilot.engine import offload, protocol
from locopilot.engine.batching import Engine
from locopilot.engine.protocol import CpuBackend, GpuDevice, Load, LoadFailed, Probe
from locopilot.engine.scheduling import Cancellations, Inbox, serve

log = logging.getLogger("locopilot.runner")


_size_p = ctypes.POINTER(ctypes.c_size_t)
#: ggml's backend functions the runner calls: name -> (restype, argtypes).
_GGML_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ggml_backend_dev_count": (ctypes.c_size_t, []),
    "ggml_backend_load_all_from_path": (None, [ctypes.c_char_p]),
    "ggml_backend_dev_get": (ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_dev_description": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_reg_by_name": (ctypes.c_void_p, [ctypes.c_char_p]),
    "ggml_backend_reg_get_proc_address": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "ggml_backend_load": (ctypes.c_void_p, [ctypes.c_char_p]),
    "ggml_backend_reg_dev_count": (ctypes.c_size_t, [ctypes.c_void_p]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_type": (ctypes.c_int, [ctypes.c_void_p]),
    "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
    "ggml_backend_dev_memory": (None, [ctypes.c_void_p, _size_p, _size_p]),
}


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    # The wheel stores libggml.so and libggml.so.0 as two copies, not a symlink;
    # libllama loads the versioned one, and a backend registered in the other
    # copy is invisible to it. So open ggml by the name libllama asked for.
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    pattern = re.compile(r"^libggml\.(so\.\d+|\d+\.dylib)$")
    names = sorted(p.name for p in lib_dir.iterdir() if pattern.match(p.name))
    ggml = ctypes.CDLL(str(lib_dir / (names[0] if names else "libggml.so")))
    for name, (restype, argtypes) in _GGML_SIGNATURES.items():
        function = getattr(ggml, name)
        function.restype = restype
        function.argtypes = argtypes
    return ggml


#: GPU companions: ``libggml-vulkan.so``, ``libggml-cuda.so``, ... (not the CPU variants nor ggml itself).
COMPANION = re.compile(r"^libggml-(?!cpu\b|cpu-|base\b)[a-z0-9]+\.(so|dylib)$")
_ACCELERATORS = {1, 2, 3}  # enum ggml_backend_dev_type: GPU, IGPU, ACCEL (0 is the CPU)


class Backends(msgspec.Struct, frozen=True):
    """What :func:`register_backends` registered: every device's description, the GPUs among them,
    and why a GPU companion that was there gave none ("" otherwise)."""

    devices: list[str]
    gpus: list[GpuDevice]
    note: str = ""


def companion_dirs(backends_dir: str) -> list[Path]:
    """Where GPU companions are looked for: ``backends_dir`` (LOCOPILOT_BACKENDS_DIR), then the
    folder of the one-file binary (a frozen build only: in development that is the venv's bin)."""
    dirs = [Path(backends_dir)] if backends_dir else []
    if getattr(sys, "frozen", False):
        dirs.append(Path(sys.executable).resolve().parent)
    return dirs


def load_backends(backends_dir: str = "") -> list[str]:
    """:func:`register_backends`; returns a description of each device found."""
    return register_backends(backends_dir).devices


def register_backends(backends_dir: str = "") -> Backends:
    """Register ggml's dynamically loaded backends: the CPU variants from llama_cpp/lib, then each
    GPU companion in :func:`companion_dirs`.

    llama-cpp-python does not do this itself; with GGML_BACKEND_DL a model load
    fails without it. A companion that does not load (no Vulkan loader or CUDA driver on
    this machine) or finds no device leaves the CPU to do the work, with one log line.
    """
    import llama_cpp

    ggml = _ggml()
    note = ""
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(Path(llama_cpp.__file__).parent / "lib").encode())
        note = _load_companions(ggml, companion_dirs(backends_dir))
    devices: list[str] = []
    gpus: list[GpuDevice] = []
    for i in range(int(ggml.ggml_backend_dev_count())):
        dev = ggml.ggml_backend_dev_get(i)
        description = ggml.ggml_backend_dev_description(dev).decode(errors="replace")
        devices.append(description)
        if int(ggml.ggml_backend_dev_type(dev)) in _ACCELERATORS:
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            backend = ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)).decode(errors="replace")
            name = ggml.ggml_backend_dev_name(dev).decode(errors="replace")
            gpus.append(
                GpuDevice(
                    backend=backend,
                    name=name,
                    description=description,
                    memory_free=free.value,
                    memory_total=total.value,
                )
            )
    if note:
        log.warning("%s; %s", note, f"using {', '.join(g.name for g in gpus)}" if gpus else "running on the CPU")
    return Backends(devices, gpus, note)


def _load_companions(ggml: ctypes.CDLL, dirs: list[Path]) -> str:
    """Register every companion in ``dirs`` (the first of each name wins); why the ones found gave no GPU."""
    problems: list[str] = []
    seen: set[str] = set()
    for folder in dirs:
        try:
            paths = sorted(p for p in folder.iterdir() if COMPANION.match(p.name) and p.name not in seen)
        except OSError:
            continue
        for path in paths:
            seen.add(path.name)
            reg = ggml.ggml_backend_load(os.fsencode(path))
            if not reg:
                problems.append(f"{path} did not load: {_load_error(path)}")
            elif ggml.ggml_backend_reg_dev_count(reg) == 0:
                problems.append(f"{path} found no device{_NO_DEVICE_HINT.get(path.name, '')}")
    return "; ".join(problems)


_NO_DEVICE_HINT = {
    "libggml-vulkan.so": (
        " (a CPU-only Vulkan driver such as lavapipe is used only when GGML_VK_VISIBLE_DEVICES names it)"
    ),
}


def _load_error(path: Path) -> str:
    """Why dlopen refuses ``path`` (a missing libvulkan.so.1, libcudart, driver), or that ggml refused it.

    dlopen and dlerror directly: a frozen build's ctypes replaces the loader's message with
    PyInstaller's guess.
    """
    try:
        libc = ctypes.CDLL(None)
        dlopen, dlerror = libc.dlopen, libc.dlerror
    except AttributeError:  # glibc before 2.34 keeps them in libdl
        libdl = ctypes.CDLL("libdl.so.2")
        dlopen, dlerror = libdl.dlopen, libdl.dlerror
    dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    dlerror.restype, dlerror.argtypes = ctypes.c_char_p, []
    if not dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_LOCAL):
        message = dlerror()
        return message.decode(errors="replace") if message else "dlopen failed"
    return "it loads, but ggml refused it (another ggml version, or its driver failed to start)"


class _Feature(ctypes.Structure):
    """``struct ggml_backend_feature``: a name and a value, a list ended by a NULL name."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class _DlInfo(ctypes.Structure):
    """``Dl_info`` of dladdr(3)."""

    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


#: ``libggml-cpu-haswell.so`` (one of the portable build's variants) -> ``haswell``.
CPU_VARIANT = re.compile(r"^libggml-cpu-(?P<variant>[\w.]+)\.(so|dylib)$")


def cpu_backend() -> CpuBackend:
    """Which CPU library ggml chose (after :func:`load_backends`) and what it was compiled with.

    ggml tells no variant name itself: every variant registers as "CPU", and the loader
    closes the variants it did not choose, so the library that holds the chosen
    backend's functions (dladdr) is the chosen one, and its file name says which.
    """
    ggml = _ggml()
    reg = ggml.ggml_backend_reg_by_name(b"CPU")
    if not reg:
        return CpuBackend()
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    features: list[str] = []
    library: str | None = None
    if address:
        get_features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(address)
        found = get_features(reg)
        i = 0
        while found[i].name is not None:
            name, value = found[i].name.decode(), (found[i].value or b"").decode()
            features.append(name if value == "1" else f"{name}={value}")
            i += 1
        libc = ctypes.CDLL(None)
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if libc.dladdr(address, ctypes.byref(info)) and info.dli_fname:
            library = Path(os.fsdecode(info.dli_fname)).name
    match = CPU_VARIANT.match(library or "")
    return CpuBackend(library=library, variant=match["variant"] if match else None, features=features)


def probe(args: list[str]) -> int:
    """``_runner --probe [--backends-dir DIR]``: print llama.cpp's version, devices, GPUs and CPU
    library as JSON; 1 if no device."""
    import llama_cpp

    backends_dir = args[args.index("--backends-dir") + 1] if "--backends-dir" in args[:-1] else ""
    found = register_backends(backends_dir)
    print(
        msgspec.json.encode(
            Probe(
                version=llama_cpp.__version__,
                devices=found.devices,
                cpu=cpu_backend() if found.devices else None,
                gpus=found.gpus,
                gpu_note=found.note,
            )
        ).decode()
    )
    return 0 if found.devices else 1


def main() -> int:
    """Entry point of ``locopilot _runner``; returns the exit status."""
    # The server drains its requests and then ends this runner by closing stdin (children.prologue).
    channel = Sender(prologue())
    requests = Receiver(0, protocol.to_runner)

    load = requests.receive()
    if load is None:
        return 0
    if not isinstance(load, Load):
        channel.send(LoadFailed(message=f"expected a load message, got {type(load).__name__}"))
        return 2
    try:
        backends = register_backends(load.backends_dir)
        if not backends.devices:
            raise RuntimeError("llama.cpp found no usable backend for this CPU")
        placed = offload.choose(load, backends.gpus)
        engine = Engine(msgspec.structs.replace(load, gpu_layers=placed.layers))
    except (ValueError, RuntimeError, OSError) as exc:
        # llama-cpp-python raises ValueError for a file llama.cpp cannot load.
        channel.send(LoadFailed(message=f"{type(exc).__name__}: {exc}"))
        return 1
    if backends.gpus:
        log.warning("%s", placed.reason)
    channel.send(msgspec.structs.replace(engine.ready(), gpu_layers=placed.on_gpu, offload=placed.reason))

    serve(engine, Inbox(requests.receive_all, Cancellations()), channel.send_all)
    return 0
