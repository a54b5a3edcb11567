"""Data parallel: a small SE network trained for a few steps by 2 processes under
torch.distributed (gloo, CPU) with DDP equals the single-process run on the concatenated batch,
and equals the same DDP run with timm's SEModule."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from timm.layers.squeeze_excite import SEModule

import senet_torch as st

STEPS = 4
BATCH = 8  # the whole batch; each of the 2 ranks takes half


class Block(nn.Module):
    def __init__(self, c, se_kind):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        if se_kind == "senet":
            self.se = st.SqueezeExcite(c, rd_channels=c // 4)
        else:
            self.se = SEModule(c, rd_channels=c // 4)
        self.se_kind = se_kind

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.se_kind == "senet":
            return self.se(out, x)  # fused relu(s * out + x)
        return torch.relu(self.se(out) + x)


def make_net(se_kind):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        Block(32, se_kind),
        Block(32, se_kind),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def data():
    g = torch.Generator().manual_seed(42)
    xs = [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 10, (BATCH,), generator=g) for _ in range(STEPS)]
    return xs, ys


def train(net, rank=0, world=1):
    # BatchNorm in eval mode: batch statistics would differ per rank (that is SyncBatchNorm's
    # business, not SE's); the SE op and everything else train.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    xs, ys = data()
    per = BATCH // world
    for x, y in zip(xs, ys):
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for se_kind in ("senet", "timm"):
            _train_ddp(rank, world, se_kind, out)
    finally:
        dist.destroy_process_group()


def _train_ddp(rank, world, se_kind, out):
    net = make_net(se_kind)
    ddp = nn.parallel.DistributedDataParallel(net)
    for m in ddp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    xs, ys = data()
    per = BATCH // world
    for x, y in zip(xs, ys):
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, f"{out}.{se_kind}.{rank}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(tmp):
    """Both DDP runs (senet's SE, then timm's) in one pair of processes."""
    out = os.path.join(tmp, "params")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    result = []
    for se_kind in ("senet", "timm"):
        r0, r1 = torch.load(f"{out}.{se_kind}.0"), torch.load(f"{out}.{se_kind}.1")
        for k in r0:
            assert torch.equal(r0[k], r1[k]), k  # DDP keeps the replicas identical
        result.append(r0)
    return result


def test_ddp_gloo_two_processes():
    with tempfile.TemporaryDirectory() as tmp:
        ddp_senet, ddp_timm = run_ddp(tmp)
    single = train(make_net("senet"))
    start = make_net("senet").state_dict()
    moved = 0
    for k, v in single.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(ddp_senet[k], v, rtol=1e-5, atol=1e-6, msg=lambda s: f"{k}: {s}")
            torch.testing.assert_close(ddp_senet[k], ddp_timm[k], rtol=1e-5, atol=1e-6, msg=lambda s: f"{k}: {s}")
            moved += int(not torch.equal(v, start[k]))
    # the steps trained every parameter, SE's included
    assert moved == sum(1 for p in make_net("senet").parameters())
