"""Import torchvision where its compiled extension does not match the installed torch.

The project pins ``torch==2.13.0`` and ``torchvision==0.28.0``. On a CPU host torch is the CPU
wheel, while PyPI's torchvision wheel is built for CUDA: its compiled extension (``_C.so``) does
not load. torchvision tolerates that for its compiled ops, except that
``torchvision._meta_registrations`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, and registering a kernel for an operator that was never
declared raises "RuntimeError: operator torchvision::nms does not exist". That aborts
``import torchvision`` and, through it, ``import pytorch_grad_cam``.

The classification networks and Grad-CAM need none of the compiled ops (detection NMS, RoI
pooling, deformable convolution). So when, and only when, the extension failed to load, this
module declares those two schemas without any kernel and imports torchvision again. Calling one
of the declared ops still fails loudly ("no kernel registered"); nothing is emulated. Where the
extension loads (matching wheels, CUDA hosts) the normal import is returned untouched.

Call :func:`import_torchvision` before anything imports ``torchvision`` or ``pytorch_grad_cam``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

# The schemas torchvision's Python package touches at import time when its extension is absent.
_SCHEMAS_USED_AT_IMPORT = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# torch removes a library's definitions when its Library object is garbage collected, so the
# declarations live as long as the process.
_declarations: list[torch.library.Library] = []


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, importable even on CPU torch with a CUDA torchvision.

    Idempotent. Raises the original error when the import fails for another reason than the
    compiled extension being unloadable.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError:
        extension = sys.modules.get("torchvision.extension")
        extension_failed = extension is not None and not extension._has_ops()
        if not extension_failed or _declarations:
            raise
    _forget_half_imported_torchvision()
    library = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
    for schema in _SCHEMAS_USED_AT_IMPORT:
        library.define(schema)  # type: ignore[no-untyped-call]
    _declarations.append(library)
    return importlib.import_module("torchvision")


def torchvision_extension_loaded() -> bool:
    """Whether torchvision's compiled ops are available (False when the shim was needed)."""
    return bool(import_torchvision().extension._has_ops())


def _forget_half_imported_torchvision() -> None:
    """Drop the submodules the failed import left behind, so the retry runs them afresh."""
    for name in [name for name in sys.modules if name.partition(".")[0] == "torchvision"]:
        del sys.modules[name]
