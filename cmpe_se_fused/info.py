"""``python -m cmpe_se_fused.info``: versions, which backends are built and usable here, and why not."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import shutil
import sys


def collect() -> dict:
    import torch

    import cmpe_se_fused
    from cmpe_se_fused import ops
    from cmpe_se_fused.dispatch import AUTO_ORDER, BACKENDS

    info = {
        "cmpe_se_fused": cmpe_se_fused.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "cuda available": torch.cuda.is_available(),
        "triton": None,
    }
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton
            info["triton"] = triton.__version__
        except Exception as exc:  # noqa: BLE001
            info["triton"] = f"import failed: {exc}"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    info["extensions"] = {name: (status or "loaded") for name, status in ops.EXTENSION_STATUS.items()}
    info["build"] = build_summary(ops.BUILD_INFO)
    info["backends"] = {name: (be.static_reasons() or "usable") for name, be in BACKENDS.items()}
    info["auto order"] = {dev: " > ".join(order) for dev, order in AUTO_ORDER.items()}
    # backend choice and launch options (CMPE_SE_BACKEND, CMPE_SE_CUDA_PATH, ...: docs/CUDA.md)
    info["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("CMPE_SE_")} or \
        {"CMPE_SE_*": "(none set: defaults)"}
    chosen = info["environment"].get("CMPE_SE_BACKEND", "").strip()
    if chosen and chosen not in ("auto",) + tuple(BACKENDS):  # every layer with backend="auto" would raise
        info["environment"]["CMPE_SE_BACKEND"] += (f"  (invalid: not a backend; expected one of "
                                                   f"{', '.join(('auto',) + tuple(BACKENDS))})")
    return info


def build_summary(build_info: dict | None) -> dict:
    """What setup.py recorded: the torch it built against and the CUDA architectures."""
    if not build_info:
        return {"record": "none (cmpe_se_fused/_build_info.py is missing: not installed through setup.py)"}
    out = {"built against torch": f"{build_info.get('torch')} (CUDA {build_info.get('torch_cuda')})"}
    arch = build_info.get("cuda_arch") or {}
    if arch:
        out["cuda arch list"] = f"{arch.get('list')} ({arch.get('source')})"
        out["cuda code"] = "SASS " + (", ".join(arch.get("sass", [])) or "none") + \
            "; PTX " + (", ".join(arch.get("ptx", [])) or "none")
    return out


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME")
    return bool(shutil.which("nvcc") or (home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or
                glob.glob("/usr/local/cuda*/bin/nvcc"))


#: ``--require`` names besides the backend names (reference, cpu, triton, cuda: usable here)
REQUIRE_EXTRA = {
    "cuda-build": "cmpe_se_fused._C_cuda is built and loads (no GPU needed)",
    "built": "every extension this machine can build is built: _C and _fastpath, and _C_cuda where nvcc and a CUDA torch "
             "are present (unless the build opted out with CMPE_SE_SKIP_CUDA_BUILD / CMPE_SE_BUILD_ONLY, or "
             "skipped it because no GPU was visible and neither FORCE_CUDA=1 nor TORCH_CUDA_ARCH_LIST asked for it)",
}


def requirement_failures(names: list[str]) -> list[str]:
    """One line per requirement in ``names`` that this installation does not meet."""
    import torch

    from cmpe_se_fused import ops
    from cmpe_se_fused.dispatch import BACKENDS

    failures = []
    for name in names:
        if name in BACKENDS:
            reasons = BACKENDS[name].static_reasons()
            if reasons:
                failures.append(f"backend {name!r} is unusable: " + "; ".join(reasons))
        elif name in ("cuda-build", "built"):
            wanted = ["_C_cuda"] if name == "cuda-build" else ["_C", "_fastpath"]
            opted_out = ((ops.BUILD_INFO or {}).get("opted_out") or [])
            if name == "built" and torch.version.cuda and _nvcc_present() and "_C_cuda" not in opted_out:
                wanted.append("_C_cuda")
            failures += [f"cmpe_se_fused.{ext} is not loaded: {ops.EXTENSION_STATUS.get(ext)}"
                         for ext in wanted if ops.EXTENSION_STATUS.get(ext)]
        else:
            raise ValueError(f"--require: unknown name {name!r}; expected a comma-separated list of "
                             f"{sorted(BACKENDS) + sorted(REQUIRE_EXTRA)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmpe_se_fused.info", description=__doc__)
    parser.add_argument("--require", default="", metavar="NAMES",
                        help="comma-separated; exit 1 unless each is met: a backend name (usable here), "
                             + "; ".join(f"{k} ({v})" for k, v in REQUIRE_EXTRA.items()))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.require.split(",") if n.strip()]
    try:
        failures = requirement_failures(names) if names else []
    except ValueError as exc:
        parser.error(str(exc))
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                if isinstance(v, list):
                    v = "unusable: " + "; ".join(v)
                print(f"  {k:<{width}} {v}")
        else:
            print(f"{key:<{width}} {value}")
    for line in failures:
        print(f"REQUIRED BUT MISSING: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
