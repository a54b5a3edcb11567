#!/usr/bin/env python3
"""PyTorch's side of the network step-time table (issue 8): timm's seresnet50 (or --model) on
one GPU, a training step (forward, cross-entropy, backward, SGD with momentum and weight decay)
and an inference forward, eager and (with --compile) torch.compile, in f32 and in bf16 autocast
with channels_last. With --ours (CSVs of `senet net-bench --csv`, matched by precision: give it
our f32 NCHW run and our bf16 `--layout nhwc` run) it prints our times next to PyTorch's, same
model, batch and mode.

    python3 benches/torch_net.py --batch 1,128 --ours net-bench.csv --out torch-net.csv

--profile N: after timing, N more eager steps under torch.profiler, printed as a table of the
device time per op per step (self time, so nothing is counted twice), to set next to
`senet net-bench --profile`.

Timing: CUDA events around each repetition after warm-up; the median of --iters is reported.
"""
import argparse
import csv
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="seresnet50")
    ap.add_argument("--batch", default="1,128")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precisions", default="f32,bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (default mode)")
    ap.add_argument("--ours", help="CSVs from `senet net-bench --csv`, comma-separated (rows matched by precision)")
    ap.add_argument("--out", help="write PyTorch's rows here as CSV")
    ap.add_argument("--profile", type=int, default=0, help="profile this many eager steps per case")
    a = ap.parse_args()

    import torch
    import timm

    if not torch.cuda.is_available():
        print("error: no CUDA device for PyTorch", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, timm {timm.__version__}")
    # PyTorch's f32 convolutions use TF32 tensor cores unless this is off: compare with senet's
    # cudnn-tf32 engine when it is on.
    print(f"# f32 convolutions: torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32}; "
          f"matmul TF32: {torch.backends.cuda.matmul.allow_tf32}")
    rows = []
    for prec in a.precisions.split(","):
        for batch in [int(b) for b in a.batch.split(",")]:
            for compiled in [False, True] if a.compile else [False]:
                model = timm.create_model(a.model, pretrained=False).to(dev)
                fmt = torch.channels_last if prec == "bf16" else torch.contiguous_format
                model = model.to(memory_format=fmt)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                x = torch.randn(batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)
                y = torch.randint(0, 1000, (batch,), device=dev)
                fwd = torch.compile(model) if compiled else model
                ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if prec == "bf16" else None

                def train_step():
                    opt.zero_grad(set_to_none=True)
                    if ctx:
                        with ctx():
                            loss = torch.nn.functional.cross_entropy(fwd(x), y)
                    else:
                        loss = torch.nn.functional.cross_entropy(fwd(x), y)
                    loss.backward()
                    opt.step()

                def infer():
                    with torch.no_grad():
                        if ctx:
                            with ctx():
                                fwd(x)
                        else:
                            fwd(x)

                for mode, fn in [("train", train_step), ("infer", infer)]:
                    model.train(mode == "train")
                    t0 = time.time()
                    for _ in range(a.warmup):
                        fn()
                    torch.cuda.synchronize()
                    warm_s = time.time() - t0
                    times = []
                    for _ in range(a.iters):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        fn()
                        e.record()
                        e.synchronize()
                        times.append(s.elapsed_time(e))
                    med = statistics.median(times)
                    kind = "compile" if compiled else "eager"
                    rows.append(dict(model=a.model, precision=prec, batch=batch, mode=mode, kind=kind,
                                     median_ms=med, min_ms=min(times)))
                    print(f"{a.model} {prec} batch {batch} {mode} {kind}: {med:.2f} ms "
                          f"({batch / med * 1e3:.0f} img/s; warm-up {warm_s:.1f} s)", flush=True)
                    if a.profile > 0 and not compiled:
                        profile(torch, fn, a.profile, f"{a.model} {prec} batch {batch} {mode} eager", med)
                del model, opt, fwd
                torch.cuda.empty_cache()

    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)

    ours = {}
    for path in (a.ours or "").split(","):
        if not path:
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                ours[(r.get("precision", "f32"), int(r["batch"]), r["mode"])] = float(r["median_ms"])
    print()
    print("| model | precision | batch | mode | PyTorch eager ms | torch.compile ms | senet ms | senet / eager |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for prec in a.precisions.split(","):
        for batch in [int(b) for b in a.batch.split(",")]:
            for mode in ["train", "infer"]:
                def pick(kind):
                    for r in rows:
                        if (r["precision"], r["batch"], r["mode"], r["kind"]) == (prec, batch, mode, kind):
                            return r["median_ms"]
                    return None
                e, c = pick("eager"), pick("compile")
                o = ours.get((prec, batch, mode))
                fmt = lambda v: "-" if v is None else f"{v:.2f}"
                ratio = "-" if (o is None or e is None) else f"{o / e:.2f}"
                print(f"| {a.model} | {prec} | {batch} | {mode} | {fmt(e)} | {fmt(c)} | {fmt(o)} | {ratio} |")
    return 0


def profile(torch, fn, steps, label, median_ms):
    """Prints the device time per op per step of `steps` calls of `fn` (self time, longest
    first), as a Markdown table."""
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()

    def dev_us(e):
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(e, attr, None)
            if v is not None:
                return v
        return 0.0

    rows = sorted(((dev_us(e), e.key, e.count) for e in events if dev_us(e) > 0), reverse=True)
    total = sum(r[0] for r in rows) / 1e3 / steps
    print(f"\nprofile: {label}, {steps} step(s); device time in ops {total:.2f} ms per step "
          f"(timed median {median_ms:.2f} ms)")
    print("| op | calls per step | device ms per step | % of device time |")
    print("|---|---:|---:|---:|")
    for us, key, count in rows[:30]:
        ms = us / 1e3 / steps
        print(f"| {key} | {count // steps} | {ms:.3f} | {100 * ms / max(total, 1e-9):.1f} |")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
