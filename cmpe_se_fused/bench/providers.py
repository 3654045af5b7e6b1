"""Providers (what computes the layer) and passes (what is timed).

Providers:

* ``eager``       ``CMPESE(..., backend="reference")``: the plain-PyTorch reference, the baseline;
* ``compile``     ``torch.compile`` of that module (default mode, static shapes);
* ``compile-max`` the same with ``mode="max-autotune-no-cudagraphs"`` (GPU);
* ``cpu``, ``triton``, ``cuda``: the package's backends, when usable here
  (``dispatch.BACKENDS[name].not_supported_reasons(u)``);
* ``triton@V``, ``cuda@V``: a backend under launch-configuration variant ``V`` (the sweep;
  :mod:`cmpe_se_fused.bench.variants`).

Passes, for input copy ``i`` (``U_i``, ``X_i`` leaf tensors, ``dY_i`` random):

* ``fwd``    ``Y = se(U_i, X_i)``; with autograd recording in train, under ``no_grad`` in eval;
* ``bwd``    ``autograd.grad(Y_i, (U_i, X_i, *weights), dY_i)`` on a graph built beforehand;
* ``fwdbwd`` both, as in a training step.
"""
from __future__ import annotations

import torch

from .. import dispatch
from ..modules import CMPESE
from . import variants
from .config import DTYPES, Case
from .variants import launch_context  # noqa: F401  (re-exported for the runner)

COMPILE_PROVIDERS = {"compile": None, "compile-max": "max-autotune-no-cudagraphs"}
BACKEND_PROVIDERS = ("cpu", "triton", "cuda")
DEFAULT_PROVIDERS = {"cpu": ("eager", "compile", "cpu"),
                     "cuda": ("eager", "compile", "compile-max", "triton", "cuda")}
KNOWN_PROVIDERS = ("eager",) + tuple(COMPILE_PROVIDERS) + BACKEND_PROVIDERS


def default_providers(device: torch.device, with_variants: bool = False) -> tuple:
    names = list(DEFAULT_PROVIDERS.get(device.type, ("eager",)))
    if with_variants:
        names += [v for v in variants.VARIANTS if v.partition("@")[0] in names]
    return tuple(names)


def check_provider_name(name: str):
    base = name.split("@")[0]
    bad_variant = "@" in name and (base not in BACKEND_PROVIDERS or variants.unknown_reason(name))
    if base not in KNOWN_PROVIDERS or bad_variant:
        raise ValueError(f"unknown provider {name!r}; expected one of {list(KNOWN_PROVIDERS)} "
                         f"or a variant {sorted(variants.VARIANTS)} (add one with --variant)")


def provider_reasons(name: str, sample: torch.Tensor) -> list[str]:
    """Why ``name`` cannot run inputs like ``sample`` here (empty: it can)."""
    base, _, variant = name.partition("@")
    if base == "eager":
        return []
    if base in COMPILE_PROVIDERS:
        if not hasattr(torch, "compile"):
            return ["torch.compile is not available in this torch"]
        if base == "compile-max" and sample.device.type != "cuda":
            return ["compile-max (max-autotune) is a GPU provider"]
        return []
    if base == "triton" and sample.device.type == "cpu":
        return [("the Triton backend runs on CPU only under the TRITON_INTERPRET interpreter: a test tool, "
                 "not something to time")]
    reasons = list(dispatch.BACKENDS[base].not_supported_reasons(sample))
    if variant and variants.unknown_reason(name):
        reasons.append(variants.unknown_reason(name))
    return reasons


def reference_module(case: Case, seed: int = 0) -> CMPESE:
    """The case's layer with seeded random weights, BN affine and running statistics (never the
    trivial identity BN), on CPU; every provider loads this state_dict."""
    torch.manual_seed(seed)
    s = case.shape
    m = CMPESE(s.c, mode=case.mode, fold_width=s.fold_width, pair_filters=s.pair_filters, backend="reference")
    if hasattr(m, "pair_bn"):
        with torch.no_grad():
            bn = m.pair_bn
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def build(name: str, case: Case, state: dict, device: torch.device):
    """The provider's callable ``module(u, x)`` and its parameters (weights stay fp32)."""
    base = name.split("@")[0]
    s = case.shape
    backend = "reference" if base == "eager" or base in COMPILE_PROVIDERS else base
    m = CMPESE(s.c, mode=case.mode, fold_width=s.fold_width, pair_filters=s.pair_filters, backend=backend)
    m.load_state_dict(state)
    m = m.to(device).train(case.training)
    params = list(m.parameters())
    if base in COMPILE_PROVIDERS:
        torch._dynamo.reset()  # every case compiles afresh: no recompile-limit fallbacks to eager
        return torch.compile(m, mode=COMPILE_PROVIDERS[base], dynamic=False), params
    return m, params


class Inputs:
    """``n`` copies of ``U``, ``X`` (leaf tensors, requires_grad) and ``dY``: random normal data in
    the case's dtype and layout."""

    def __init__(self, case: Case, n: int, device: torch.device, seed: int = 1):
        gen = torch.Generator(device=device).manual_seed(seed)
        s, dtype = case.shape, DTYPES[case.dtype]
        fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format

        def rand():
            t = torch.randn((s.n, s.c, s.h, s.w), generator=gen, device=device, dtype=dtype)
            return t.contiguous(memory_format=fmt)

        self.u = [rand().requires_grad_(True) for _ in range(n)]
        self.x = [rand().requires_grad_(True) for _ in range(n)]
        self.dy = [rand() for _ in range(n)]
        self.n = n


class Pass:
    """``pass_(i)`` runs one pass on input copy ``i``. ``prepare()`` (bwd) builds the autograd
    graphs the timed backward calls reuse (``retain_graph=True``)."""

    def __init__(self, name: str, module, params, inputs: Inputs, training: bool):
        self.name, self.module, self.params, self.inp, self.training = name, module, params, inputs, training
        self.ys = None

    def prepare(self):
        if self.name == "bwd":
            self.ys = [self.module(u, x) for u, x in zip(self.inp.u, self.inp.x)]

    def release(self):
        self.ys = None

    def _wrt(self, i):
        return [self.inp.u[i], self.inp.x[i]] + self.params

    def __call__(self, i: int):
        inp = self.inp
        if self.name == "fwd":
            if self.training:
                return self.module(inp.u[i], inp.x[i])
            with torch.no_grad():
                return self.module(inp.u[i], inp.x[i])
        if self.name == "bwd":
            return torch.autograd.grad(self.ys[i], self._wrt(i), inp.dy[i], retain_graph=True)
        y = self.module(inp.u[i], inp.x[i])
        return torch.autograd.grad(y, self._wrt(i), inp.dy[i])


def error_vs(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|, in fp32: a sanity check that a fast provider computes the layer."""
    ref32 = ref.detach().float()
    return float((y.detach().float() - ref32).abs().max() / ref32.abs().max().clamp_min(1e-12))


TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 5e-3}
