"""The benchmark suite: ``python -m cmpe_se_fused.bench`` (see ``benchmarks/README.md``).

Modules: ``config`` (shape sets, presets, the case grid), ``providers`` (what computes the layer,
what each pass times), ``variants`` (launch-parameter sweeps), ``timing`` (CUDA-event, CUDA-graph
and CPU timers, copy bandwidth), ``metrics`` (bandwidth floors, row schema, ``--compare``),
``e2e`` (training-step rows), ``envinfo`` (versions, commit, kernel hash), ``report`` (JSON,
Markdown, console, plot), ``runner`` (the run, its phases and time budget).
"""
from __future__ import annotations

import logging


class _NoCudaHomeGuess(logging.Filter):
    """Drops torch's ``No CUDA runtime is found, using CUDA_HOME=...``: importing
    ``torch.utils.benchmark`` or running ``torch.compile`` on CPU imports ``torch.utils.cpp_extension``,
    which logs it on any machine with nvcc and no GPU. It is about building extensions, not about
    this run (issue 25); every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_torch_noise() -> None:
    """Install the filter once (the logger exists before torch creates it: getLogger is by name)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaHomeGuess) for f in log.filters):
        log.addFilter(_NoCudaHomeGuess())


quiet_torch_noise()
