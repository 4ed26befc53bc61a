"""torchvision and Grad-CAM import in a fresh interpreter, whichever torch build is installed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

BARE = """
import json
try:
    import torchvision
except RuntimeError as error:
    print(json.dumps({"imported": False, "error": str(error)}))
else:
    print(json.dumps({"imported": True, "error": ""}))
"""

SHIMMED = """
import json
import torch
from inference.torchvision_compat import import_torchvision, torchvision_extension_loaded
torchvision = import_torchvision()
import pytorch_grad_cam
model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
logits = model(torch.zeros(1, 3, 32, 32))
print(json.dumps({
    "extension": torchvision_extension_loaded(),
    "logits": list(logits.shape),
    "grad_cam": pytorch_grad_cam.GradCAM.__name__,
}))
"""


def run_fresh(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_torchvision_and_grad_cam_import_after_the_shim_exactly_when_bare_import_fails() -> None:
    bare = run_fresh(BARE)
    shimmed = run_fresh(SHIMMED)

    assert shimmed["logits"] == [1, 2]
    assert shimmed["grad_cam"] == "GradCAM"
    if bare["imported"]:
        assert shimmed["extension"] is True
    else:
        # The CPU torch wheel with PyPI's CUDA torchvision: the case the shim exists for.
        assert "operator torchvision::nms does not exist" in str(bare["error"])
        assert shimmed["extension"] is False
