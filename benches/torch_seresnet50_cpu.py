#!/usr/bin/env python3
"""PyTorch's CPU time for timm's seresnet50 forward (eval, f32, NCHW), the yardstick for
examples/seresnet50_cpu.rs. Needs torch and timm.

    python3 benches/torch_seresnet50_cpu.py [--threads 2] [--batch 1] [--warmup 3] [--iters 20]
"""
import argparse
import time

import timm
import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="seresnet50")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.iters):
            t = time.perf_counter()
            model(x)
            dt = (time.perf_counter() - t) * 1e3
            if i >= a.warmup:
                times.append(dt)
    times.sort()
    print(
        f"torch {torch.__version__} timm {timm.__version__} {a.model} batch {a.batch} "
        f"{a.size}x{a.size} f32 cpu threads {torch.get_num_threads()}: "
        f"median {times[len(times) // 2]:.2f} ms, min {times[0]:.2f} ms over {a.iters} runs"
    )


if __name__ == "__main__":
    main()
