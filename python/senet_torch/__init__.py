"""senet_torch: senet's fused Squeeze-and-Excitation op for PyTorch.

- ``torch.ops.senet.se_forward`` / ``se_backward``: custom ops (autograd, ``torch.compile``,
  meta tensors), CPU f32 / bf16 / f16 through senet's fast path, f64 for gradient checks. CPU
  work runs on torch's own OpenMP threads (as many as ``torch.set_num_threads``), so it neither
  competes with torch's kernels for the cores nor waits for their spinning workers.
- ``squeeze_excite(x, w1, b1, w2, b2, residual=None, activation="relu", gate="sigmoid")``.
- ``SqueezeExcite``: an ``nn.Module`` with timm ``SEModule``'s parameters and state-dict keys.
- ``patch(model)`` / ``unpatch(model)``: swap a timm model's SE modules for senet's and back.
"""

from .ops import ACTIVATIONS, GATES, SenetDeviceError, se_backward, se_forward, squeeze_excite
from .modules import (
    EfficientNetSqueezeExcite,
    PatchReport,
    SqueezeExcite,
    make_divisible,
    patch,
    unpatch,
)
from . import _senet

cuda_supported = _senet.cuda_supported

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "EfficientNetSqueezeExcite",
    "PatchReport",
    "SenetDeviceError",
    "SqueezeExcite",
    "cuda_supported",
    "make_divisible",
    "patch",
    "se_backward",
    "se_forward",
    "squeeze_excite",
    "unpatch",
]
