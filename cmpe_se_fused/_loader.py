"""Where the compiled libraries are, and loading them.

``_C`` (op schemas + CPU kernels) and ``_C_cuda`` (CUDA kernels) are plain shared libraries, not Python
extension modules: they define no ``PyInit_*`` and use no CPython API, so a process that never imports
``cmpe_se_fused`` (a serving process, a C++ program without libpython) loads them with
``torch.ops.load_library(path)`` (C++: ``dlopen``), and their static ``TORCH_LIBRARY`` registrations run.
``library_paths()`` says where they are (docs/DEPLOY.md).

Inside the package :func:`load` loads them the same way and leaves a small module object in
``sys.modules`` under the old names, so ``import cmpe_se_fused._C`` still works after
``import cmpe_se_fused``: it holds the library's path (``__file__``) and, for ``_C``, ``cpu_isa()``.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
import types

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: the libraries, in load order: _C defines the schemas that _C_cuda's kernels implement
LIBRARIES = ("_C", "_C_cuda")


def find(name: str) -> str | None:
    """The path of library ``name`` (``_C`` or ``_C_cuda``) in the installed package, or None if not built.
    setuptools names it like an extension module (``_C.cpython-311-x86_64-linux-gnu.so``, ``_C.abi3.so``)."""
    if name not in LIBRARIES:
        raise ValueError(f"name must be one of {LIBRARIES}, got {name!r}")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PACKAGE_DIR, name + suffix)
        if os.path.isfile(path):
            return path
    return None


class NotBuiltError(ImportError):
    """The library was not built (or not installed) in this package."""


def load(name: str) -> types.ModuleType:
    """Load library ``name`` into this process (its op registrations run) and return its module object.

    Raises :class:`NotBuiltError` when the file is missing (or ``sys.modules`` blocks it), ``OSError`` when it
    cannot be loaded (a missing dependency such as libcudart, or a torch other than the one it was built against)."""
    key = f"{__package__}.{name}"
    if key in sys.modules and sys.modules[key] is None:
        # Python's way to block an import (``sys.modules[name] = None``) blocks the load too, so that a test
        # or a user can run the package as if the library had not been built
        raise NotBuiltError(f"loading {key} halted: None in sys.modules", name=key)
    path = find(name)
    if path is None:
        raise NotBuiltError(f"cmpe_se_fused.{name} is not built: no {name}*.so in {PACKAGE_DIR}", name=name)
    import torch

    torch.ops.load_library(path)
    module = types.ModuleType(f"{__package__}.{name}", f"The loaded library {os.path.basename(path)} (see "
                              "cmpe_se_fused._loader): its ops are torch.ops.cmpe_se.*.")
    module.__file__ = path
    if name == "_C":
        module.cpu_isa = _cpu_isa_function(path)
    sys.modules[module.__name__] = module
    parent = sys.modules.get(__package__)
    if parent is not None:
        setattr(parent, name, module)
    return module


def _cpu_isa_function(path: str):
    fn = ctypes.CDLL(path).cmpe_se_cpu_isa  # the handle of the library already loaded above
    fn.restype, fn.argtypes = ctypes.c_char_p, []

    def cpu_isa() -> str:
        """The instruction-set build of the CPU kernels in use: ``'avx2'`` or ``'default'``."""
        return fn().decode()

    return cpu_isa
