#!/usr/bin/env python3
"""Times the CPU peers of `senet bench` at the same shapes and thread count.

- PyTorch eager, timm's SEModule (ReLU, sigmoid, bias, reduction 16 rounded to a multiple of 8,
  the same hidden width as senet's SeConfig::with_reduction): forward in eval mode under
  no_grad, and forward + backward with autograd (y.backward(dy) into x.grad and the weights).
  NHWC is torch.channels_last for the input and the module.
- onnxruntime (CPU execution provider), forward only, the same SE as an ONNX graph:
  NCHW: GlobalAveragePool -> Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid -> Mul.
  NHWC: GlobalAveragePool and Conv are NCHW-only in ONNX, so an NHWC graph must either wrap the
  block in Transposes (two extra full passes over the tensor: not what a channels-last network
  would run) or say the same thing with layout-free ops. This script does the latter:
  ReduceMean(axes 1, 2) -> Reshape [N, C] -> Gemm (W1^T) -> Relu -> Gemm (W2^T) -> Sigmoid ->
  Reshape [N, 1, 1, C] -> Mul (broadcast over H, W). No Transpose anywhere.

Usage: python3 benches/peers_cpu.py --threads 2 [--shapes 32x256x56x56,...] [--iters 20]
Prints a Markdown table (median and min ms; GB/s from the median, with forward 2N and
forward+backward 5N bytes). On a shared machine the min is the time least disturbed by others.
"""

import argparse
import statistics
import time

import numpy as np

DEFAULT_SHAPES = "32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7"


def make_divisible(v, divisor=8):
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def median_ms(fn, iters, warmup=2):
    """(median, min) of `iters` timed calls in ms, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(iters):
        s = time.perf_counter()
        fn()
        t.append(time.perf_counter() - s)
    return statistics.median(t) * 1e3, min(t) * 1e3


def torch_rows(shape, layout, threads, iters):
    import torch
    from timm.layers import SEModule

    torch.set_num_threads(threads)
    n, c, h, w = shape
    m = SEModule(c, rd_ratio=1.0 / 16)
    x = torch.rand(n, c, h, w) * 2 - 1
    dy = torch.rand(n, c, h, w) * 2 - 1
    if layout == "nhwc":
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    m.eval()

    def fwd():
        with torch.no_grad():
            m(x)

    fwd_ms = median_ms(fwd, iters)
    m.train()
    xg = x.clone().requires_grad_(True)

    def fwd_bwd():
        xg.grad = None
        m.zero_grad(set_to_none=True)
        m(xg).backward(dy)

    fb_ms = median_ms(fwd_bwd, iters)
    return [("pytorch", "fwd", fwd_ms), ("pytorch", "fwd+bwd", fb_ms)]


def onnx_graph(shape, layout, rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, c, h, w = shape
    d = make_divisible(c / 16)
    k1, k2 = 1 / np.sqrt(c), 1 / np.sqrt(d)
    w1 = rng.uniform(-k1, k1, (d, c)).astype(np.float32)
    b1 = rng.uniform(-k1, k1, d).astype(np.float32)
    w2 = rng.uniform(-k2, k2, (c, d)).astype(np.float32)
    b2 = rng.uniform(-k2, k2, c).astype(np.float32)
    if layout == "nchw":
        xshape = [n, c, h, w]
        inits = [
            numpy_helper.from_array(w1.reshape(d, c, 1, 1), "W1"),
            numpy_helper.from_array(b1, "B1"),
            numpy_helper.from_array(w2.reshape(c, d, 1, 1), "W2"),
            numpy_helper.from_array(b2, "B2"),
        ]
        nodes = [
            helper.make_node("GlobalAveragePool", ["X"], ["z"]),
            helper.make_node("Conv", ["z", "W1", "B1"], ["h"]),
            helper.make_node("Relu", ["h"], ["u"]),
            helper.make_node("Conv", ["u", "W2", "B2"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["s"]),
            helper.make_node("Mul", ["X", "s"], ["Y"]),
        ]
    else:
        xshape = [n, h, w, c]
        inits = [
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "B1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(b2, "B2"),
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([n, c], dtype=np.int64), "nc"),
            numpy_helper.from_array(np.array([n, 1, 1, c], dtype=np.int64), "n11c"),
        ]
        nodes = [
            helper.make_node("ReduceMean", ["X", "axes"], ["z4"], keepdims=1),
            helper.make_node("Reshape", ["z4", "nc"], ["z"]),
            helper.make_node("Gemm", ["z", "W1", "B1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["u"]),
            helper.make_node("Gemm", ["u", "W2", "B2"], ["a"], transB=1),
            helper.make_node("Sigmoid", ["a"], ["s2"]),
            helper.make_node("Reshape", ["s2", "n11c"], ["s"]),
            helper.make_node("Mul", ["X", "s"], ["Y"]),
        ]
    graph = helper.make_graph(
        nodes,
        f"se_{layout}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, xshape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, xshape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model, xshape


def ort_rows(shape, layout, threads, iters):
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    model, xshape = onnx_graph(shape, layout, rng)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    x = rng.uniform(-1, 1, xshape).astype(np.float32)
    # Preallocated output through IO binding, so the timing has no output allocation.
    io = sess.io_binding()
    y = np.empty_like(x)
    io.bind_cpu_input("X", x)
    io.bind_output("Y", "cpu", 0, np.float32, xshape, y.ctypes.data)

    def fwd():
        sess.run_with_iobinding(io)

    # Check the graph computes SE (against numpy) before timing it.
    sess.run_with_iobinding(io)
    ref = se_numpy(x, model, layout)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < 1e-5, f"onnx SE graph disagrees with numpy: {err}"
    return [("onnxruntime", "fwd", median_ms(fwd, iters))]


def se_numpy(x, model, layout):
    from onnx import numpy_helper

    p = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    c = x.shape[1] if layout == "nchw" else x.shape[3]
    w1, w2 = p["W1"].reshape(-1, c), p["W2"].reshape(c, -1)
    axes = (2, 3) if layout == "nchw" else (1, 2)
    z = x.astype(np.float64).mean(axis=axes)
    u = np.maximum(z @ w1.T + p["B1"], 0)
    s = 1 / (1 + np.exp(-(u @ w2.T + p["B2"])))
    s = s[:, :, None, None] if layout == "nchw" else s[:, None, None, :]
    return (x * s).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--layouts", default="nchw,nhwc")
    ap.add_argument("--peers", default="pytorch,onnxruntime")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()

    import onnxruntime
    import timm
    import torch

    print(
        f"torch {torch.__version__}, timm {timm.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {a.threads} threads, f32, "
        f"median of {a.iters}"
    )
    print()
    print("| shape | layout | peer | dir | median ms | min ms | GB/s |")
    print("|---|---|---|---|---|---|---|")
    peers = a.peers.split(",")
    for s in a.shapes.split(","):
        shape = tuple(int(v) for v in s.split("x"))
        nbytes = 4 * np.prod(shape)
        for layout in a.layouts.split(","):
            rows = []
            if "pytorch" in peers:
                rows += torch_rows(shape, layout, a.threads, a.iters)
            if "onnxruntime" in peers:
                rows += ort_rows(shape, layout, a.threads, a.iters)
            for peer, d, (ms, mn) in rows:
                moved = (2 if d == "fwd" else 5) * nbytes
                print(
                    f"| {s} | {layout} | {peer} | {d} | {ms:.3f} | {mn:.3f} | "
                    f"{moved / ms / 1e6:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
