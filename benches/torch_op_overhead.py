#!/usr/bin/env python3
"""Per-call cost of senet_torch.SqueezeExcite against timm SEModule at a few small shapes, CPU,
2 threads: forward (no_grad) and forward + backward, median of 50 calls after 5 warm-up.

    "$PYENV/bin/python" benches/torch_op_overhead.py
"""
import time, torch, senet_torch, timm
torch.set_num_threads(2)
from timm.layers.squeeze_excite import SEModule
for (n,c,h,w) in [(1,64,1,1),(8,256,56,56),(8,2048,7,7)]:
    x = torch.randn(n,c,h,w)
    se = senet_torch.SqueezeExcite(c)
    tm = SEModule(c)
    tm.load_state_dict(se.state_dict())
    def t(f, k=50):
        for _ in range(5): f()
        ts=[]
        for _ in range(k):
            t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
        ts.sort(); return ts[len(ts)//2]*1e3
    with torch.no_grad():
        a = t(lambda: se(x)); b = t(lambda: tm(x))
    xr = x.clone().requires_grad_()
    def fb(m):
        y = m(xr); y.backward(torch.ones_like(y))
    c1 = t(lambda: fb(se)); c2 = t(lambda: fb(tm))
    print(f"{(n,c,h,w)} fwd senet {a:.3f} timm {b:.3f} | fwd+bwd senet {c1:.3f} timm {c2:.3f} ms")
