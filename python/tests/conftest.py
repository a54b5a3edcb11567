"""Shared helpers: an f64 reference of the SE block and timm SE modules of every config."""

import torch
import torch.nn.functional as F
import pytest
from timm.layers.squeeze_excite import SEModule
from torch import nn

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}
GATE_NAMES = {"sigmoid": "sigmoid", "hard_sigmoid": "hard_sigmoid"}


def reference(x, w1, b1, w2, b2, residual=None, activation="relu", gate="sigmoid"):
    """The SE block in f64 with plain torch ops (DESIGN.md's math)."""
    d, c = w1.shape[0], w1.shape[1]
    x = x.double()
    z = x.mean((2, 3))
    h = z @ w1.reshape(d, c).double().T
    if b1 is not None:
        h = h + b1.double()
    u = F.relu(h) if activation == "relu" else F.silu(h)
    a = u @ w2.reshape(c, d).double().T
    if b2 is not None:
        a = a + b2.double()
    s = torch.sigmoid(a) if gate == "sigmoid" else F.hardsigmoid(a)
    y = s[:, :, None, None] * x
    if residual is not None:
        y = F.relu(y + residual.double())
    return y


def timm_se(channels, rd_channels, bias, activation, gate, seed=0):
    torch.manual_seed(seed)
    return SEModule(
        channels,
        rd_channels=rd_channels,
        bias=bias,
        act_layer=ACTS[activation],
        gate_layer=GATE_NAMES[gate],
    )


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
