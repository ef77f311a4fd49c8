"""Cross-Modal Adapter: injection, identity at init, the shared up-projection, ablation
fields, towers of different depth, checkpoints and the ViT-B/32 parameter count."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.backbones.factory import create_backbone, register_model_configs
from xmodal.errors import XModalError
from xmodal.methods import AdaptedModel, apply_method, make_config
from xmodal.methods.cross_modal_adapter import CrossModalAdapter, CrossModalAdapterConfig

R, D_S = 8, 16
VISION_W, TEXT_W = 64, 48  # xmodal-test


def inputs(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = backbone.tokenize(["a dog runs on the grass", "a cat sleeps", "two people talk"])
    images = torch.randn(3, 3, 32, 32, generator=g)
    video = torch.randn(2, 3, 3, 32, 32, generator=g)
    return tokens, images, video


def encode_all(model, tokens, images, video):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_image(images), model.encode_video(video)


def randomize_up_(method, std=0.2, seed=1):
    """Give every up-projection (unique and shared) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def keys(method):
    return set(method.state_dict())


# ---------------------------------------------------------------------- defaults
def test_defaults_are_the_papers():
    cfg = CrossModalAdapterConfig()
    assert (cfg.r, cfg.d_s, cfg.share, cfg.positions, cfg.form) == (8, 16, "up", "both", "sequential")
    assert (cfg.layers, cfg.modalities, cfg.init, cfg.activation, cfg.scale) == ("all", "both", "zero_up", "gelu_tanh", 1.0)
    assert make_config("cross_modal_adapter") == cfg
    assert CrossModalAdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_tensor_names_and_shapes(tiny_backbone):
    m = CrossModalAdapter(CrossModalAdapterConfig(), tiny_backbone)
    state = m.state_dict()
    for i in ("0", "1"):
        for pos in ("attn", "ffn"):
            assert state[f"vision.{i}.{pos}.down.weight"].shape == (R, VISION_W)
            assert state[f"vision.{i}.{pos}.down.bias"].shape == (R,)
            assert state[f"vision.{i}.{pos}.up.weight"].shape == (VISION_W - D_S, R)
            assert state[f"vision.{i}.{pos}.up.bias"].shape == (VISION_W - D_S,)
            assert state[f"text.{i}.{pos}.down.weight"].shape == (R, TEXT_W)
            assert state[f"text.{i}.{pos}.up.weight"].shape == (TEXT_W - D_S, R)
            assert state[f"shared.{i}.{pos}.up.weight"].shape == (D_S, R)
            assert state[f"shared.{i}.{pos}.up.bias"].shape == (D_S,)
    assert len(state) == 2 * 2 * 2 * 4 + 2 * 2 * 2  # 8 sites x 4 tensors + 4 shared slices x 2
    # one tensor object serves both towers
    assert m.site_shared("vision", 1, "ffn") is m.site_shared("text", 1, "ffn")
    assert m.site_shared("vision", 0, "attn") is not m.site_shared("vision", 0, "ffn")
    # the backbone was not modified by building the method
    assert not any(n.startswith(("vision.", "text.", "shared.")) for n, _ in tiny_backbone.named_parameters())


def test_shared_slice_is_the_last_d_s_channels(tiny_backbone):
    m = CrossModalAdapter(CrossModalAdapterConfig(), tiny_backbone)
    shared = m.site_shared("text", 0, "attn")
    with torch.no_grad():
        shared.up.weight.normal_()
        shared.up.bias.normal_()
    x = torch.randn(2, 5, TEXT_W)
    for modality, width in (("vision", VISION_W), ("text", TEXT_W)):
        delta = m.bottleneck(modality, 0, "attn")(torch.randn(2, 5, width), shared=m.site_shared(modality, 0, "attn"))
        assert delta.shape == (2, 5, width)
        assert torch.all(delta[..., : width - D_S] == 0)  # unique up is still zero
        assert delta[..., width - D_S:].abs().sum() > 0
    # the formula: z = GELU_tanh(x W_down + b); delta = Concat[z W_u + b_u, z W_s + b_s]
    b = m.bottleneck("text", 0, "attn")
    with torch.no_grad():
        b.up.weight.normal_()
    z = F.gelu(F.linear(x, b.down.weight, b.down.bias), approximate="tanh")
    expected = torch.cat([F.linear(z, b.up.weight, b.up.bias), F.linear(z, shared.up.weight, shared.up.bias)], -1)
    torch.testing.assert_close(b(x, shared=shared), expected)


# -------------------------------------------------------------------- injection
def test_identity_at_init_then_changes_images_videos_text(tiny_backbone):
    tokens, images, video = inputs(tiny_backbone)
    frozen = encode_all(tiny_backbone, tokens, images, video)
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter"))
    assert model.method.identity_at_init
    adapted = encode_all(model, tokens, images, video)
    for a, f in zip(adapted, frozen):
        assert torch.equal(a, f)  # zero up-projections: exactly the frozen model

    randomize_up_(model.method)
    changed = encode_all(model, tokens, images, video)
    assert changed[2].shape == (2, 3, 32)
    for c, f in zip(changed, frozen):
        assert not torch.allclose(c, f, atol=1e-4)
    with model.disable_adapters():
        again = encode_all(model, tokens, images, video)
    for a, f in zip(again, frozen):
        assert torch.equal(a, f)
    # frames of a video are encoded like single images through the adapted tower
    torch.testing.assert_close(changed[2][0, 1], model.encode_image(video[0, 1:2])[0].detach(), rtol=1e-4, atol=1e-5)


def test_hooks_fire_on_both_towers_for_videos(tiny_backbone):
    tokens, _, video = inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter"))
    calls = []
    handles = [
        b.register_forward_hook(lambda mod, args, out, site=(m, i, p): calls.append((site, out.shape[0])))
        for (m, i, p) in model.method.sites
        for b in [model.method.bottleneck(m, i, p)]
    ]
    with torch.no_grad():
        model.encode_video(video)  # B=2, F=3 -> 6 frames through the vision tower
        model.encode_text(tokens)
    for h in handles:
        h.remove()
    seen = dict(calls)
    assert len(calls) == 8 and len(seen) == 8
    assert all(n == 6 for (m, _, _), n in seen.items() if m == "vision")
    assert all(n == 3 for (m, _, _), n in seen.items() if m == "text")


def test_sequential_delta_is_applied_to_the_attention_branch_output(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", positions="attn"))
    randomize_up_(model.method)
    block = tiny_backbone.blocks("vision")[0]
    seen = {}
    h1 = block.ls_1.register_forward_pre_hook(lambda mod, args: seen.__setitem__("branch", args[0]))
    h2 = block.ln_2.register_forward_pre_hook(lambda mod, args: seen.__setitem__("mid", args[0]))
    x = torch.randn(2, 17, VISION_W)
    with torch.no_grad():
        block(x)
        branch, mid = seen["branch"], seen["mid"]
        with model.disable_adapters():
            block(x)
        mid_frozen = seen["mid"]
        m = model.method
        delta = m.bottleneck("vision", 0, "attn")(branch, shared=m.site_shared("vision", 0, "attn"))
    h1.remove(), h2.remove()
    torch.testing.assert_close(mid - mid_frozen, delta, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- gradients
def _feature_loss(model, tokens, images, which):
    loss = 0.0
    if which in ("text", "both"):
        loss = loss + model.encode_text(tokens).pow(2).sum()
    if which in ("vision", "both"):
        loss = loss + model.encode_image(images).pow(2).sum()
    return loss


def test_shared_up_projection_gets_gradient_from_both_towers(tiny_backbone):
    tokens, images, _ = inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter"))
    method = model.method
    grads = {}
    for which in ("text", "vision", "both"):
        method.zero_grad(set_to_none=True)
        _feature_loss(model, tokens, images, which).backward()
        grads[which] = {n: (None if p.grad is None else p.grad.clone()) for n, p in method.named_parameters()}
        shared = {n: g for n, g in grads[which].items() if n.startswith("shared.")}
        assert len(shared) == 8
        assert all(g is not None and g.abs().sum() > 0 for n, g in shared.items() if n.endswith("weight"))
    # a text-only loss never reaches the vision tower's own adapters, and vice versa
    assert all(g is None for n, g in grads["text"].items() if n.startswith("vision."))
    assert all(g is not None for n, g in grads["text"].items() if n.startswith("text."))
    assert all(g is None for n, g in grads["vision"].items() if n.startswith("text."))
    # the shared tensor accumulates both towers' gradients
    for n, g in grads["both"].items():
        if n.startswith("shared."):
            torch.testing.assert_close(g, grads["text"][n] + grads["vision"][n], rtol=1e-4, atol=1e-6)


def test_training_updates_only_the_adapter(tiny_backbone):
    tokens, images, _ = inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter"))
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.method.state_dict().items()}
    params = model.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for p in model.method.parameters()}
    assert model.parameter_counts()[0] == sum(p.numel() for p in model.method.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        t = F.normalize(model.encode_text(tokens), dim=-1)
        v = F.normalize(model.encode_image(images), dim=-1)
        logits = 20 * t @ v.T
        target = torch.arange(3)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in tiny_backbone.parameters())
        assert all(p.grad is not None for p in params)
        opt.step()
    after = tiny_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = [k for k, v in model.method.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert any(k.startswith("shared.") for k in moved) and any(".up.weight" in k for k in moved)


# -------------------------------------------------------------------- ablations
def _structure(backbone, **kw):
    model = apply_method(backbone, make_config("cross_modal_adapter", **kw))
    return model, model.method, model.method.state_dict()


def test_d_s_zero_has_no_shared_tensors(tiny_backbone):
    _, m, state = _structure(tiny_backbone, d_s=0)
    assert not any(k.startswith("shared.") for k in state)
    assert not hasattr(m, "shared")
    assert state["vision.0.ffn.up.weight"].shape == (VISION_W, R)
    assert state["text.1.attn.up.weight"].shape == (TEXT_W, R)


def test_positions_and_form(tiny_backbone):
    model, m, state = _structure(tiny_backbone, positions="attn")
    assert all(".attn." in k for k in state) and len(m._handles) == 4  # one forward hook per site
    model.set_active(None)
    model, m, state = _structure(tiny_backbone, positions="ffn")
    assert all(".ffn." in k for k in state)
    model.set_active(None)

    tokens, images, _ = inputs(tiny_backbone)
    seq_model, seq, _ = _structure(tiny_backbone)
    randomize_up_(seq)
    seq_out = encode_all(seq_model, tokens, images, torch.zeros(1, 1, 3, 32, 32))
    weights = seq.state_dict()
    seq_model.set_active(None)
    par_model, par, _ = _structure(tiny_backbone, form="parallel")
    assert len(par._handles) == 16  # pre-hook on ln + hook on ls per site
    par.load_state_dict(weights)
    par_out = encode_all(par_model, tokens, images, torch.zeros(1, 1, 3, 32, 32))
    assert not torch.allclose(seq_out[0], par_out[0], atol=1e-4)
    assert not torch.allclose(seq_out[1], par_out[1], atol=1e-4)


def test_layers_uni_layers_and_modalities(tiny_backbone):
    _, m, state = _structure(tiny_backbone, layers="last:1")
    assert {k.split(".")[1] for k in state} == {"1"}
    m.detach(tiny_backbone)

    _, m, state = _structure(tiny_backbone, layers={"vision": [0], "text": "all"})
    assert {k.split(".")[1] for k in state if k.startswith("vision.")} == {"0"}
    assert {k.split(".")[1] for k in state if k.startswith("text.")} == {"0", "1"}
    m.detach(tiny_backbone)

    _, m, state = _structure(tiny_backbone, uni_layers=[0])
    assert state["vision.0.ffn.up.weight"].shape == (VISION_W, R)  # uni-modal: full width, no shared part
    assert state["text.0.attn.up.weight"].shape == (TEXT_W, R)
    assert state["vision.1.ffn.up.weight"].shape == (VISION_W - D_S, R)
    assert {k.split(".")[1] for k in state if k.startswith("shared.")} == {"1"}
    assert m.slot_of("vision", 0, "ffn") is None and m.slot_of("text", 1, "ffn") == 1
    m.detach(tiny_backbone)

    _, m, state = _structure(tiny_backbone, layers="none", uni_layers="all")  # uni_layers are adapted anyway
    assert len(m.sites) == 8 and not any(k.startswith("shared.") for k in state)
    m.detach(tiny_backbone)

    tokens, images, video = inputs(tiny_backbone)
    frozen = encode_all(tiny_backbone, tokens, images, video)
    model, m, state = _structure(tiny_backbone, modalities="text")
    assert not any(k.startswith("vision.") for k in state)
    randomize_up_(m)
    out = encode_all(model, tokens, images, video)
    assert torch.equal(out[1], frozen[1]) and torch.equal(out[2], frozen[2])
    assert not torch.allclose(out[0], frozen[0], atol=1e-4)


def test_share_down_and_both(tiny_backbone):
    _, m, state = _structure(tiny_backbone, share="down")
    assert state["shared.0.ffn.down.weight"].shape == (R, D_S)
    assert "shared.0.ffn.up.weight" not in state
    assert state["vision.0.ffn.down.weight"].shape == (R, VISION_W - D_S)
    assert state["text.0.ffn.down.weight"].shape == (R, TEXT_W - D_S)
    assert state["vision.0.ffn.down.bias"].shape == (R,)
    assert state["vision.0.ffn.up.weight"].shape == (VISION_W, R)
    # the shared down block reads the last d_s input channels of each tower
    b, s = m.bottleneck("text", 0, "ffn"), m.site_shared("text", 0, "ffn")
    with torch.no_grad():
        b.up.weight.normal_()
    x = torch.randn(4, TEXT_W)
    z = F.gelu(F.linear(x[:, :-D_S], b.down.weight) + F.linear(x[:, -D_S:], s.down.weight) + b.down.bias, approximate="tanh")
    torch.testing.assert_close(b(x, shared=s), F.linear(z, b.up.weight, b.up.bias))
    m.detach(tiny_backbone)

    _, m, state = _structure(tiny_backbone, share="both")
    assert state["shared.1.attn.down.weight"].shape == (R, D_S)
    assert state["shared.1.attn.up.weight"].shape == (D_S, R)
    assert state["vision.1.attn.up.weight"].shape == (VISION_W - D_S, R)
    assert state["vision.1.attn.down.weight"].shape == (R, VISION_W - D_S)


def test_r_scale_init_and_dropout(tiny_backbone):
    _, m, state = _structure(tiny_backbone, r=4, d_s=8)
    assert state["vision.0.attn.down.weight"].shape == (4, VISION_W)
    assert state["shared.0.attn.up.weight"].shape == (8, 4)
    m.detach(tiny_backbone)

    one = CrossModalAdapter(CrossModalAdapterConfig(scale=1.0), tiny_backbone)
    two = CrossModalAdapter(CrossModalAdapterConfig(scale=2.0), tiny_backbone)
    randomize_up_(one)
    two.load_state_dict(one.state_dict())
    x = torch.randn(3, VISION_W)
    d1 = one.bottleneck("vision", 1, "ffn")(x, shared=one.site_shared("vision", 1, "ffn"))
    d2 = two.bottleneck("vision", 1, "ffn")(x, shared=two.site_shared("vision", 1, "ffn"))
    torch.testing.assert_close(d2, 2 * d1)

    tokens, images, video = inputs(tiny_backbone)
    frozen = encode_all(tiny_backbone, tokens, images, video)
    model, m, state = _structure(tiny_backbone, init="normal")  # the official code's init
    assert not m.identity_at_init and state["shared.0.ffn.up.weight"].abs().sum() > 0
    assert not torch.allclose(encode_all(model, tokens, images, video)[0], frozen[0], atol=1e-6)
    model.set_active(None)

    model, m, _ = _structure(tiny_backbone, dropout=0.5)
    randomize_up_(m)
    model.train()
    with torch.no_grad():
        a, b = model.encode_text(tokens), model.encode_text(tokens)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("share", "left", ["share", "up"]),
        ("positions", "mlp", ["positions", "attn"]),
        ("form", "serial", ["form", "parallel"]),
        ("layer_map", "middle", ["layer_map", "top"]),
        ("d_s", -1, ["d_s"]),
        ("r", 0, ["'r'"]),
        ("activation", "tanh", ["activation", "gelu_tanh"]),
        ("init", "xavier", ["init", "zero_up"]),
    ],
)
def test_invalid_config_values(field, value, words):
    with pytest.raises(XModalError) as err:
        CrossModalAdapterConfig(**{field: value})
    assert all(w in str(err.value) for w in words)


def test_backbone_dependent_errors(tiny_backbone):
    with pytest.raises(XModalError, match=r"d_s.*text tower's width 48"):
        CrossModalAdapter(CrossModalAdapterConfig(d_s=60), tiny_backbone)
    with pytest.raises(XModalError, match="uni_layers"):
        CrossModalAdapter(CrossModalAdapterConfig(uni_layers=[5]), tiny_backbone)
    with pytest.raises(XModalError, match="unknown tower"):
        CrossModalAdapter(CrossModalAdapterConfig(layers={"audio": "all"}), tiny_backbone)
    # d_s equal to the narrower width: the text tower keeps no unique up-projection
    m = CrossModalAdapter(CrossModalAdapterConfig(d_s=TEXT_W), tiny_backbone)
    assert m.state_dict()["text.0.ffn.up.weight"].shape == (0, R)
    assert m.bottleneck("text", 0, "ffn")(torch.randn(2, TEXT_W), shared=m.site_shared("text", 0, "ffn")).shape == (2, TEXT_W)


# ---------------------------------------------------------- different depths
@pytest.fixture(scope="module")
def deep_vision_backbone():
    """4 vision blocks vs 2 text blocks (the ViT-L/14 situation, at toy size)."""
    register_model_configs()
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
    )
    model = DualEncoder(clip, "toy-4x2", open_clip.get_tokenizer("xmodal-test"))
    model.requires_grad_(False)
    return model.eval()


def test_layer_map_proportional_and_top(deep_vision_backbone):
    bb = deep_vision_backbone
    tokens, images, _ = inputs(bb)
    model = apply_method(bb, make_config("cross_modal_adapter", layer_map="proportional"))
    m = model.method
    assert m.num_slots == 2
    assert [m.slot_of("vision", i, "ffn") for i in range(4)] == [0, 0, 1, 1]
    assert m.site_shared("vision", 1, "attn") is m.site_shared("text", 0, "attn")
    assert m.site_shared("vision", 3, "ffn") is m.site_shared("text", 1, "ffn")
    assert {k.split(".")[1] for k in m.state_dict() if k.startswith("shared.")} == {"0", "1"}
    randomize_up_(m)
    loss = model.encode_text(tokens).pow(2).sum() + model.encode_image(images).pow(2).sum()
    loss.backward()
    assert m.shared["0"]["ffn"].up.weight.grad.abs().sum() > 0
    model.set_active(None)

    model = apply_method(bb, make_config("cross_modal_adapter", layer_map="top"))
    m = model.method
    assert [m.slot_of("vision", i, "attn") for i in range(4)] == [None, None, 0, 1]
    assert m.state_dict()["vision.0.attn.up.weight"].shape == (VISION_W, R)  # below the top: uni-modal
    assert m.state_dict()["vision.2.attn.up.weight"].shape == (VISION_W - D_S, R)
    assert m.site_shared("vision", 2, "ffn") is m.site_shared("text", 0, "ffn")
    randomize_up_(m)
    with torch.no_grad():
        assert model.encode_video(torch.randn(1, 2, 3, 32, 32)).shape == (1, 2, 32)
        assert model.encode_text(tokens).shape == (3, 32)
    model.set_active(None)


# -------------------------------------------------------------------- checkpoint
def test_save_load_round_trip(tiny_backbone_factory, tmp_path):
    first = tiny_backbone_factory(0)
    tokens, images, video = inputs(first)
    model = apply_method(first, make_config("cross_modal_adapter", share="both", uni_layers=[0], positions="both"))
    randomize_up_(model.method)
    expected = encode_all(model, tokens, images, video)
    model.save_adapter(tmp_path / "cma")
    stored = load_file(str(tmp_path / "cma" / "adapter_model.safetensors"))
    assert set(stored) == keys(model.method)
    assert "shared.1.ffn.up.weight" in stored and "shared.1.ffn.down.weight" in stored

    second = AdaptedModel(tiny_backbone_factory(0))
    method = second.load_adapter(tmp_path / "cma")
    assert method.config == model.method.config
    got = encode_all(second, tokens, images, video)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# --------------------------------------------------------------- ViT-B/32 count
def test_vit_b32_parameter_count():
    backbone = create_backbone("ViT-B-32", seed=0)
    model = apply_method(backbone, make_config("cross_modal_adapter"))
    # 12 blocks x 2 positions = 24 adapters per tower, r = 8, d_s = 16, with biases
    vision = 768 * 8 + 8 + 8 * (768 - 16) + (768 - 16)  # down W + b, unique up W + b = 12,920
    text = 512 * 8 + 8 + 8 * (512 - 16) + (512 - 16)  # = 8,568
    shared = 24 * (8 * 16 + 16)  # one (r x d_s) + d_s per block and position, both towers = 3,456
    assert (vision, text, shared) == (12_920, 8_568, 3_456)
    trainable, total = model.parameter_counts()
    assert trainable == 24 * vision + 24 * text + shared == 519_168
    assert total == sum(p.numel() for p in backbone.parameters()) + trainable
    state = model.method.state_dict()
    assert sum(v.numel() for k, v in state.items() if k.startswith("vision.")) == 24 * vision
    assert sum(v.numel() for k, v in state.items() if k.startswith("shared.")) == shared
    model.set_active(None)
    # the uni-modal variant (d_s = 0) on the same backbone: full-width up-projections, nothing shared
    model.add_method(make_config("uni_adapter"), "uni")
    assert model.parameter_counts()[0] == 24 * (768 * 8 + 8 + 8 * 768 + 768) + 24 * (512 * 8 + 8 + 8 * 512 + 512)


def test_normal_init_draws_like_the_official_code(tiny_backbone):
    """init=normal: N(0, 0.01) as the official trunc_normal_(std=0.01), whose +-2 bounds are
    absolute (200 std): effectively untruncated, unlike a truncation at 2 std."""
    torch.manual_seed(0)
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", init="normal", r=64))
    w = torch.cat([p.detach().flatten() for n, p in model.method.named_parameters() if n.endswith("weight")])
    assert w.numel() > 20_000
    assert w.std().item() == pytest.approx(0.01, rel=0.03)
    assert w.abs().max().item() > 0.03  # draws beyond 3 std exist: no truncation at 2 std
