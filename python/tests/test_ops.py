"""The custom ops: opcheck, gradcheck in f64, f32 / bf16 against timm's SEModule over odd shapes,
both memory formats and every act / gate / bias / residual combination, torch.compile, errors."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import senet_torch as st
from conftest import reference, rel_err, timm_se

COMBOS = list(itertools.product(["relu", "silu"], ["sigmoid", "hard_sigmoid"], [True, False], [False, True]))
FORMATS = [torch.contiguous_format, torch.channels_last]


def _weights(c, d, bias, dtype=torch.float32, requires_grad=False):
    w1 = (torch.randn(d, c, 1, 1, dtype=dtype) / c**0.5).requires_grad_(requires_grad)
    w2 = (torch.randn(c, d, 1, 1, dtype=dtype) / d**0.5).requires_grad_(requires_grad)
    b1 = (0.1 * torch.randn(d, dtype=dtype)).requires_grad_(requires_grad) if bias else None
    b2 = (0.1 * torch.randn(c, dtype=dtype)).requires_grad_(requires_grad) if bias else None
    return w1, b1, w2, b2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act,gate,bias,res", COMBOS[::3] + [COMBOS[-1]])
def test_opcheck(fmt, act, gate, bias, res):
    x = torch.randn(2, 12, 3, 5).to(memory_format=fmt).requires_grad_()
    w1, b1, w2, b2 = _weights(12, 4, bias, requires_grad=True)
    r = torch.randn(2, 12, 3, 5).to(memory_format=fmt).requires_grad_() if res else None
    torch.library.opcheck(torch.ops.senet.se_forward.default, (x, w1, b1, w2, b2, r, act, gate))


@pytest.mark.parametrize("act,gate,bias,res", COMBOS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_f64(act, gate, bias, res, fmt):
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    w1, b1, w2, b2 = _weights(6, 3, bias, torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 3, 2, dtype=torch.float64).to(memory_format=fmt).requires_grad_() if res else None

    def f(x, w1, b1, w2, b2, r):
        return st.squeeze_excite(x, w1, b1, w2, b2, r, act, gate)

    assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2, r))
    # and the f64 path computes the reference's values
    y = f(x, w1, b1, w2, b2, r)
    torch.testing.assert_close(y, reference(x, w1, b1, w2, b2, r, act, gate), rtol=1e-12, atol=1e-12)


SHAPES = [(1, 8, 1, 1), (3, 24, 7, 5), (2, 72, 9, 11), (5, 40, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act,gate,bias,res", COMBOS)
def test_f32_vs_timm(shape, fmt, act, gate, bias, res):
    n, c, h, w = shape
    d = max(c // 4, 1)
    m = timm_se(c, d, bias, act, gate)
    se = st.SqueezeExcite(c, rd_channels=d, bias=bias, activation=act, gate=gate)
    se.load_state_dict(m.state_dict())
    x = torch.randn(shape).to(memory_format=fmt)
    r = torch.randn(shape).to(memory_format=fmt) if res else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    r1 = r.clone().requires_grad_() if res else None
    r2 = r.clone().requires_grad_() if res else None
    y_timm = m(x1) if r is None else F.relu(m(x1) + r1)
    y = se(x2, r2)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, y_timm, rtol=1e-5, atol=1e-6)
    dy = torch.randn(shape)
    y_timm.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    if res:
        torch.testing.assert_close(r2.grad, r1.grad, rtol=1e-5, atol=1e-6)
    for (name, p_timm), (name2, p) in zip(m.named_parameters(), se.named_parameters()):
        assert name == name2
        torch.testing.assert_close(p.grad, p_timm.grad, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act,gate,bias,res", COMBOS)
def test_bf16_vs_timm(shape, fmt, act, gate, bias, res):
    """bf16 activations, f32 weights (the kernels' contract): against timm's SEModule run in f32
    on the same bf16-rounded inputs, within bf16's rounding of the outputs."""
    n, c, h, w = shape
    d = max(c // 4, 1)
    m = timm_se(c, d, bias, act, gate)
    se = st.SqueezeExcite(c, rd_channels=d, bias=bias, activation=act, gate=gate)
    se.load_state_dict(m.state_dict())
    xb = torch.randn(shape).to(torch.bfloat16).to(memory_format=fmt)
    rb = torch.randn(shape).to(torch.bfloat16).to(memory_format=fmt) if res else None
    x1 = xb.float().requires_grad_()
    r1 = rb.float().requires_grad_() if res else None
    x2 = xb.clone().requires_grad_()
    r2 = rb.clone().requires_grad_() if res else None
    y_timm = m(x1) if rb is None else F.relu(m(x1) + r1)
    y = se(x2, r2)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
    assert rel_err(y, y_timm) < 4e-3
    dy = torch.randn(shape).to(torch.bfloat16)
    y_timm.backward(dy.float())
    y.backward(dy)
    assert x2.grad.dtype == torch.bfloat16
    assert rel_err(x2.grad, x1.grad) < 8e-3
    for (name, p_timm), p in zip(m.named_parameters(), se.parameters()):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, p_timm.grad) < 2e-2, name


def test_odd_strides_made_contiguous():
    x = torch.randn(2, 16, 6, 8)[:, :, ::2, 1:]  # neither NCHW- nor NHWC-contiguous
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w1, b1, w2, b2 = _weights(16, 8, True)
    y = st.squeeze_excite(x, w1, b1, w2, b2)
    torch.testing.assert_close(y, reference(x, w1, b1, w2, b2).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_compile_fullgraph(fmt):
    m = timm_se(32, 8, True, "silu", "hard_sigmoid")
    se = st.SqueezeExcite(32, rd_channels=8, activation="silu", gate="hard_sigmoid")
    se.load_state_dict(m.state_dict())
    compiled = torch.compile(se, fullgraph=True)
    x = torch.randn(3, 32, 5, 7).to(memory_format=fmt)
    r = torch.randn(3, 32, 5, 7).to(memory_format=fmt)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = se(xe, r), compiled(xc, r)
    assert torch.equal(ye, yc)
    dy = torch.randn_like(ye)
    ye.backward(dy)
    grads_e = [xe.grad] + [p.grad.clone() for p in se.parameters()]
    se.zero_grad()
    yc.backward(dy)
    grads_c = [xc.grad] + [p.grad for p in se.parameters()]
    for a, b in zip(grads_e, grads_c):
        assert torch.equal(a, b)


def test_backward_runs_no_torch_kernels_besides_the_op():
    """The backward hands senet its gradient and nothing else: no zero tensors materialized for
    the saved state's (unused) gradients. A fill big enough to go parallel wakes torch's OpenMP
    threads, which then spin on the cores senet's own threads need (seen as 40% of a stage-4
    profile in libgomp before the fix)."""
    se = st.SqueezeExcite(256, rd_channels=16)
    x = torch.randn(64, 256, 3, 3).requires_grad_()  # z and s: [64, 256] = 16384 elements each
    y = se(x)
    dy = torch.randn_like(y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.backward(dy)
    names = {e.name for e in prof.events()}
    assert "senet::se_backward" in names, sorted(names)
    filled = sorted(n for n in names if n in ("aten::zeros", "aten::zeros_like", "aten::fill_", "aten::zero_"))
    assert not filled, filled
    assert x.grad is not None and all(p.grad is not None for p in se.parameters())


def _fwd_bwd(x, se, dy):
    xg = x.clone().requires_grad_()
    se.zero_grad(set_to_none=True)
    y = se(xg)
    y.backward(dy)
    return y.detach(), xg.grad, [p.grad.clone() for p in se.parameters()]


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch without OpenMP")
def test_cpu_work_runs_on_torchs_openmp_threads():
    """senet's CPU work runs as a rayon pool hosted by torch's OpenMP threads: as many as
    torch.set_num_threads says, and the same results as on rayon's own pool."""
    from senet_torch import _senet

    assert _senet.cpu_pool() == "openmp"
    before = torch.get_num_threads()
    se = st.SqueezeExcite(48, rd_channels=12)
    x = torch.randn(16, 48, 9, 11)
    dy = torch.randn_like(x)
    ref = reference(x.double(), *(t.detach().double() for t in (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)))
    try:
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            assert _senet.cpu_threads() == n
            y, dx, grads = _fwd_bwd(x, se, dy)
            assert rel_err(y, ref) < 1e-5
            _senet.set_cpu_pool("rayon")
            try:
                y_r, dx_r, grads_r = _fwd_bwd(x, se, dy)
            finally:
                _senet.set_cpu_pool("openmp")
            # Same values; summation order may differ with the thread count.
            assert rel_err(y, y_r) < 1e-6 and rel_err(dx, dx_r) < 1e-5
            for g, g_r in zip(grads, grads_r):
                assert rel_err(g, g_r) < 1e-5
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="unknown thread pool"):
        _senet.set_cpu_pool("tbb")


def test_concurrent_calls_from_python_threads():
    """Calls from several Python threads at once (each gets its own OpenMP team) neither deadlock
    nor mix results."""
    import threading

    se = st.SqueezeExcite(64, rd_channels=16)
    # 8x64x9x9 = 41472 elements: above the one-thread cut-off, so each call runs a whole team.
    xs = [torch.randn(8, 64, 9, 9) for _ in range(4)]
    dy = torch.randn(8, 64, 9, 9)
    expected = [_fwd_bwd(x, se, dy)[:2] for x in xs]
    got, errors = [None] * 4, []

    def worker(i):
        try:
            for _ in range(5):
                xg = xs[i].clone().requires_grad_()
                y = st.squeeze_excite(xg, se.fc1.weight.detach(), se.fc1.bias.detach(),
                                      se.fc2.weight.detach(), se.fc2.bias.detach())
                y.backward(dy)
                got[i] = (y.detach(), xg.grad)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call did not return"
    assert not errors, errors
    for (y, dx), (ye, dxe) in zip(got, expected):
        assert rel_err(y, ye) < 1e-6 and rel_err(dx, dxe) < 1e-5


def test_meta_tensors():
    x = torch.empty(4, 24, 5, 5, device="meta").to(memory_format=torch.channels_last)
    w1, b1, w2, b2 = (t.to("meta") for t in _weights(24, 8, True))
    y, z, h, u, s = torch.ops.senet.se_forward(x, w1, b1, w2, b2, None, "relu", "sigmoid")
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert z.shape == (4, 24) and h.shape == (4, 8) and u.shape == (4, 8) and s.shape == (4, 24)


def test_errors():
    w1, b1, w2, b2 = _weights(16, 4, True)
    x = torch.randn(2, 16, 3, 3)
    with pytest.raises(ValueError, match="4-D"):
        st.squeeze_excite(x[0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="channels"):
        st.squeeze_excite(torch.randn(2, 8, 3, 3), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="float32"):
        st.squeeze_excite(x.to(torch.int32), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="residual"):
        st.squeeze_excite(x, w1, b1, w2, b2, torch.randn(2, 16, 3, 4))
    with pytest.raises(ValueError, match="biases"):
        st.squeeze_excite(x, w1, b1, w2, None)
    with pytest.raises(ValueError, match="activation"):
        st.squeeze_excite(x, w1, b1, w2, b2, None, "gelu")
    with pytest.raises(ValueError, match="zero-sized"):
        st.squeeze_excite(torch.randn(0, 16, 3, 3), w1, b1, w2, b2)
    # the Rust side's own checks (a direct call with a bad config)
    with pytest.raises(ValueError, match="layout"):
        st._senet.forward("float32", "nwhc", (2, 16, 3, 3), 4, True, "relu", "sigmoid", *([1] * 11))
    with pytest.raises(ValueError, match="null"):
        st._senet.forward("float32", "nchw", (2, 16, 3, 3), 4, False, "relu", "sigmoid", *([0] * 11))


def _need_gpu():
    if not torch.cuda.is_available():
        if os.environ.get("SENET_REQUIRE_GPU") == "1":
            pytest.fail("SENET_REQUIRE_GPU=1 but torch sees no CUDA device")
        pytest.skip("no CUDA device")
    if not st._senet.cuda_supported():
        w1, b1, w2, b2 = (t.cuda() for t in _weights(16, 4, True))
        with pytest.raises(st.SenetDeviceError, match="no CUDA kernels"):
            st.squeeze_excite(torch.randn(2, 16, 3, 3, device="cuda"), w1, b1, w2, b2)
        pytest.skip("this build has no CUDA kernels (checked that it says so)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_matches_cpu_forward_and_backward(dtype, channels_last, residual):
    """On a GPU: the op on CUDA tensors (senet's kernels on torch's current stream, torch's
    memory) against the CPU op on the same values, forward and every gradient."""
    _need_gpu()
    torch.manual_seed(3)
    c, d = 40, 10
    x = torch.randn(3, c, 7, 5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if residual else None
    w = [t.requires_grad_() for t in _weights(c, d, True)]
    out = {}
    for dev in ("cpu", "cuda"):
        # detach(): each device's inputs are leaves of their own (x.to("cuda") of a leaf that
        # requires grad would be a non-leaf, with no .grad).
        xs = x.detach().to(dev).requires_grad_()
        rs = r.detach().to(dev).requires_grad_() if r is not None else None
        ws = [t.detach().to(dev).requires_grad_() for t in w]
        y = st.squeeze_excite(xs, *ws, rs)
        y.float().square().sum().backward()
        grads = [xs.grad] + [t.grad for t in ws] + ([rs.grad] if rs is not None else [])
        out[dev] = [y.detach().float().cpu()] + [g.float().cpu() for g in grads]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(out["cpu"], out["cuda"]):
        assert rel_err(b.double(), a.double()) <= tol


def test_cuda_side_stream_and_graph_capture():
    """On a GPU: the op queues on torch's current stream (a side stream here; the result is read
    after synchronising only that stream), and it can be captured in a CUDA graph and replayed."""
    _need_gpu()
    c, d = 64, 16
    w1, b1, w2, b2 = (t.cuda() for t in _weights(c, d, True))
    x = torch.randn(4, c, 9, 9, device="cuda")
    want = st.squeeze_excite(x.cpu(), w1.cpu(), b1.cpu(), w2.cpu(), b2.cpu())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = st.squeeze_excite(x, w1, b1, w2, b2)
    side.synchronize()
    assert rel_err(y.cpu().double(), want.double()) <= 1e-5
    static_x = x.clone()
    with torch.cuda.stream(side):
        st.squeeze_excite(static_x, w1, b1, w2, b2)  # warm-up outside capture
    side.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = st.squeeze_excite(static_x, w1, b1, w2, b2)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    want2 = st.squeeze_excite(x2.cpu(), w1.cpu(), b1.cpu(), w2.cpu(), b2.cpu())
    assert rel_err(static_y.cpu().double(), want2.double()) <= 1e-5


def test_bf16_module_weights_cast_and_grads_cast_back():
    """A model converted with .to(bfloat16): the op reads f32 copies of the bf16 weights and
    returns their gradients in bf16, close to the f32 module's on the same values."""
    se = st.SqueezeExcite(48, rd_channels=12)
    se_bf = st.SqueezeExcite(48, rd_channels=12).to(torch.bfloat16)
    se_bf.load_state_dict(se.state_dict())
    se.load_state_dict({k: v.float() for k, v in se_bf.state_dict().items()})  # same rounded values
    x = torch.randn(3, 48, 5, 6).to(torch.bfloat16)
    y_bf = se_bf(x)
    y = se(x.float())
    assert y_bf.dtype == torch.bfloat16
    assert rel_err(y_bf, y) < 4e-3
    dy = torch.randn_like(y)
    y.backward(dy)
    y_bf.backward(dy.to(torch.bfloat16))
    for (name, p), p_bf in zip(se.named_parameters(), se_bf.parameters()):
        assert p_bf.grad.dtype == torch.bfloat16, name
        assert rel_err(p_bf.grad, p.grad) < 2e-2, name
