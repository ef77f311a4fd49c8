"""Partial, projection-only and full fine-tuning: exact tensor selection, gradients, switching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import XModalError
from xmodal.methods import apply_method, make_config

VISION_W, TEXT_W, EMBED = 64, 48, 32


def _inputs(backbone):
    g = torch.Generator().manual_seed(1)
    tokens = backbone.tokenize(["a dog runs on the beach", "a red car", "two people talk"])
    return tokens, torch.randn(3, 2, 3, 32, 32, generator=g)


def _embed(model, tokens, video):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_video(video)


def _loss(model, tokens, video):
    t = F.normalize(model.encode_text(tokens), dim=-1)
    v = F.normalize(model.encode_video(video).mean(1), dim=-1)
    logits = model.logit_scale.exp() * t @ v.t()
    target = torch.arange(len(t))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def _train(model, tokens, video, steps=2):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, tokens, video).backward()
        opt.step()


def _snapshot(backbone):
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def _block_params(w):
    """ln_1, in_proj, out_proj, ln_2, c_fc, c_proj of one open_clip block of width w (MLP 4w)."""
    return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)


def _names(backbone, prefixes):
    return {n for n, _ in backbone.named_parameters() if n.startswith(prefixes)}


V_HEAD = ("clip.visual.ln_post.", "clip.visual.proj")
T_HEAD = ("clip.ln_final.", "clip.text_projection")
V_LAST = ("clip.visual.transformer.resblocks.1.",)
T_LAST = ("clip.transformer.resblocks.1.",)


@pytest.mark.parametrize(
    "name, kwargs, prefixes, count",
    [
        ("partial", {}, V_LAST + T_LAST + V_HEAD + T_HEAD,
         _block_params(VISION_W) + _block_params(TEXT_W) + 2 * VISION_W + VISION_W * EMBED + 2 * TEXT_W + TEXT_W * EMBED),
        ("partial", {"k": 2, "modalities": "vision", "include_head": False}, ("clip.visual.transformer.",),
         2 * _block_params(VISION_W)),
        ("partial", {"k": 0}, V_HEAD + T_HEAD, 2 * VISION_W + VISION_W * EMBED + 2 * TEXT_W + TEXT_W * EMBED),
        ("projection", {}, ("clip.visual.proj", "clip.text_projection"), (VISION_W + TEXT_W) * EMBED),
        ("projection", {"include_ln": True, "modalities": "text"}, T_HEAD, 2 * TEXT_W + TEXT_W * EMBED),
    ],
)
def test_selection_and_counts(tiny_backbone, name, kwargs, prefixes, count):
    model = apply_method(tiny_backbone, make_config(name, **kwargs))
    assert set(model.method.tensor_names) == _names(tiny_backbone, prefixes)
    assert model.parameter_counts()[0] == count
    # the checkpoint keys are the backbone's own names and values
    state = model.method.trainable_state(tiny_backbone)
    assert set(state) == _names(tiny_backbone, prefixes)
    params = dict(tiny_backbone.named_parameters())
    assert all(torch.equal(v, params[k]) for k, v in state.items())


@pytest.mark.parametrize("train_scale", [False, True])
def test_full_finetune_selects_everything(tiny_backbone, train_scale):
    model = apply_method(tiny_backbone, make_config("full_finetune", train_logit_scale=train_scale))
    every = {n for n, _ in tiny_backbone.named_parameters()}
    expected = every if train_scale else every - {"clip.logit_scale"}
    assert set(model.method.tensor_names) == expected
    total = sum(p.numel() for p in tiny_backbone.parameters())
    assert model.parameter_counts() == (total - (0 if train_scale else 1), total)
    with pytest.raises(XModalError, match="another backbone-tuning method"):
        apply_method(tiny_backbone, make_config("partial"))  # a second model on the same, busy backbone
    model.set_active(None)
    vision_only = apply_method(tiny_backbone, make_config("full_finetune", modalities="vision"))
    assert set(vision_only.method.tensor_names) == {n for n in every if n.startswith("clip.visual.")}


@pytest.mark.parametrize("name", ["partial", "projection", "full_finetune"])
def test_identity_gradients_training_and_restore(tiny_backbone, name):
    snap = _snapshot(tiny_backbone)
    tokens, video = _inputs(tiny_backbone)
    t0, v0 = _embed(tiny_backbone, tokens, video)
    model = apply_method(tiny_backbone, make_config(name))
    trained = set(model.method.tensor_names)

    # identity at init: the same tensor values (bit-exact); the outputs agree to float noise
    # only because torch picks other attention kernels once weights require grad
    now = tiny_backbone.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())
    t1, v1 = _embed(model, tokens, video)
    torch.testing.assert_close(t1, t0, rtol=0, atol=1e-5)
    torch.testing.assert_close(v1, v0, rtol=0, atol=1e-5)

    _loss(model, tokens, video).backward()  # gradients reach exactly the selected tensors
    for n, p in tiny_backbone.named_parameters():
        assert (p.grad is not None) == (n in trained), n
        assert p.requires_grad == (n in trained), n
    for p in tiny_backbone.parameters():
        p.grad = None

    _train(model, tokens, video)
    params = dict(tiny_backbone.named_parameters())
    for n, v in snap.items():
        if n in trained:
            assert not torch.equal(params[n], v), f"{n} did not train"
        elif n in params:
            assert torch.equal(params[n], v), f"{n} changed but is frozen"
    t2, v2 = _embed(model, tokens, video)
    assert not torch.allclose(t2, t0, atol=1e-4)

    objects = {n: id(p) for n, p in tiny_backbone.named_parameters()}
    model.set_active(None)  # the frozen backbone comes back bit-exactly, same Parameter objects
    now = tiny_backbone.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())
    assert {n: id(p) for n, p in tiny_backbone.named_parameters()} == objects
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    assert torch.equal(_embed(tiny_backbone, tokens, video)[0], t0)

    model.set_active("default")  # switching back keeps the training result
    t3, v3 = _embed(model, tokens, video)
    assert torch.equal(t3, t2) and torch.equal(v3, v2)

    with model.disable_adapters():
        assert torch.equal(_embed(model, tokens, video)[0], t0)
    assert torch.equal(_embed(model, tokens, video)[0], t2)
    assert all(params[n].requires_grad for n in trained)


def test_switching_between_two_partial_adapters(tiny_backbone):
    snap = _snapshot(tiny_backbone)
    tokens, video = _inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("partial"), adapter_name="a")
    _train(model, tokens, video)
    ta, _ = _embed(model, tokens, video)
    model.add_method(make_config("projection", include_ln=True), "b")  # activates b, detaches a
    tb0, _ = _embed(model, tokens, video)
    assert torch.equal(tb0, _embed_frozen(tiny_backbone, snap, tokens))
    _train(model, tokens, video)
    tb, _ = _embed(model, tokens, video)
    model.set_active("a")
    assert torch.equal(_embed(model, tokens, video)[0], ta)
    model.set_active("b")
    assert torch.equal(_embed(model, tokens, video)[0], tb)
    # a detached adapter still reports its own trained values
    state_a = model.methods["a"].trainable_state(tiny_backbone)
    assert not torch.equal(state_a["clip.ln_final.weight"], tiny_backbone.clip.ln_final.weight)
    model.set_active(None)
    now = tiny_backbone.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())


def _embed_frozen(backbone, snap, tokens):
    now = backbone.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items() if k.startswith("clip.visual"))
    with torch.no_grad():
        return backbone.encode_text(tokens)


def test_untrained_detached_adapter_reports_frozen_values(tiny_backbone):
    snap = _snapshot(tiny_backbone)
    tokens, video = _inputs(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("projection"), adapter_name="p")
    model.add_method(make_config("partial", k=0), "q", activate=False)
    _train(model, tokens, video)  # trains p in place: the backbone now carries p's projections
    state_q = model.methods["q"].trainable_state(tiny_backbone)
    assert torch.equal(state_q["clip.text_projection"], snap["clip.text_projection"])
    assert not torch.equal(tiny_backbone.clip.text_projection, snap["clip.text_projection"])


def test_load_trainable_state_while_detached_and_attached(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("projection"))
    new = {k: torch.randn_like(v) for k, v in model.method.trainable_state(tiny_backbone).items()}
    model.method.load_trainable_state(new, tiny_backbone)  # attached: straight into the backbone
    assert torch.equal(tiny_backbone.clip.visual.proj, new["clip.visual.proj"])
    model.set_active(None)
    other = {k: v * 2 for k, v in new.items()}
    model.methods["default"].load_trainable_state(other, tiny_backbone)  # detached: into the store
    assert not torch.equal(tiny_backbone.clip.visual.proj, other["clip.visual.proj"])
    model.set_active("default")
    assert torch.equal(tiny_backbone.clip.text_projection, other["clip.text_projection"])


def test_errors(tiny_backbone):
    with pytest.raises(XModalError, match="k=3"):
        apply_method(tiny_backbone, make_config("partial", k=3))
    with pytest.raises(XModalError, match="modalities"):
        apply_method(tiny_backbone, make_config("projection", modalities="audio"))
    with pytest.raises(XModalError, match="selects no backbone tensor"):
        apply_method(tiny_backbone, make_config("partial", k=0, include_head=False))
    model = apply_method(tiny_backbone, make_config("projection"))
    bad = {"clip.visual.proj": torch.zeros(3, 3), "clip.text_projection": torch.zeros(TEXT_W, EMBED)}
    with pytest.raises(XModalError, match="clip.visual.proj"):
        model.method.load_trainable_state(bad, tiny_backbone, source="x.safetensors")


def test_built_while_lora_attached_uses_canonical_names(tiny_backbone):
    snap = _snapshot(tiny_backbone)
    model = apply_method(tiny_backbone, make_config("lora", r=2), adapter_name="lora")
    assert any("parametrizations" in n for n, _ in tiny_backbone.named_parameters())
    part = model.add_method(make_config("partial"), "part", activate=False)
    assert not any("parametrizations" in n for n in part.tensor_names)
    assert "clip.transformer.resblocks.1.attn.in_proj_weight" in part.tensor_names
    with torch.no_grad():  # give the LoRA a visible effect: the partial adapter must not see it
        for n, p in model.method.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    state = part.trainable_state(tiny_backbone)
    assert all(torch.equal(v, snap[k]) for k, v in state.items())
    model.set_active("part")
    assert set(n for n, _ in tiny_backbone.named_parameters()) == set(k for k in snap if k != "clip.attn_mask")
    model.set_active(None)
    now = tiny_backbone.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())
