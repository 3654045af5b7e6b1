"""The benchmark suite: ``python -m cmpe_se_fused.bench`` (see ``benchmarks/README.md``).

Modules: ``config`` (shape sets, presets, the case grid), ``providers`` (what computes the layer,
what each pass times), ``variants`` (launch-parameter sweeps), ``timing`` (CUDA-event, CUDA-graph
and CPU timers, copy bandwidth), ``metrics`` (bandwidth floors, row schema, ``--compare``),
``e2e`` (training-step rows), ``envinfo`` (versions, commit, kernel hash), ``report`` (JSON,
Markdown, console, plot), ``runner`` (the run, its phases and time budget).
"""
