"""LoRA: identity at init, only A/B train, the backbone stays bit-identical, merge/unmerge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import XModalError
from xmodal.methods import apply_method, make_config
from xmodal.methods.backbone_tuning import get_parameter
from xmodal.methods.lora import LoRAConfig

# xmodal-test: vision width 64 (MLP 256), text width 48 (MLP 192), 2 blocks per tower
VISION_W, TEXT_W, BLOCKS = 64, 48, 2


def _inputs(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = backbone.tokenize(["a dog runs on the beach", "a red car", "two people talk", "a cat sleeps"])
    video = torch.randn(4, 3, 3, 32, 32, generator=g)
    return tokens, video


def _embed(model, tokens, video):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_video(video)


def _loss(model, tokens, video):
    t = F.normalize(model.encode_text(tokens), dim=-1)
    v = F.normalize(model.encode_video(video).mean(1), dim=-1)
    logits = 20.0 * t @ v.t()
    target = torch.arange(len(t))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def _train(model, tokens, video, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, tokens, video).backward()
        opt.step()


def _snapshot(backbone):
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def _assert_backbone_equal(backbone, snap):
    now = backbone.state_dict()
    assert sorted(now) == sorted(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


def _lora_count(r, qkv=3, targets=("in_proj", "out_proj", "c_fc", "c_proj")):
    """Trainable tensors of LoRA on xmodal-test: r * (in + out) per adapted weight."""
    total = 0
    for w in (VISION_W, TEXT_W):
        per_block = 0
        if "in_proj" in targets:
            per_block += qkv * r * (w + w)
        if "out_proj" in targets:
            per_block += r * (w + w)
        if "c_fc" in targets:
            per_block += r * (w + 4 * w)
        if "c_proj" in targets:
            per_block += r * (4 * w + w)
        total += BLOCKS * per_block
    return total


def test_identity_at_init(tiny_backbone):
    tokens, video = _inputs(tiny_backbone)
    t0, v0 = _embed(tiny_backbone, tokens, video)
    model = apply_method(tiny_backbone, make_config("lora"))
    t1, v1 = _embed(model, tokens, video)
    torch.testing.assert_close(t1, t0, rtol=0, atol=1e-6)
    torch.testing.assert_close(v1, v0, rtol=0, atol=1e-6)
    # while attached the backbone's parameter count is unchanged: A/B live in the method only
    n_backbone = sum(p.numel() for p in tiny_backbone.parameters())
    trainable, total = model.parameter_counts()
    assert total == n_backbone + trainable


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, _lora_count(8)),
        ({"r": 4, "qkv": "q,v", "target_modules": ["attn.in_proj"]}, _lora_count(4, qkv=2, targets=("in_proj",))),
        ({"r": 2, "target_modules": ["mlp"]}, _lora_count(2, targets=("c_fc", "c_proj"))),
    ],
)
def test_trainable_count_matches_arithmetic(tiny_backbone, kwargs, expected):
    model = apply_method(tiny_backbone, make_config("lora", **kwargs))
    trainable, _ = model.parameter_counts()
    assert trainable == expected
    assert trainable == sum(v.numel() for v in model.method.trainable_state(tiny_backbone).values())


def test_default_count_is_the_documented_number(tiny_backbone):
    # r=8 on all four linears, q/k/v, both towers: 2*(3*8*128 + 8*128 + 2*8*320) + 2*(3*8*96 + 8*96 + 2*8*240)
    assert _lora_count(8) == 32256
    assert apply_method(tiny_backbone, make_config("lora")).parameter_counts()[0] == 32256


def test_state_names_are_stable(tiny_backbone):
    cfg = make_config("lora", r=4, qkv="q,v", target_modules=("attn.in_proj", "mlp.c_fc"), layers=[1],
                      modalities="vision")
    model = apply_method(tiny_backbone, cfg)
    state = model.method.trainable_state(tiny_backbone)
    assert set(state) == {
        "vision.1.attn.in_proj.q.lora_A", "vision.1.attn.in_proj.q.lora_B",
        "vision.1.attn.in_proj.v.lora_A", "vision.1.attn.in_proj.v.lora_B",
        "vision.1.mlp.c_fc.lora_A", "vision.1.mlp.c_fc.lora_B",
    }
    assert state["vision.1.attn.in_proj.q.lora_A"].shape == (4, VISION_W)
    assert state["vision.1.mlp.c_fc.lora_B"].shape == (4 * VISION_W, 4)
    assert not any("lora" in k for k in tiny_backbone.state_dict())


def test_regex_targets(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("lora", r=2, target_modules=r"text\.0\.mlp\..*"))
    names = {k.rsplit(".", 1)[0] for k in model.method.trainable_state(tiny_backbone)}
    assert names == {"text.0.mlp.c_fc", "text.0.mlp.c_proj"}


def test_gradients_reach_only_lora(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("lora", r=4))
    with torch.no_grad():  # make A's gradient non-zero too (B = 0 at init zeroes it)
        for name, p in model.method.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    tokens, video = _inputs(tiny_backbone)
    _loss(model, tokens, video).backward()
    lora = dict(model.method.named_parameters())
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in lora.values()}


def test_training_leaves_backbone_bit_identical(tiny_backbone):
    snap = _snapshot(tiny_backbone)
    params_before = {n: p for n, p in tiny_backbone.named_parameters()}
    classes_before = {n: type(m) for n, m in tiny_backbone.named_modules()}
    tokens, video = _inputs(tiny_backbone)
    t0, v0 = _embed(tiny_backbone, tokens, video)
    model = apply_method(tiny_backbone, make_config("lora", r=4))
    _train(model, tokens, video)
    t1, v1 = _embed(model, tokens, video)
    assert not torch.allclose(t1, t0, atol=1e-4) and not torch.allclose(v1, v0, atol=1e-4)
    for name, value in snap.items():  # the stored weights under the parametrizations are untouched
        if name in params_before:
            assert torch.equal(get_parameter(tiny_backbone, name), value), name
    model.set_active(None)
    _assert_backbone_equal(tiny_backbone, snap)
    # the same Parameter objects and module classes are back
    assert all(p is params_before[n] for n, p in tiny_backbone.named_parameters())
    assert {n: type(m) for n, m in tiny_backbone.named_modules()} == classes_before
    t2, v2 = _embed(tiny_backbone, tokens, video)
    assert torch.equal(t2, t0) and torch.equal(v2, v0)
    # switching back reattaches the trained update
    model.set_active("default")
    t3, v3 = _embed(model, tokens, video)
    torch.testing.assert_close(t3, t1, rtol=0, atol=1e-6)
    torch.testing.assert_close(v3, v1, rtol=0, atol=1e-6)


def test_merge_unmerge(tiny_backbone):
    snap = _snapshot(tiny_backbone)
    tokens, video = _inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("lora", r=4))
    _train(model, tokens, video, steps=2)
    lora = model.method
    t_live, v_live = _embed(model, tokens, video)

    lora.merge(tiny_backbone)
    assert lora.merged
    assert not any("parametrizations" in k for k in tiny_backbone.state_dict())
    w = tiny_backbone.clip.visual.transformer.resblocks[0].attn.in_proj_weight
    assert not torch.equal(w, snap["clip.visual.transformer.resblocks.0.attn.in_proj_weight"])
    t_m, v_m = _embed(model, tokens, video)
    torch.testing.assert_close(t_m, t_live, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_m, v_live, rtol=1e-5, atol=1e-5)

    lora.unmerge(tiny_backbone)
    assert not lora.merged
    t_u, v_u = _embed(model, tokens, video)
    torch.testing.assert_close(t_u, t_live, rtol=0, atol=1e-6)
    for name, value in snap.items():
        if "attn_mask" not in name:
            assert torch.equal(get_parameter(tiny_backbone, name), value), name

    lora.merge(tiny_backbone)  # detaching a merged adapter restores the originals as well
    model.set_active(None)
    _assert_backbone_equal(tiny_backbone, snap)


def test_merge_needs_attached(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("lora", r=2))
    model.set_active(None)
    with pytest.raises(XModalError, match="attached"):
        model.methods["default"].merge(tiny_backbone)


def test_qkv_selects_row_blocks(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("lora", r=2, qkv="q,v", target_modules=["attn.in_proj"]))
    with torch.no_grad():
        for p in model.method.parameters():
            p.normal_()
    attn = tiny_backbone.clip.visual.transformer.resblocks[0].attn
    delta = (attn.in_proj_weight - attn.parametrizations.in_proj_weight.original).detach()
    q, k, v = delta.split(VISION_W)
    assert q.abs().sum() > 0 and v.abs().sum() > 0
    assert torch.equal(k, torch.zeros_like(k))
    scale = 16.0 / 2
    pair = model.method.vision["0"]["attn"]["in_proj"]["q"]
    torch.testing.assert_close(q, scale * pair.lora_B.detach() @ pair.lora_A.detach())


def test_rank_dropout_only_in_training(tiny_backbone):
    tokens, _ = _inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("lora", r=8, dropout=0.5))
    with torch.no_grad():
        for n, p in model.method.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    model.method.eval()
    e1, e2 = model.encode_text(tokens).detach(), model.encode_text(tokens).detach()
    assert torch.equal(e1, e2)
    model.method.train()
    torch.manual_seed(0)
    d1 = model.encode_text(tokens).detach()
    d2 = model.encode_text(tokens).detach()
    assert not torch.allclose(d1, d2)
    assert not torch.allclose(d1, e1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0"),
        ({"dropout": 1.0}, "dropout"),
        ({"qkv": "q,x"}, "qkv"),
        ({"target_modules": ["attn.qkv"]}, "target_modules entry 'attn.qkv'"),
        ({"target_modules": "nothing\\.here"}, "selects no weight"),
        ({"target_modules": "("}, "regular expression"),
        ({"layers": [5]}, "out of range"),
    ],
)
def test_config_errors(tiny_backbone, kwargs, message):
    with pytest.raises(XModalError, match=message):
        apply_method(tiny_backbone, make_config("lora", **kwargs))


def test_config_json_roundtrip():
    cfg = make_config("lora", r=4, alpha=8.0, target_modules=("attn.in_proj", "mlp.c_proj"), qkv="q,v", layers=[0, 1])
    back = LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == LoRAConfig(r=4, alpha=8.0, target_modules=("attn.in_proj", "mlp.c_proj"), qkv="q,v", layers=[0, 1])
