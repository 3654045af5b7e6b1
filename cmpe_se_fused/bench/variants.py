"""Launch-configuration variants: the sweep of GPU.md ("make every run a sweep").

A variant is a provider named ``backend@name`` that runs a backend with non-default launch
parameters, timed beside the default on the same rows:

* ``triton@...``: keyword arguments of ``cmpe_se_fused.triton.streaming.forward`` / ``backward`` (``num_warps``,
  ``chunks``, ``block_c``, ``block_p``, ``block_k``, ``single_launch``), applied in-process by
  wrapping those two functions for the duration of the provider's timings;
* ``cuda@...``, ``cpu@...``: environment variables of the compiled backends (``CMPE_SE_CUDA_THREADS``,
  ``_BLOCKS``, ``_SPLITS``, ``_VEC``, ``_COOP``, ``_PATH``, ``_CLUSTER``; docs/CUDA.md), which the extension reads once per
  process, so each such variant runs in a child process of the suite (``--as-variant``) and its
  rows are merged into this run.

``--variant NAME:key=value,...`` adds one from the command line, e.g.
``--variant triton@bp64:block_p=64`` or ``--variant cuda@s4:CMPE_SE_CUDA_SPLITS=4``.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect

#: the variants the gpu preset sweeps (each must be legal for every shape of the preset)
DEFAULT_VARIANTS: dict[str, dict] = {
    "triton@w2": {"num_warps": 2},
    "triton@w8": {"num_warps": 8},
    "triton@chunks1": {"chunks": 1},
    "triton@multi": {"single_launch": False},
    "cuda@t128": {"CMPE_SE_CUDA_THREADS": "128"},
    "cuda@t512": {"CMPE_SE_CUDA_THREADS": "512"},
    # forward paths without grid barriers (se, double_fc, eval pair modes; others keep the default)
    "cuda@resident": {"CMPE_SE_CUDA_PATH": "resident"},
    "cuda@resident_c8": {"CMPE_SE_CUDA_PATH": "resident", "CMPE_SE_CUDA_CLUSTER": "8"},  # 1 block/SM, portable
    "cuda@per_sample": {"CMPE_SE_CUDA_PATH": "per_sample"},
}
VARIANTS: dict[str, dict] = dict(DEFAULT_VARIANTS)
ENV_BACKENDS = ("cuda", "cpu")
KWARG_BACKENDS = ("triton",)


def _value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text.strip()


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"triton@bp64:block_p=64,num_warps=8"`` -> ``("triton@bp64", {"block_p": 64, "num_warps": 8})``."""
    name, _, params = spec.partition(":")
    base = name.partition("@")[0]
    if "@" not in name or base not in ENV_BACKENDS + KWARG_BACKENDS or not params:
        raise ValueError(f"--variant {spec!r}: expected triton@NAME:key=value,... or cuda@NAME:ENV_VAR=value,...")
    out = {}
    for item in params.split(","):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--variant {spec!r}: {item!r} is not key=value")
        out[key.strip()] = val.strip() if base in ENV_BACKENDS else _value(val)
    return name, out


def register(spec: str) -> str:
    name, params = parse_variant(spec)
    VARIANTS[name] = params
    return name


def is_env_variant(provider: str) -> bool:
    return "@" in provider and provider.partition("@")[0] in ENV_BACKENDS


def unknown_reason(provider: str) -> str | None:
    if provider not in VARIANTS:
        return f"no launch variant {provider!r} (known: {sorted(VARIANTS)}; add one with --variant)"
    return None


@contextlib.contextmanager
def triton_launch(params: dict):
    """Run the Triton op with ``params`` as keyword arguments of the kernels' Python launchers
    (``ops.py`` looks ``streaming.forward``/``backward`` up at every call)."""
    tk = importlib.import_module("cmpe_se_fused.triton.streaming")
    orig_f, orig_b = tk.forward, tk.backward
    kf = {k: v for k, v in params.items() if k in inspect.signature(orig_f).parameters}
    kb = {k: v for k, v in params.items() if k in inspect.signature(orig_b).parameters}
    unused = set(params) - set(kf) - set(kb)
    if unused:
        raise ValueError(f"cmpe_se_fused.triton.streaming.forward/backward take no parameter {sorted(unused)}")

    def forward(*args):
        return orig_f(*args, **kf)

    def backward(*args):
        return orig_b(*args, **kb)

    tk.forward, tk.backward = forward, backward
    try:
        yield
    finally:
        tk.forward, tk.backward = orig_f, orig_b


def launch_context(provider: str):
    """The context a provider's calls run in: a Triton variant's launcher keywords, else nothing
    (CUDA variants get their environment from the child process)."""
    base, _, _ = provider.partition("@")
    if "@" in provider and base in KWARG_BACKENDS:
        return triton_launch(VARIANTS[provider])
    return contextlib.nullcontext()
