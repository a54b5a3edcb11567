"""``SqueezeExcite`` (timm ``SEModule``'s parameters and state-dict keys, senet's op inside) and
``patch`` / ``unpatch``, which swap the SE modules of a model in place and back."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .ops import ACTIVATIONS, GATES, squeeze_excite


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None, round_limit: float = 0.9) -> int:
    """timm's rounding of a reduced width to a multiple of ``divisor``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation with senet's fused op.

    Parameters and state-dict keys are those of timm's ``SEModule``: ``fc1`` and ``fc2`` are
    1x1 ``nn.Conv2d`` (``fc1.weight [hidden, C, 1, 1]``, ``fc1.bias``, ``fc2.weight``,
    ``fc2.bias``), initialised as PyTorch initialises them, so checkpoints load both ways.
    ``forward(x, residual=None)``; with ``residual`` it returns ``relu(s * x + residual)``.
    """

    _fc_names = ("fc1", "fc2")

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 8,
        bias: bool = True,
        activation: str = "relu",
        gate: str = "sigmoid",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        a, b = self._fc_names
        setattr(self, a, nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias))
        setattr(self, b, nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias))
        self.activation = activation
        self.gate = gate

    @classmethod
    def _from_convs(cls, fc_a: nn.Conv2d, fc_b: nn.Conv2d, activation: str, gate: str) -> "SqueezeExcite":
        """Wraps existing 1x1 convolutions (their Parameter objects are shared, not copied)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        a, b = cls._fc_names
        setattr(m, a, fc_a)
        setattr(m, b, fc_b)
        m.activation = activation
        m.gate = gate
        return m

    def _convs(self) -> Tuple[nn.Conv2d, nn.Conv2d]:
        a, b = self._fc_names
        return getattr(self, a), getattr(self, b)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        fa, fb = self._convs()
        return squeeze_excite(x, fa.weight, fa.bias, fb.weight, fb.bias, residual, self.activation, self.gate)

    def extra_repr(self) -> str:
        fa, _ = self._convs()
        return (
            f"channels={fa.in_channels}, hidden={fa.out_channels}, bias={fa.bias is not None}, "
            f"activation={self.activation}, gate={self.gate}"
        )


class EfficientNetSqueezeExcite(SqueezeExcite):
    """``SqueezeExcite`` with the state-dict keys of timm's EfficientNet-style ``SqueezeExcite``
    (``conv_reduce``, ``conv_expand``)."""

    _fc_names = ("conv_reduce", "conv_expand")


_ACT = {"ReLU": "relu", "SiLU": "silu", "Swish": "silu"}
_GATE = {"Sigmoid": "sigmoid", "Hardsigmoid": "hard_sigmoid", "HardSigmoid": "hard_sigmoid"}


def _map_act(m: nn.Module, table) -> Optional[str]:
    return table.get(type(m).__name__)


def _is_1x1(c: nn.Module) -> bool:
    return (
        isinstance(c, nn.Conv2d)
        and c.kernel_size == (1, 1)
        and c.stride == (1, 1)
        and c.padding == (0, 0)
        and c.dilation == (1, 1)
        and c.groups == 1
        and type(c) is nn.Conv2d
    )


def _convert(m: nn.Module) -> Tuple[Optional[nn.Module], Optional[str]]:
    """(replacement, None) for a compatible SE module, (None, reason) for an incompatible one,
    (None, None) for anything that is not an SE module."""
    kind = type(m).__name__
    if kind == "SEModule" and hasattr(m, "fc1") and hasattr(m, "fc2"):
        if type(getattr(m, "bn", nn.Identity())) is not nn.Identity:
            return None, "has a norm layer between the FCs"
        if getattr(m, "add_maxpool", False):
            return None, "adds max pooling to the squeeze"
        act, gate = _map_act(m.act, _ACT), _map_act(m.gate, _GATE)
        if act is None or gate is None:
            return None, f"activation {type(m.act).__name__} / gate {type(m.gate).__name__} not supported"
        if not (_is_1x1(m.fc1) and _is_1x1(m.fc2)):
            return None, "FC layers are not plain 1x1 convolutions"
        if (m.fc1.bias is None) != (m.fc2.bias is None):
            return None, "only one FC layer has a bias"
        return SqueezeExcite._from_convs(m.fc1, m.fc2, act, gate), None
    if kind == "SqueezeExcite" and hasattr(m, "conv_reduce") and hasattr(m, "conv_expand"):
        act, gate = _map_act(m.act1, _ACT), _map_act(m.gate, _GATE)
        if act is None or gate is None:
            return None, f"activation {type(m.act1).__name__} / gate {type(m.gate).__name__} not supported"
        if not (_is_1x1(m.conv_reduce) and _is_1x1(m.conv_expand)):
            return None, "FC layers are not plain 1x1 convolutions"
        if (m.conv_reduce.bias is None) != (m.conv_expand.bias is None):
            return None, "only one FC layer has a bias"
        return EfficientNetSqueezeExcite._from_convs(m.conv_reduce, m.conv_expand, act, gate), None
    return None, None


class PatchReport(int):
    """The number of SE modules ``patch`` replaced (an ``int``), with ``skipped``: the
    ``(qualified name, reason)`` of each SE-like module it left alone."""

    skipped: List[Tuple[str, str]]

    def __new__(cls, count: int, skipped: List[Tuple[str, str]]):
        r = super().__new__(cls, count)
        r.skipped = skipped
        return r


def patch(model: nn.Module) -> PatchReport:
    """Replaces, in place, every compatible SE module of ``model`` (timm's ``SEModule``; timm's
    EfficientNet-style ``SqueezeExcite`` whose activation is ReLU / SiLU and gate sigmoid /
    hard-sigmoid) by senet's, sharing the same parameters: the state dict keeps its keys and
    values, optimizers keep their references. Returns how many it replaced (``PatchReport``, an
    ``int`` with ``.skipped`` listing the incompatible ones by name and reason). ``unpatch``
    undoes it."""
    count = 0
    skipped: List[Tuple[str, str]] = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new, reason = _convert(child)
            full = f"{name}.{child_name}" if name else child_name
            if new is not None:
                new._senet_original = (child,)  # a tuple: not registered as a submodule
                new.train(child.training)
                setattr(parent, child_name, new)
                count += 1
            elif reason is not None:
                skipped.append((full, reason))
    return PatchReport(count, skipped)


def unpatch(model: nn.Module) -> int:
    """Puts back the modules ``patch`` replaced (with the same, possibly since trained,
    parameters); returns how many."""
    count = 0
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            orig = getattr(child, "_senet_original", None)
            if isinstance(child, SqueezeExcite) and orig is not None:
                orig[0].train(child.training)
                setattr(parent, child_name, orig[0])
                count += 1
    return count
