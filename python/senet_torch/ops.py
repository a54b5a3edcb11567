"""senet's SE op as PyTorch custom ops: ``senet::se_forward`` and ``senet::se_backward``.

Both are registered with ``torch.library.custom_op`` (with ``register_fake`` for meta tensors and
``torch.compile``, and ``register_autograd`` tying backward to forward). Tensors cross into Rust
as ``data_ptr()`` integers, never copies: outputs, the saved state and the gradients are
allocated here by torch, and the Rust side fills them in place.

Layouts: NCHW (contiguous) and channels_last run as they are; any other strides are made
contiguous first. Weights are FC matrices ``w1 [hidden, channels]``, ``w2 [channels, hidden]``
or the 1x1 convolution weights ``[out, in, 1, 1]`` of timm's ``SEModule``; biases optional.
Activations f32, bf16 or f16 run senet's fast CPU path with f32 weights (other weight dtypes are
cast, and their gradients cast back); f64 runs an f64 version of the reference math with f64
weights (for ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _senet

ACTIVATIONS = ("relu", "silu")
GATES = ("sigmoid", "hard_sigmoid")
_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


class SenetDeviceError(RuntimeError):
    """A tensor is on a device this build of senet_torch cannot run on."""


def _layout(x: Tensor) -> str:
    """'nchw' for contiguous (and for anything else, which is made contiguous), 'nhwc' for
    channels_last."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "nchw"


def _format(layout: str) -> torch.memory_format:
    return torch.contiguous_format if layout == "nchw" else torch.channels_last


def _in_layout(t: Tensor, layout: str) -> Tensor:
    return t.contiguous(memory_format=_format(layout))


def _state_dtype(x: Tensor) -> torch.dtype:
    """dtype of the weights as the kernels read them and of the saved state."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    gate: str,
) -> Tuple[int, int]:
    """Validates the operands; returns (channels, hidden)."""
    if x.dim() != 4:
        raise ValueError(f"senet: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"senet: x must be float32, bfloat16, float16 or float64, got {x.dtype}"
        )
    if x.numel() == 0:
        raise ValueError(f"senet: x has a zero-sized dimension: {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"senet: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate not in GATES:
        raise ValueError(f"senet: gate must be one of {GATES}, got {gate!r}")
    c = x.shape[1]
    if w1.dim() not in (2, 4) or (w1.dim() == 4 and tuple(w1.shape[2:]) != (1, 1)):
        raise ValueError(f"senet: w1 must be [hidden, C] or [hidden, C, 1, 1], got {tuple(w1.shape)}")
    d = w1.shape[0]
    if w1.shape[1] != c:
        raise ValueError(f"senet: w1 {tuple(w1.shape)} does not match x's {c} channels")
    if w2.dim() != w1.dim() or tuple(w2.shape[:2]) != (c, d) or (w2.dim() == 4 and tuple(w2.shape[2:]) != (1, 1)):
        raise ValueError(
            f"senet: w2 must be [{c}, {d}] (or [{c}, {d}, 1, 1]) to match w1, got {tuple(w2.shape)}"
        )
    if (b1 is None) != (b2 is None):
        raise ValueError("senet: give both biases or neither")
    if b1 is not None and b2 is not None:
        if tuple(b1.shape) != (d,) or tuple(b2.shape) != (c,):
            raise ValueError(
                f"senet: biases must be [{d}] and [{c}], got {tuple(b1.shape)} and {tuple(b2.shape)}"
            )
    params = [w1, w2] + [b for b in (b1, b2) if b is not None]
    for p in params:
        if not p.dtype.is_floating_point:
            raise TypeError(f"senet: weights must be floating point, got {p.dtype}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"senet: residual {tuple(residual.shape)} {residual.dtype} must match x "
                f"{tuple(x.shape)} {x.dtype}"
            )
    for t in [x, residual] + params:
        if t is not None and t.device != x.device:
            raise SenetDeviceError(f"senet: operands on {t.device} and {x.device}")
    if x.device.type not in ("cpu", "meta"):
        if x.device.type != "cuda":
            raise SenetDeviceError(f"senet: unsupported device {x.device}")
        if not _senet.cuda_supported():
            raise SenetDeviceError(
                "senet: this build of senet_torch has no CUDA kernels (nvcc was not found when "
                f"it was built); x is on {x.device}"
            )
        if x.dtype == torch.float64:
            raise TypeError("senet: float64 runs on the CPU only; CUDA takes float32, bfloat16, float16")
    return c, d


def _stream(x: Tensor) -> Tuple[int, int]:
    """(device ordinal, torch's current stream on it) for a CUDA tensor."""
    return x.device.index or 0, torch.cuda.current_stream(x.device).cuda_stream


def _workspace(x: Tensor, args, backward: bool) -> Tensor:
    """The op's scratch memory, from torch's caching allocator (on x's device)."""
    dev, stream = _stream(x)
    n = _senet.cuda_workspace_bytes(*args, dev, stream, backward)
    return torch.empty((max(n, 1),), dtype=torch.uint8, device=x.device)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _weights(w1, b1, w2, b2, dtype):
    c, d = w2.shape[0], w1.shape[0]
    w1 = w1.reshape(d, c).to(dtype).contiguous()
    w2 = w2.reshape(c, d).to(dtype).contiguous()
    b1 = None if b1 is None else b1.to(dtype).contiguous()
    b2 = None if b2 is None else b2.to(dtype).contiguous()
    return w1, b1, w2, b2


@torch.library.custom_op("senet::se_forward", mutates_args=(), device_types=None)
def se_forward(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    gate: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE forward: returns ``(y, z, h, u, s)``; ``y = s * x`` (``relu(s * x + residual)`` with a
    residual), ``z, h, u, s`` the saved state backward reads (``[N, C]``, ``[N, hidden]``,
    ``[N, hidden]``, ``[N, C]``)."""
    c, d = _check(x, w1, b1, w2, b2, residual, activation, gate)
    layout = _layout(x)
    x = _in_layout(x, layout)
    if residual is not None:
        residual = _in_layout(residual, layout)
    sd = _state_dtype(x)
    w1, b1, w2, b2 = _weights(w1, b1, w2, b2, sd)
    n = x.shape[0]
    y = torch.empty_like(x, memory_format=_format(layout))
    z = x.new_empty((n, c), dtype=sd)
    h = x.new_empty((n, d), dtype=sd)
    u = x.new_empty((n, d), dtype=sd)
    s = x.new_empty((n, c), dtype=sd)
    problem = (_DTYPES[x.dtype], layout, tuple(x.shape), d, b1 is not None, activation, gate)
    ptrs = (
        x.data_ptr(), _ptr(residual), y.data_ptr(),
        w1.data_ptr(), _ptr(b1), w2.data_ptr(), _ptr(b2),
        z.data_ptr(), h.data_ptr(), u.data_ptr(), s.data_ptr(),
    )
    if x.is_cuda:
        ws = _workspace(x, problem, False)
        _senet.forward_cuda(*problem, *_stream(x), *ptrs, ws.data_ptr(), ws.numel())
    else:
        _senet.forward(*problem, *ptrs)
    return y, z, h, u, s


@se_forward.register_fake
def _se_forward_fake(x, w1, b1, w2, b2, residual, activation, gate):
    c, d = _check(x, w1, b1, w2, b2, residual, activation, gate)
    layout = _layout(x)
    sd = _state_dtype(x)
    n = x.shape[0]
    y = torch.empty_like(x, memory_format=_format(layout))
    return (
        y,
        x.new_empty((n, c), dtype=sd),
        x.new_empty((n, d), dtype=sd),
        x.new_empty((n, d), dtype=sd),
        x.new_empty((n, c), dtype=sd),
    )


@torch.library.custom_op("senet::se_backward", mutates_args=(), device_types=None)
def se_backward(
    dy: Tensor,
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    residual: Optional[Tensor],
    z: Tensor,
    h: Tensor,
    u: Tensor,
    s: Tensor,
    activation: str,
    gate: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE backward: returns ``(dx, d_residual, dw1, db1, dw2, db2)``, each parameter gradient in
    its weight's shape and dtype. Absent operands (no residual, no bias) get empty tensors."""
    c, d = _check(x, w1, b1, w2, b2, residual, activation, gate)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"senet: dy {tuple(dy.shape)} {dy.dtype} must match x {tuple(x.shape)} {x.dtype}")
    layout = _layout(x)
    x = _in_layout(x, layout)
    dy = _in_layout(dy, layout)
    if residual is not None:
        residual = _in_layout(residual, layout)
    sd = _state_dtype(x)
    n = x.shape[0]
    for name, t, shape in (("z", z, (n, c)), ("h", h, (n, d)), ("u", u, (n, d)), ("s", s, (n, c))):
        if tuple(t.shape) != shape or t.dtype != sd:
            raise ValueError(f"senet: saved {name} must be {shape} {sd}, got {tuple(t.shape)} {t.dtype}")
    z, h, u, s = (t.contiguous() for t in (z, h, u, s))
    w1k, b1k, w2k, b2k = _weights(w1, b1, w2, b2, sd)
    dx = torch.empty_like(x, memory_format=_format(layout))
    dres = torch.empty_like(x, memory_format=_format(layout)) if residual is not None else None
    dw1 = torch.empty_like(w1k)
    dw2 = torch.empty_like(w2k)
    db1 = torch.empty_like(b1k) if b1k is not None else None
    db2 = torch.empty_like(b2k) if b2k is not None else None
    problem = (_DTYPES[x.dtype], layout, tuple(x.shape), d, b1 is not None, activation, gate)
    ptrs = (
        x.data_ptr(), _ptr(residual), dy.data_ptr(),
        w1k.data_ptr(), _ptr(b1k), w2k.data_ptr(), _ptr(b2k),
        z.data_ptr(), h.data_ptr(), u.data_ptr(), s.data_ptr(),
        dx.data_ptr(), _ptr(dres), dw1.data_ptr(), _ptr(db1), dw2.data_ptr(), _ptr(db2),
    )
    if x.is_cuda:
        ws = _workspace(x, problem, True)
        _senet.backward_cuda(*problem, *_stream(x), *ptrs, ws.data_ptr(), ws.numel())
    else:
        _senet.backward(*problem, *ptrs)
    empty = x.new_empty((0,))
    return (
        dx,
        dres if dres is not None else empty,
        dw1.reshape(w1.shape).to(w1.dtype),
        db1.to(b1.dtype) if db1 is not None and b1 is not None else empty.clone(),
        dw2.reshape(w2.shape).to(w2.dtype),
        db2.to(b2.dtype) if db2 is not None and b2 is not None else empty.clone(),
    )


@se_backward.register_fake
def _se_backward_fake(dy, x, w1, b1, w2, b2, residual, z, h, u, s, activation, gate):
    _check(x, w1, b1, w2, b2, residual, activation, gate)
    layout = _layout(x)
    dx = torch.empty_like(x, memory_format=_format(layout))
    dres = torch.empty_like(x, memory_format=_format(layout)) if residual is not None else x.new_empty((0,))
    return (
        dx,
        dres,
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        torch.empty_like(b1) if b1 is not None else x.new_empty((0,)),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
        torch.empty_like(b2) if b2 is not None else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, gate = inputs
    _, z, h, u, s = output
    ctx.save_for_backward(x, w1, b1, w2, b2, residual, z, h, u, s)
    ctx.activation = activation
    ctx.gate = gate
    ctx.mark_non_differentiable(z, h, u, s)
    # The saved state's gradients are never read: leave them None rather than have autograd
    # fill [N, C] zero tensors on every backward (a parallel fill wakes torch's OpenMP threads,
    # which then spin on the cores senet's own threads are about to use).
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dz, _dh, _du, _ds):
    if dy is None:  # no gradient reached y (grads are not materialized, see _setup_context)
        return (None,) * 8
    x, w1, b1, w2, b2, residual, z, h, u, s = ctx.saved_tensors
    dx, dres, dw1, db1, dw2, db2 = se_backward(
        dy, x, w1, b1, w2, b2, residual, z, h, u, s, ctx.activation, ctx.gate
    )
    return (
        dx,
        dw1,
        db1 if b1 is not None else None,
        dw2,
        db2 if b2 is not None else None,
        dres if residual is not None else None,
        None,
        None,
    )


se_forward.register_autograd(_backward, setup_context=_setup_context)


def squeeze_excite(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    gate: str = "sigmoid",
) -> Tensor:
    """The SE block as a function: ``gate(W2 act(W1 mean_hw(x) + b1) + b2) * x``, or with
    ``residual`` the fused ``relu(s * x + residual)``. Differentiable (``senet::se_backward``)."""
    return torch.ops.senet.se_forward(x, w1, b1, w2, b2, residual, activation, gate)[0]
