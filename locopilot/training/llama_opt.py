"""ctypes declarations for llama.cpp's training API, where llama-cpp-python 0.3.36 lacks or misdeclares them.

- Its ``llama_opt_params`` ends before ``optimizer_type``; the struct is passed by value, so a
  short declaration passes garbage for the optimizer. :class:`OptParams` is the full struct
  (llama.h at the bundled commit), and :attr:`TrainingLib.opt_init` / :attr:`TrainingLib.opt_epoch`
  are fresh function objects declared against it: llama-cpp-python's own are left alone.
- ``ggml_opt_*`` live in ``libggml-base`` and are not bound at all. A Python callback cannot
  return a struct by value, so the optimizer parameters come from the library's own
  ``ggml_opt_get_constant_optimizer_params`` reading an :class:`OptimizerParams` we own
  (edited between steps for a learning-rate schedule).

Nothing here is loaded at import: :func:`training_lib` opens the libraries.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGML_TYPE_I32 = 26
OPTIMIZERS = {"adamw": 0, "sgd": 1}  # enum ggml_opt_optimizer_type


class AdamWParams(ctypes.Structure):
    _fields_ = [
        ("alpha", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("wd", ctypes.c_float),
    ]


class SGDParams(ctypes.Structure):
    _fields_ = [("alpha", ctypes.c_float), ("wd", ctypes.c_float)]


class OptimizerParams(ctypes.Structure):
    """``struct ggml_opt_optimizer_params``."""

    _fields_ = [("adamw", AdamWParams), ("sgd", SGDParams)]


ParamFilter = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)


class OptParams(ctypes.Structure):
    """``struct llama_opt_params``, with the ``optimizer_type`` field the bindings lack."""

    _fields_ = [
        ("n_ctx_train", ctypes.c_uint32),
        ("param_filter", ParamFilter),
        ("param_filter_ud", ctypes.c_void_p),
        ("get_opt_pars", ctypes.c_void_p),  # a C function: ggml_opt_get_constant_optimizer_params
        ("get_opt_pars_ud", ctypes.c_void_p),
        ("optimizer_type", ctypes.c_int),
    ]


def _same_file(lib_dir: Path, stem: str) -> Path:
    """The copy of ``stem`` that libllama links against (``libggml-base.so.0``).

    The wheel ships ``libggml-base.so`` and ``libggml-base.so.0`` as two copies, not a
    symlink; a dataset made by the other copy would live in a second ggml.
    """
    pattern = re.compile(rf"^{re.escape(stem)}\.(so\.\d+|\d+\.dylib)$")
    names = sorted(p.name for p in lib_dir.iterdir() if pattern.match(p.name))
    return lib_dir / (names[0] if names else f"{stem}.so")


@dataclass
class TrainingLib:
    """The training functions of libllama and libggml-base, declared."""

    llama: Any
    ggml_base: ctypes.CDLL
    opt_init: Any
    opt_epoch: Any
    constant_optimizer_params: int  # address of ggml_opt_get_constant_optimizer_params


def training_lib() -> TrainingLib:
    """Open (or reuse) llama-cpp-python's libllama and the libggml-base it links, and declare what training needs."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    llama = bindings._lib  # the CDLL llama-cpp-python loaded from llama_cpp/lib at import
    base = ctypes.CDLL(str(_same_file(Path(llama_cpp.__file__).parent / "lib", "libggml-base")))
    p, i64 = ctypes.c_void_p, ctypes.c_int64

    def declare(name: str, restype: Any, *argtypes: Any) -> None:
        fn = getattr(base, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)

    declare("ggml_opt_dataset_init", p, ctypes.c_int, ctypes.c_int, i64, i64, i64, i64)
    declare("ggml_opt_dataset_free", None, p)
    declare("ggml_opt_dataset_data", p, p)
    declare("ggml_opt_dataset_labels", p, p)
    declare("ggml_opt_result_init", p)
    declare("ggml_opt_result_free", None, p)
    declare("ggml_opt_result_reset", None, p)
    declare("ggml_opt_result_loss", None, p, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double))
    declare("ggml_opt_result_ndata", None, p, ctypes.POINTER(i64))
    declare("ggml_opt_result_pred", None, p, ctypes.POINTER(ctypes.c_int32))
    declare("ggml_get_data", p, p)
    declare("ggml_get_name", ctypes.c_char_p, p)
    declare("ggml_nelements", i64, p)
    declare("ggml_nrows", i64, p)
    declare("ggml_n_dims", ctypes.c_int, p)

    opt_init = ctypes.CFUNCTYPE(None, p, p, OptParams)(("llama_opt_init", llama))
    epoch_callback = p  # ggml_opt_epoch_callback; we pass NULL and report between chunks
    opt_epoch = ctypes.CFUNCTYPE(None, p, p, p, p, i64, epoch_callback, epoch_callback)(("llama_opt_epoch", llama))
    constant = ctypes.cast(base.ggml_opt_get_constant_optimizer_params, ctypes.c_void_p).value
    assert constant is not None
    return TrainingLib(llama, base, opt_init, opt_epoch, constant)
