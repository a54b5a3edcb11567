#!/usr/bin/env python3
"""senet's SE op through PyTorch (senet_torch) vs timm's SEModule, eager and torch.compile, on
the CPU, side by side in one run; and timm seresnet50's training step patched vs unpatched.

- SE alone at ResNet-50's four stages (batch 32, f32, NCHW and channels_last), forward (no_grad)
  and forward + backward (autograd, d x and the parameter gradients): timm eager, timm under
  torch.compile (default mode), the senet op (senet_torch.SqueezeExcite), and senet's own path
  called directly on preallocated buffers (senet_torch._senet.forward / backward: no torch op,
  no allocation), and the same calls on outputs torch allocates per call (as the op's are): the
  floor the op is held to, with and without the cost of fresh memory.
- seresnet50 (timm, random init, 224x224, batch 8, SGD) training step: unpatched, patched (senet
  on torch's OpenMP threads, the default) and patched with senet on rayon's own pool, steps
  alternating; SE's share of each step from torch.profiler (SE forward ranges, and the backward
  nodes correlated to them by sequence number).

Threads: torch.set_num_threads(THREADS), which senet_torch follows (its CPU work runs on torch's
OpenMP threads), and RAYON_NUM_THREADS=THREADS (rayon's pool, where that is used), 2 by
default. Median of ITERS timed runs after WARMUP.

    PYENV=$(scripts/python-env.sh | tail -n 1)
    (cd python && "$PYENV/bin/maturin" develop --release)
    "$PYENV/bin/python" benches/torch_op_cpu.py [--iters 10] [--threads 2] [--skip-net]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--net-iters", type=int, default=5)
ap.add_argument("--skip-net", action="store_true")
ap.add_argument("--skip-compile", action="store_true")
ap.add_argument("--skip-se", action="store_true", help="only the seresnet50 training step")
args = ap.parse_args()
os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before senet's pool starts

import torch  # noqa: E402
import timm  # noqa: E402
from timm.layers.squeeze_excite import SEModule  # noqa: E402

import senet_torch as st  # noqa: E402
from senet_torch import _senet  # noqa: E402

torch.set_num_threads(args.threads)
torch.manual_seed(0)

STAGES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]


def median_ms(fn, iters=None, warmup=None):
    iters = iters or args.iters
    warmup = args.warmup if warmup is None else warmup
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def se_timings(shape, fmt):
    n, c, h, w = shape
    timm_m = SEModule(c, rd_ratio=1.0 / 16)
    ours = st.SqueezeExcite(c, rd_ratio=1.0 / 16)
    ours.load_state_dict(timm_m.state_dict())
    x = torch.randn(shape).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_()
    out = {}

    def fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def fwd_bwd(m):
        def f():
            xg.grad = None
            for p in m.parameters():
                p.grad = None
            m(xg).backward(dy)
        return f

    mods = [("timm eager", timm_m), ("senet op", ours)]
    if not args.skip_compile:
        torch._dynamo.reset()
        mods.insert(1, ("timm compile", torch.compile(timm_m)))
    for name, m in mods:
        out[(name, "fwd")] = median_ms(fwd(m))
        out[(name, "fwd+bwd")] = median_ms(fwd_bwd(m))

    # senet's own path on preallocated buffers: no op dispatch, no allocation.
    d = ours.fc1.out_channels
    layout = "nhwc" if fmt == torch.channels_last else "nchw"
    w1, b1 = ours.fc1.weight.detach(), ours.fc1.bias.detach()
    w2, b2 = ours.fc2.weight.detach(), ours.fc2.bias.detach()
    y, dx = torch.empty_like(x), torch.empty_like(x)
    z, s = torch.empty(n, c), torch.empty(n, c)
    hh, u = torch.empty(n, d), torch.empty(n, d)
    dw1, db1, dw2, db2 = (torch.empty_like(t) for t in (w1, b1, w2, b2))
    cfg = ("float32", layout, tuple(x.shape), d, True, "relu", "sigmoid")

    def call_fwd(y, z, hh, u, s):
        _senet.forward(*cfg, x.data_ptr(), 0, y.data_ptr(), w1.data_ptr(), b1.data_ptr(),
                       w2.data_ptr(), b2.data_ptr(), z.data_ptr(), hh.data_ptr(), u.data_ptr(), s.data_ptr())

    def call_bwd(z, hh, u, s, dx, dw1, db1, dw2, db2):
        _senet.backward(*cfg, x.data_ptr(), 0, dy.data_ptr(), w1.data_ptr(), b1.data_ptr(),
                        w2.data_ptr(), b2.data_ptr(), z.data_ptr(), hh.data_ptr(), u.data_ptr(), s.data_ptr(),
                        dx.data_ptr(), 0, dw1.data_ptr(), db1.data_ptr(), dw2.data_ptr(), db2.data_ptr())

    def raw_fwd():
        call_fwd(y, z, hh, u, s)

    def raw_both():
        raw_fwd()
        call_bwd(z, hh, u, s, dx, dw1, db1, dw2, db2)

    # The same calls with every output allocated by torch per call, as the op's are: what any op
    # pays for fresh memory, without the op's dispatch, checks and autograd.
    def fresh_fwd():
        outs = (torch.empty_like(x), torch.empty(n, c), torch.empty(n, d), torch.empty(n, d), torch.empty(n, c))
        call_fwd(*outs)
        return outs

    def fresh_both():
        # y stays alive through the backward, as a layer's output does (and the op's).
        yf, *state = fresh_fwd()
        call_bwd(*state, torch.empty_like(x), *(torch.empty_like(t) for t in (w1, b1, w2, b2)))

    out[("senet own", "fwd")] = median_ms(raw_fwd)
    out[("senet own", "fwd+bwd")] = median_ms(raw_both)
    out[("own, fresh outputs", "fwd")] = median_ms(fresh_fwd)
    out[("own, fresh outputs", "fwd+bwd")] = median_ms(fresh_both)
    # the op's result is senet's own
    with torch.no_grad():
        raw_fwd()
        assert torch.equal(ours(x), y)
    return out


def header():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"cpu: {cpu}, {os.cpu_count()} logical CPUs; commit {commit}")
    print(f"load before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, python {sys.version.split()[0]}; "
          f"{args.threads} threads (torch and senet), median of {args.iters} after {args.warmup} warm-up")


def main():
    header()
    if not args.skip_se:
        se_table()
    if not args.skip_net:
        net_table()


def se_table():
    print()
    print("## SE alone (f32, batch 32, reduction 16), ms")
    print()
    cols = ["timm eager", "timm compile", "senet op", "senet own", "own, fresh outputs"]
    if args.skip_compile:
        cols.remove("timm compile")
    print("| shape | layout | dir | " + " | ".join(cols) + " | op vs eager | op vs compile | op / own | op / own fresh |")
    print("|---|---|---|" + "---|" * len(cols) + "---|---|---|---|")
    for shape in STAGES:
        for fmt, lname in ((torch.contiguous_format, "nchw"), (torch.channels_last, "nhwc")):
            r = se_timings(shape, fmt)
            for dr in ("fwd", "fwd+bwd"):
                vals = " | ".join(f"{r[(c, dr)]:.2f}" for c in cols)
                op = r[("senet op", dr)]
                vs_c = f"{r[('timm compile', dr)] / op:.1f}x" if not args.skip_compile else "-"
                print(f"| {'x'.join(map(str, shape))} | {lname} | {dr} | {vals} | "
                      f"{r[('timm eager', dr)] / op:.1f}x | {vs_c} | {op / r[('senet own', dr)]:.2f} | "
                      f"{op / r[('own, fresh outputs', dr)]:.2f} |",
                      flush=True)


def wrap_se_forwards(model):
    """Wraps every SE module's forward in a profiler range named "se_block" (no cost unless a
    profiler is recording); returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (SEModule, st.SqueezeExcite)):
            def fwd(*a, _f=mod.forward, **k):
                with torch.profiler.record_function("se_block"):
                    return _f(*a, **k)
            mod.forward = fwd
            n += 1
    return n


def se_share(step):
    """One profiled step: (step ms, SE forward ms, SE backward ms). Forward: the "se_block"
    ranges. Backward: the autograd nodes whose sequence numbers belong to ops recorded inside
    those ranges (PyTorch's forward-backward correlation), timed by the engine's
    evaluate_function events (each node's whole backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step()
        wall = (time.perf_counter() - t) * 1e3
    events = prof.events()
    seqs, fwd = set(), 0.0

    def walk(e):
        for c in e.cpu_children:
            if c.sequence_nr >= 0:
                seqs.add(c.sequence_nr)
            walk(c)

    for e in events:
        if e.name == "se_block":
            fwd += e.cpu_time_total / 1e3
            walk(e)
    bwd = sum(e.cpu_time_total / 1e3 for e in events
              if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seqs)
    return wall, fwd, bwd


def net_table():
    print()
    print("## timm seresnet50 training step (batch 8, 224x224, f32, SGD), ms")
    print()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224)
    target = torch.randint(0, 1000, (8,))
    # "openmp": senet's CPU work on torch's OpenMP threads (the default); "rayon": on rayon's own
    # pool, beside torch's spinning OpenMP workers (how senet_torch ran before).
    variants = [("unpatched (timm)", False, None), ("patched, senet on torch's threads", True, "openmp"),
                ("patched, senet on its own rayon pool", True, "rayon")]
    if _senet.cpu_pool() != "openmp":
        print("(no OpenMP runtime found in torch: the op runs on rayon's pool)")
        variants = variants[:2]
    steps = {}
    for name, patched, pool in variants:
        torch.manual_seed(0)
        m = timm.create_model("seresnet50", pretrained=False).train()
        if patched:
            assert st.patch(m) == 16
        assert wrap_se_forwards(m) == 16
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def step(m=m, opt=opt, pool=pool):
            if pool:
                _senet.set_cpu_pool(pool)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), target).backward()
            opt.step()

        steps[name] = step
    # Alternate the variants' steps, so a change in the machine's load hits all alike.
    times = {k: [] for k in steps}
    for f in steps.values():
        f()  # warm-up
    for _ in range(args.net_iters):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    # SE's share from the profiler: a few profiled steps per variant, alternating.
    prof = {k: [] for k in steps}
    for _ in range(3):
        for k, f in steps.items():
            prof[k].append(se_share(f))
    _senet.set_cpu_pool("openmp")
    med = statistics.median
    print("| model | step ms | SE fwd ms | SE bwd ms | SE share of the profiled step |")
    print("|---|---|---|---|---|")
    for k in steps:
        walls, fw, bw = zip(*prof[k])
        share = med(100 * (f + b) / w for w, f, b in prof[k])
        print(f"| seresnet50 {k} | {med(times[k]):.0f} | {med(fw):.1f} | {med(bw):.1f} | {share:.1f}% |")
    print()
    base = times[variants[0][0]]
    for k in list(steps)[1:]:
        ratios = sorted(p / u for u, p in zip(base, times[k]))
        q = len(ratios) // 4
        print(f"{k} / unpatched step: {med(times[k]) / med(base):.3f} (medians of {args.net_iters} "
              f"alternating steps); per-step ratios {ratios[0]:.2f}-{ratios[-1]:.2f}, "
              f"interquartile {ratios[q]:.2f}-{ratios[-1 - q]:.2f}")
    print()
    print("SE fwd / bwd: medians over 3 profiled steps per model (torch.profiler, CPU); share: SE "
          "forward + backward over that step's wall time.")


if __name__ == "__main__":
    main()
