#!/usr/bin/env python3
"""PyTorch's SE (timm's SEModule) on the GPU at the shapes `senet gpu-bench` uses.

Times eager and torch.compile (default mode), forward (no_grad) and forward+backward
(autograd), NCHW and channels_last, with CUDA events, warm-up, rotating input buffers and the
median of --iters runs, next to a device-to-device copy of the same bytes. With --ours (the CSV
written by `senet gpu-bench --csv`) it prints our times beside PyTorch's and the ratios.

Run on the same card right after `senet gpu-bench`:
    python3 benches/torch_se.py --ours gpu-bench.csv --out torch.csv
"""
import argparse
import csv
import math
import statistics
import sys
import time

import torch

try:
    from timm.layers import SEModule
except ImportError:  # older timm
    from timm.models.layers import SEModule


def parse_shape(s):
    n, c, h, w = (int(t) for t in s.split("x"))
    return n, c, h, w


DEFAULT = [f"{n}x{c}x{hw}x{hw}" for n in (256, 8, 1) for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7))]


def timed(fn, args_list, iters, warmup):
    for i in range(warmup):
        fn(args_list[i % len(args_list)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(args_list[i % len(args_list)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bench(shape, dtype, layout, iters, warmup, compile_it, autotune_it=False):
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    nbytes = n * c * h * w * torch.finfo(dt).bits // 8
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    sets = max(2, min(64, math.ceil(3 * l2 / nbytes)))
    m = SEModule(c, rd_ratio=1.0 / 16).cuda().to(dt).to(memory_format=fmt)
    xs = [torch.randn(n, c, h, w, device="cuda", dtype=dt).contiguous(memory_format=fmt) for _ in range(sets)]
    dys = [torch.randn_like(x) for x in xs]
    ys = [torch.empty_like(x) for x in xs]
    out = {}
    out["copy"] = timed(lambda k: ys[k].copy_(xs[k]), list(range(sets)), iters, warmup)

    def fwd(mod):
        def f(k):
            with torch.no_grad():
                mod(xs[k])
        return f

    def fwdbwd(mod):
        xg = [x.detach().clone().requires_grad_(True) for x in xs]

        def f(k):
            y = mod(xg[k])
            y.backward(dys[k])
        return f

    ks = list(range(sets))
    out["eager_fwd"] = timed(fwd(m), ks, iters, warmup)
    out["eager_fwdbwd"] = timed(fwdbwd(m), ks, iters, warmup)
    if compile_it:
        t0 = time.time()
        # A fresh dynamo cache per shape: the same module compiled at many shapes (and grad
        # modes) otherwise hits torch._dynamo's recompile limit (8), after which it runs eager
        # without saying so in the timings (seen on the first H200 run: compile_s 0.1 s).
        torch._dynamo.reset()
        mc = torch.compile(m)
        out["compile_fwd"] = timed(fwd(mc), ks, iters, warmup)
        out["compile_fwdbwd"] = timed(fwdbwd(mc), ks, iters, warmup)
        out["compile_s"] = time.time() - t0
    if autotune_it:
        t0 = time.time()
        torch._dynamo.reset()
        ma = torch.compile(m, mode="max-autotune")
        out["autotune_fwd"] = timed(fwd(ma), ks, iters, warmup)
        out["autotune_fwdbwd"] = timed(fwdbwd(ma), ks, iters, warmup)
        out["autotune_s"] = time.time() - t0
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT))
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--layouts", default="nchw,nhwc")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile-shapes", default="256x256x56x56,256x512x28x28,256x1024x14x14,256x2048x7x7,1x256x56x56",
                    help="shapes also run through torch.compile (compiling is slow)")
    ap.add_argument("--compile-dtypes", default="bf16")
    ap.add_argument("--compile-budget-s", type=float, default=150.0, help="stop compiling new shapes after this")
    ap.add_argument("--autotune-shapes", default="",
                    help="shapes also run through torch.compile(mode='max-autotune') (minutes each), same dtypes"
                         " and budget as --compile-shapes")
    ap.add_argument("--ours", help="CSV from `senet gpu-bench --csv` to compare against")
    ap.add_argument("--out", help="write PyTorch's times as CSV here")
    a = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    compile_shapes = set(a.compile_shapes.split(",")) if a.compile_shapes else set()
    compile_dtypes = set(a.compile_dtypes.split(","))
    autotune_shapes = set(a.autotune_shapes.split(",")) if a.autotune_shapes else set()
    t_start = time.time()
    rows = []
    for s in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            for layout in a.layouts.split(","):
                comp = s in compile_shapes and dtype in compile_dtypes and time.time() - t_start < a.compile_budget_s
                tune = (s in autotune_shapes and dtype in compile_dtypes
                        and time.time() - t_start < a.compile_budget_s)
                r = bench(parse_shape(s), dtype, layout, a.iters, a.warmup, comp, tune)
                r.update(shape=s, dtype=dtype, layout=layout)
                rows.append(r)
                print(f"  {s} {dtype} {layout}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)), flush=True)

    keys = ["copy", "eager_fwd", "eager_fwdbwd", "compile_fwd", "compile_fwdbwd", "autotune_fwd", "autotune_fwdbwd"]
    if a.out:
        with open(a.out, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["shape", "layout", "dtype"] + [k + "_us" for k in keys])
            for r in rows:
                wr.writerow([r["shape"], r["layout"], r["dtype"]] + [f"{r[k]*1e3:.3f}" if k in r else "" for k in keys])

    ours = {}
    if a.ours:
        with open(a.ours) as f:
            for r in csv.DictReader(f):
                if r["path"].startswith("auto"):
                    ours[(r["shape"], r["layout"], r["dtype"])] = r

    def us(v):
        return f"{v*1e3:.1f}" if v is not None else "-"

    print("\n| shape | layout | dtype | torch eager fwd us | compile fwd us | ours fwd us | eager/ours | compile/ours |"
          " torch eager fwd+bwd us | compile fwd+bwd us | ours fwd+bwd us | eager/ours | compile/ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = ours.get((r["shape"], r["layout"], r["dtype"]))
        of = float(o["fwd_us"]) / 1e3 if o and o["fwd_us"] not in ("", "-") else None
        ob = float(o["bwd_us"]) / 1e3 if o and o["bwd_us"] not in ("", "-") else None
        ofb = of + ob if of is not None and ob is not None else None
        ratio = lambda t, mine: f"{t / mine:.2f}x" if t is not None and mine else "-"
        print(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {us(r['eager_fwd'])} | {us(r.get('compile_fwd'))} | {us(of)} | "
              f"{ratio(r['eager_fwd'], of)} | {ratio(r.get('compile_fwd'), of)} | {us(r['eager_fwdbwd'])} | "
              f"{us(r.get('compile_fwdbwd'))} | {us(ofb)} | {ratio(r['eager_fwdbwd'], ofb)} | {ratio(r.get('compile_fwdbwd'), ofb)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
