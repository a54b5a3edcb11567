"""timm's seresnet50 and seresnext50_32x4d (random init, non-trivial BatchNorm statistics),
patched vs unpatched; and patch / unpatch round trips."""

import copy

import pytest
import timm
import torch
from torch import nn

import senet_torch as st
from conftest import rel_err

MODELS = ["seresnet50", "seresnext50_32x4d"]


def _model(name, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=10)
    # Non-trivial BatchNorm: random affine parameters and running statistics.
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data = 0.5 + torch.rand(c, generator=g)
            mod.bias.data = 0.1 * torch.randn(c, generator=g)
            mod.running_mean = 0.1 * torch.randn(c, generator=g)
            mod.running_var = 0.5 + torch.rand(c, generator=g)
    return m


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_eval_logits(name, fmt):
    ref = _model(name).eval()
    pat = copy.deepcopy(ref)
    count = st.patch(pat)
    assert count == 16 and count.skipped == []
    assert all(type(m).__name__ != "SEModule" for m in pat.modules())
    assert pat.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 48, 48).to(memory_format=fmt)
    ref, pat = ref.to(memory_format=fmt), pat.to(memory_format=fmt)
    with torch.no_grad():
        a, b = ref(x), pat(x)
    assert rel_err(b, a) < 1e-5, rel_err(b, a)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("name", MODELS)
def test_train_grads_vs_f64(name):
    """Train mode (batch statistics): every parameter gradient of the patched f32 model is as
    close to the f64 model's as the unpatched f32 model's is (the cost of f32 on this instance)."""
    ref = _model(name).train()
    pat = copy.deepcopy(ref)
    assert st.patch(pat) == 16
    r64 = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 48, 48)
    target = torch.randint(0, 10, (4,))
    grads = []
    for m, xx in ((ref, x), (pat, x), (r64, x.double())):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(xx), target).backward()
        grads.append({k: p.grad.detach().double() for k, p in m.named_parameters()})
    g_ref, g_pat, g64 = grads
    assert g_pat.keys() == g64.keys()
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    err_timm = rel_err(flat(g_ref), flat(g64))
    err_senet = rel_err(flat(g_pat), flat(g64))
    assert err_senet <= 2 * err_timm + 1e-6, (err_senet, err_timm)
    se_keys = [k for k in g64 if ".se." in k]
    assert len(se_keys) == 16 * 4
    for k in se_keys:
        # per SE parameter, within f32's cost on this instance (timm's own error, with slack)
        e_t, e_s = rel_err(g_ref[k], g64[k]), rel_err(g_pat[k], g64[k])
        assert e_s <= 4 * e_t + 1e-5, (k, e_s, e_t)


def test_state_dict_both_ways_and_unpatch():
    a = _model("seresnet50")
    b = _model("seresnet50", seed=7)
    st.patch(b)
    b.load_state_dict(a.state_dict())  # timm -> senet
    c = _model("seresnet50", seed=9)
    c.load_state_dict(b.state_dict())  # senet -> timm
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k])
    # patch shares the parameters; unpatch puts timm's modules back with them
    se = b.layer1[0].se
    w = se.fc1.weight
    assert isinstance(se, st.SqueezeExcite)
    assert st.unpatch(b) == 16
    assert type(b.layer1[0].se).__name__ == "SEModule" and b.layer1[0].se.fc1.weight is w


def test_patch_efficientnet_style_and_skips():
    from timm.layers.squeeze_excite import SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite as EffSE

    model = nn.Sequential(
        EffSE(32, rd_ratio=0.25, act_layer=nn.SiLU, gate_layer="hard_sigmoid"),
        EffSE(32, rd_ratio=0.25, act_layer=nn.GELU),  # GELU: not senet's
        SEModule(32, norm_layer=nn.BatchNorm2d),  # a norm between the FCs: not senet's
        SEModule(32, add_maxpool=True),
        SEModule(32, act_layer=nn.SiLU, gate_layer="hard_sigmoid", bias=False),
    ).eval()
    ref = copy.deepcopy(model)
    report = st.patch(model)
    assert report == 2
    assert [n for n, _ in report.skipped] == ["1", "2", "3"]
    assert isinstance(model[0], st.EfficientNetSqueezeExcite) and isinstance(model[4], st.SqueezeExcite)
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
