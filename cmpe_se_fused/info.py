"""``python -m cmpe_se_fused.info``: versions, which backends are built and usable here, and why not."""
from __future__ import annotations

import importlib.util
import os
import platform
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


def main() -> None:
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


if __name__ == "__main__":
    main()
