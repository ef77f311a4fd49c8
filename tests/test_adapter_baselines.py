"""The adapter-family baselines: uni_adapter (Houlsby), adaptformer, adapter_attn (He et al.)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import XModalError
from xmodal.methods import AdaptedModel, apply_method, config_from_dict, make_config
from xmodal.methods.adapter_attn import AdapterAttnConfig
from xmodal.methods.adaptformer import AdaptFormerConfig
from xmodal.methods.uni_adapter import UniAdapterConfig

BASELINES = ["uni_adapter", "adaptformer", "adapter_attn"]
VISION_W, TEXT_W = 64, 48  # xmodal-test


def inputs(backbone):
    g = torch.Generator().manual_seed(0)
    tokens = backbone.tokenize(["a dog runs on the grass", "a cat sleeps", "two people talk"])
    return tokens, torch.randn(3, 3, 32, 32, generator=g), torch.randn(2, 2, 3, 32, 32, generator=g)


def encode_all(model, tokens, images, video):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_image(images), model.encode_video(video)


def randomize_up_(method, std=0.2):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_defaults_documented():
    u, a, h = UniAdapterConfig(), AdaptFormerConfig(), AdapterAttnConfig()
    assert (u.r, u.positions, u.form, u.activation, u.init) == (8, "both", "sequential", "gelu_tanh", "zero_up")
    assert (a.r, a.scale, a.dropout, a.activation, a.init) == (64, 0.1, 0.1, "relu", "lora")
    assert (h.r, h.scale, h.activation, h.init) == (30, 4.0, "relu", "lora")
    for cfg in (u, a, h):
        assert config_from_dict(cfg.to_dict()) == cfg
    # placement defines AdaptFormer / the attention adapter: no field to move it
    with pytest.raises(XModalError, match="unknown field"):
        config_from_dict({"method": "adaptformer", "positions": "attn"})


@pytest.mark.parametrize("name", BASELINES)
def test_identity_at_init_then_adapts_images_videos_text(tiny_backbone, name):
    tokens, images, video = inputs(tiny_backbone)
    frozen = encode_all(tiny_backbone, tokens, images, video)
    model = apply_method(tiny_backbone, make_config(name))
    assert model.method.identity_at_init
    for a, f in zip(encode_all(model, tokens, images, video), frozen):
        assert torch.equal(a, f)
    randomize_up_(model.method)
    for a, f in zip(encode_all(model, tokens, images, video), frozen):
        assert not torch.allclose(a, f, atol=1e-4)


@pytest.mark.parametrize("name", BASELINES)
def test_training_touches_only_adapter_and_round_trips(tiny_backbone_factory, tmp_path, name):
    backbone = tiny_backbone_factory(0)
    tokens, images, video = inputs(backbone)
    model = apply_method(backbone, make_config(name))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        t = F.normalize(model.encode_text(tokens), dim=-1)
        v = F.normalize(model.encode_image(images), dim=-1)
        loss = F.cross_entropy(10 * t @ v.T, torch.arange(3))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in backbone.parameters())
        assert all(p.grad is not None for p in params)
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert any(p.abs().sum() > 0 for n, p in model.method.named_parameters() if ".up.weight" in n)

    model.eval()
    expected = encode_all(model, tokens, images, video)
    model.save_adapter(tmp_path / name)
    other = AdaptedModel(tiny_backbone_factory(0))
    other.load_adapter(tmp_path / name)
    assert other.method.name == name
    for g, e in zip(encode_all(other, tokens, images, video), expected):
        assert torch.equal(g, e)


def test_uni_adapter_structure_and_count(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("uni_adapter"))
    state = model.method.state_dict()
    assert state["vision.1.attn.up.weight"].shape == (VISION_W, 8)
    assert state["text.0.ffn.down.weight"].shape == (8, TEXT_W)
    assert not any(k.startswith("shared.") for k in state)
    # 2 blocks x 2 positions per tower, each down (d*r + r) + up (r*d + d)
    per_vision = VISION_W * 8 + 8 + 8 * VISION_W + VISION_W
    per_text = TEXT_W * 8 + 8 + 8 * TEXT_W + TEXT_W
    assert model.parameter_counts()[0] == 4 * per_vision + 4 * per_text == 7680
    assert len(model.method._handles) == 8  # sequential: one hook per site
    model.set_active(None)

    model = apply_method(tiny_backbone, make_config("uni_adapter", positions="ffn", layers="first:1", modalities="vision"))
    assert set(model.method.state_dict()) == {f"vision.0.ffn.{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")}
    model.set_active(None)
    model = apply_method(tiny_backbone, make_config("uni_adapter", form="parallel"))
    assert len(model.method._handles) == 16


def test_uni_adapter_equals_cross_modal_adapter_without_sharing(tiny_backbone_factory):
    a, b = tiny_backbone_factory(0), tiny_backbone_factory(0)
    tokens, images, video = inputs(a)
    cma = apply_method(a, make_config("cross_modal_adapter", d_s=0))
    randomize_up_(cma.method)
    uni = apply_method(b, make_config("uni_adapter"))
    uni.method.load_state_dict(cma.method.state_dict())  # same names, same shapes
    for x, y in zip(encode_all(cma, tokens, images, video), encode_all(uni, tokens, images, video)):
        assert torch.equal(x, y)


def _block_run(backbone, model, modality="vision"):
    """Run block 0 with and without the adapter; return what ln_2 saw and the block input."""
    block = backbone.blocks(modality)[0]
    width = backbone.width(modality)
    seen = {}
    h = block.ln_2.register_forward_pre_hook(lambda mod, args: seen.__setitem__("mid", args[0]))
    x = torch.randn(2, 9, width)
    with torch.no_grad():
        out = block(x)
        mid = seen["mid"]
        with model.disable_adapters():
            out_frozen = block(x)
        mid_frozen = seen["mid"]
    h.remove()
    return x, mid, out, mid_frozen, out_frozen


def test_adaptformer_is_a_scaled_parallel_adapter_on_the_mlp(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("adaptformer"))
    m = model.method
    assert all(".ffn." in k for k in m.state_dict())
    assert m.state_dict()["vision.0.ffn.down.weight"].shape == (64, VISION_W)
    assert len(m._handles) == 8  # 4 parallel sites x (pre-hook on ln_2 + hook on ls_2)
    randomize_up_(m)
    model.eval()  # dropout off
    _, mid, out, mid_frozen, out_frozen = _block_run(tiny_backbone, model)
    b = m.bottleneck("vision", 0, "ffn")
    assert torch.equal(mid, mid_frozen)  # nothing on the attention branch
    # x_out = x + MLP(LN(x)) + 0.1 * up(ReLU(down(x))), x = input of the MLP branch
    expected = 0.1 * F.linear(F.relu(F.linear(mid, b.down.weight, b.down.bias)), b.up.weight, b.up.bias)
    torch.testing.assert_close(out - out_frozen, expected, rtol=1e-4, atol=1e-6)
    # training mode applies dropout 0.1 inside the adapter
    model.train()
    tokens = tiny_backbone.tokenize(["a dog"])
    with torch.no_grad():
        assert not torch.equal(model.encode_text(tokens), model.encode_text(tokens))


def test_adapter_attn_is_a_scaled_parallel_adapter_on_attention(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("adapter_attn"))
    m = model.method
    assert all(".attn." in k for k in m.state_dict())
    assert m.state_dict()["text.1.attn.up.weight"].shape == (TEXT_W, 30)
    randomize_up_(m)
    x, mid, _, mid_frozen, _ = _block_run(tiny_backbone, model)
    b = m.bottleneck("vision", 0, "attn")
    # after the attention branch: x + Attn(LN(x)) + 4 * up(ReLU(down(x))), x = block input
    expected = 4.0 * F.linear(F.relu(F.linear(x, b.down.weight, b.down.bias)), b.up.weight, b.up.bias)
    torch.testing.assert_close(mid - mid_frozen, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["adaptformer", "adapter_attn"])
def test_layers_and_modalities_fields(tiny_backbone, name):
    model = apply_method(tiny_backbone, make_config(name, layers=[-1], modalities="text", r=4))
    state = model.method.state_dict()
    assert {k.split(".")[0] for k in state} == {"text"}
    assert {k.split(".")[1] for k in state} == {"1"}
    assert state[next(k for k in state if k.endswith("down.weight"))].shape == (4, TEXT_W)
    tokens, images, video = inputs(tiny_backbone)
    randomize_up_(model.method)
    with model.disable_adapters():
        frozen_img = model.encode_image(images)
    assert torch.equal(model.encode_image(images), frozen_img)  # vision untouched


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("uni_adapter", "r", 0),
        ("uni_adapter", "positions", "mlp"),
        ("uni_adapter", "form", "serial"),
        ("adaptformer", "dropout", 1.5),
        ("adaptformer", "modalities", "audio"),
        ("adapter_attn", "activation", "tanh"),
        ("adapter_attn", "init", "xavier"),
    ],
)
def test_invalid_values_raise_naming_the_field(name, field, value):
    with pytest.raises(XModalError) as err:
        make_config(name, **{field: value})
    assert field in str(err.value) or "modalities" in str(err.value)


def test_adaptformer_layer_norm_option(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("adaptformer", layer_norm=True))
    state = model.method.state_dict()
    assert state["vision.0.ffn.norm.weight"].shape == (VISION_W,)
    tokens = tiny_backbone.tokenize(["a dog"])
    model.eval()
    with torch.no_grad():
        with model.disable_adapters():
            frozen = model.encode_text(tokens)
        assert torch.equal(model.encode_text(tokens), frozen)  # still identity at init
