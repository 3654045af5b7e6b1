"""cmpe_se_fused: fused kernels for the competitive squeeze-and-excitation layer (CMPE-SE).

``CMPESE(channels, mode=...)`` is the drop-in layer; ``functional.cmpe_se`` the functional form;
``models`` the paper's networks; ``python -m cmpe_se_fused.info`` says which backends run here;
docs/DEPLOY.md how to deploy a model (ONNX, torch.export, AOTInductor, C++).
"""
from . import ops  # noqa: F401  (registers the custom ops)
from . import functional, models, reference
from .dispatch import BACKEND_NAMES, availability
from .functional import cmpe_se
from .modules import CMPESE
from . import convert, distributed, viz  # noqa: E402,F401  (viz imports matplotlib only when plotting)
from .convert import convert_model, revert_model
from .deploy import library_path, library_paths
from .distributed import SyncCMPESE, convert_sync_cmpe_se
from .reference import MODES, CMPESEReference

__version__ = "0.1.0"
__all__ = ["CMPESE", "CMPESEReference", "cmpe_se", "functional", "models", "reference", "MODES", "BACKEND_NAMES",
           "availability", "convert_model", "revert_model", "SyncCMPESE", "convert_sync_cmpe_se", "library_path",
           "library_paths", "__version__"]
