"""The runner: a child process that owns one loaded model.

Started by the API process as ``locopilot _runner`` (the same executable), it
reads framed ``ToRunner`` messages on stdin and writes ``FromRunner`` messages
on stdout (see protocol.py, children.py). The first message is ``Load``; the runner answers
``Ready`` or ``LoadFailed``. A llama.cpp crash kills only this process; the API
process sees end-of-stream and fails the requests it had in flight.

This module is the process: its pipes, the backend registration and a reader
thread that turns frames into jobs and cancellations. The work itself is
continuously batched by :func:`locopilot.engine.batching.serve`. stdout is
reserved for frames: anything llama.cpp or Python prints to file descriptor 1
is redirected to stderr (:func:`locopilot.children.prologue`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import re
import threading
from pathlib import Path

import msgspec

from locopilot.children import Receiver, Sender, prologue
from locopilot.engine import protocol
from locopilot.engine.batching import Cancellations, Engine, serve
from locopilot.engine.protocol import Cancel, Count, CpuBackend, Embed, Generate, Load, LoadFailed, Probe

log = logging.getLogger("locopilot.runner")


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    # The wheel stores libggml.so and libggml.so.0 as two copies, not a symlink;
    # libllama loads the versioned one, and a backend registered in the other
    # copy is invisible to it. So open ggml by the name libllama asked for.
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    pattern = re.compile(r"^libggml\.(so\.\d+|\d+\.dylib)$")
    names = sorted(p.name for p in lib_dir.iterdir() if pattern.match(p.name))
    ggml = ctypes.CDLL(str(lib_dir / (names[0] if names else "libggml.so")))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return ggml


def load_backends() -> list[str]:
    """Register ggml's dynamically loaded backends (CPU variants, GPU) from llama_cpp/lib.

    llama-cpp-python does not do this itself; with GGML_BACKEND_DL a model load
    fails without it. Returns a description of each device found.
    """
    import llama_cpp

    ggml = _ggml()
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(Path(llama_cpp.__file__).parent / "lib").encode())
    count = int(ggml.ggml_backend_dev_count())
    return [
        ggml.ggml_backend_dev_description(ggml.ggml_backend_dev_get(i)).decode(errors="replace") for i in range(count)
    ]


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


def probe() -> int:
    """``_runner --probe``: print llama.cpp's version, devices and CPU library as JSON; 1 if no device."""
    import llama_cpp

    devices = load_backends()
    found = Probe(version=llama_cpp.__version__, devices=devices, cpu=cpu_backend() if devices else None)
    print(msgspec.json.encode(found).decode())
    return 0 if devices else 1


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
        if not load_backends():
            raise RuntimeError("llama.cpp found no usable backend for this CPU")
        engine = Engine(load)
    except (ValueError, RuntimeError, OSError) as exc:
        # llama-cpp-python raises ValueError for a file llama.cpp cannot load.
        channel.send(LoadFailed(message=f"{type(exc).__name__}: {exc}"))
        return 1
    channel.send(engine.ready())

    jobs: queue.Queue[Generate | Embed | Count | None] = queue.Queue()
    cancellations = Cancellations()

    def read_requests() -> None:
        try:
            for request in requests:
                match request:
                    case Cancel(id=job_id):
                        cancellations.cancel(job_id)
                    case Generate() | Embed() | Count() as job:
                        cancellations.begin(job.id)
                        jobs.put(job)
                    case Load():
                        log.warning("ignoring a second load message")
        finally:
            cancellations.close()
            jobs.put(None)

    threading.Thread(target=read_requests, name="runner-reader", daemon=True).start()
    serve(engine, jobs, channel.send_all, cancellations)
    return 0
