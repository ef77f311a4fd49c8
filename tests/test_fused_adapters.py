"""The fused bottleneck site (methods/fused.py) equals the eager one: forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from xmodal.methods import apply_method, fused, make_config
from xmodal.methods.bottleneck import Bottleneck, SharedSlice


def _site(activation="gelu_tanh", shared_in=0, shared_out=0, scale=1.0, bias=True, layer_norm=False, seed=0):
    torch.manual_seed(seed)
    b = Bottleneck(24, 4, shared_in=shared_in, shared_out=shared_out, activation=activation, scale=scale,
                   bias=bias, layer_norm=layer_norm, init="normal", init_std=0.2)
    s = SharedSlice(4, max(shared_in, shared_out), share_up=shared_out > 0, share_down=shared_in > 0, bias=bias)
    s.reset_parameters("normal", 0.2)
    return b, s


def _run(b, s, x, flag):
    for p in [*b.parameters(), *s.parameters()]:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with fused.enabled(flag):
        out = b(x, shared=s)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in [*b.named_parameters(), *(("shared." + k, v) for k, v in s.named_parameters())]}
    return out.detach(), x.grad.clone(), grads


CASES = [
    dict(),
    dict(shared_out=6),                       # Cross-Modal Adapter default: shared up slice
    dict(shared_in=6, shared_out=6),          # share="both"
    dict(activation="quick_gelu", scale=0.5),
    dict(activation="gelu", bias=False),
    dict(activation="relu", shared_in=24, shared_out=24),  # the whole width shared: no unique part
    dict(activation="silu", layer_norm=True),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) or "plain" for c in CASES])
def test_fused_site_matches_eager_fp32(case):
    b, s = _site(**case)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    out_e, dx_e, g_e = _run(b, s, x, False)
    out_f, dx_f, g_f = _run(b, s, x, True)
    torch.testing.assert_close(out_f, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_f, dx_e, rtol=1e-6, atol=1e-6)
    assert g_f.keys() == g_e.keys() and g_e
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], rtol=1e-5, atol=1e-6, msg=name)
    assert out_e.abs().max() > 0.1  # a real (non-zero) delta was compared


def test_fused_site_under_bf16_autocast_matches_eager_within_bf16():
    b, s = _site(shared_out=6)
    x = torch.randn(4, 7, 24, generator=torch.Generator().manual_seed(2))

    def run(flag):
        for p in [*b.parameters(), *s.parameters()]:
            p.grad = None
        xx = x.clone().requires_grad_(True)
        with fused.enabled(flag), torch.autocast("cpu", dtype=torch.bfloat16):
            out = b(xx, shared=s)
        out.float().sum().backward()
        return out, xx.grad, b.up.weight.grad.clone(), s.up.weight.grad.clone(), b.down.weight.grad.clone()

    eager, fast = run(False), run(True)
    assert fast[0].dtype == eager[0].dtype == torch.float32  # the delta comes back in the input's dtype
    assert fast[2].dtype == torch.float32                   # weight gradients in the weights' dtype
    for a, e in zip(fast, eager):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)
    # it really ran in bf16 (not silently in fp32): the result differs from the fp32 eager one
    with torch.no_grad():
        assert not torch.equal(fast[0], b(x, shared=s))


def test_dropout_in_training_falls_back_to_eager():
    b = Bottleneck(16, 4, dropout=0.5, init="normal", init_std=0.2)
    b.train()
    assert not fused.supports(b)
    b.eval()
    assert fused.supports(b)


def _graph_nodes(out: torch.Tensor) -> int:
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_site_is_one_autograd_node_and_no_more_kernels(autocast):
    b, s = _site(shared_out=6)
    params = [*b.parameters(), *s.parameters()]

    def make(flag):
        def fn():
            for p in params:
                p.grad = None
            x = torch.randn(2, 3, 24, requires_grad=True)
            with fused.enabled(flag), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return b(x, shared=s)
        return fn

    eager_f, eager_b = fused.kernel_count(make(False))
    fast_f, fast_b = fused.kernel_count(make(True))
    assert fast_f <= eager_f and fast_b <= eager_b
    # the host-side win: one autograd node per site instead of a chain of cat/cast/linear/act/scale nodes
    assert _graph_nodes(make(True)()) <= 2 < _graph_nodes(make(False)())


def test_switch_is_restored_and_off_by_default():
    assert not fused.is_enabled()
    with fused.enabled(True):
        assert fused.is_enabled()
        with fused.enabled(False):
            assert not fused.is_enabled()
        assert fused.is_enabled()
    assert not fused.is_enabled()


@pytest.mark.parametrize("method,kw", [("cross_modal_adapter", {"init": "normal"}),
                                        ("cross_modal_adapter", {"init": "normal", "share": "both", "form": "parallel"}),
                                        ("adaptformer", {"dropout": 0.0, "init": "normal"})])
def test_whole_model_training_step_matches_eager(tiny_backbone_factory, method, kw):
    try:
        cfg = make_config(method, **kw)
    except Exception as exc:  # a method without these fields in this build
        pytest.skip(f"{method}: {exc}")
    def build():  # two identical models (deepcopy would keep hooks bound to the original's adapters)
        torch.manual_seed(0)
        m = apply_method(tiny_backbone_factory(0), cfg)
        m.train()
        return m

    model, twin = build(), build()
    for (n, a), (_, b) in zip(model.named_trainable_parameters(), twin.named_trainable_parameters()):
        assert torch.equal(a, b), n
    tokens = model.tokenize(["a dog runs", "a cat sits on a mat"])
    pixels = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def loss_of(m, flag):
        with fused.enabled(flag):
            t, v = m(tokens, pixels)
        return (t.sum() * 0.3 + (v * v).mean()), t, v

    le, te, ve = loss_of(model, False)
    lf, tf, vf = loss_of(twin, True)
    torch.testing.assert_close(tf, te, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vf, ve, rtol=1e-5, atol=1e-6)
    le.backward()
    lf.backward()
    named_e = dict(model.named_trainable_parameters())
    named_f = dict(twin.named_trainable_parameters())
    assert named_e.keys() == named_f.keys()
    checked = 0
    for name, p in named_e.items():
        if p.grad is None:
            assert named_f[name].grad is None, name
            continue
        torch.testing.assert_close(named_f[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked >= 4
