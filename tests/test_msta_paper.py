"""MSTA as the paper writes it: the adapter parallel to the whole block (reading the block input),
the video up-projection's temporal branch and its ablations, Kaiming init, the 8.7M / 1.744M
budgets, and L_CC = alpha * (2 - cos(w, D_spatial) - cos(w, D_temporal)) averaged per kind."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.methods import apply_method, get_method_class, make_config
from xmodal.methods.base import hook_block


class Shapes:
    """The only backbone facts MSTA's tensors depend on (ViT-B: 12 blocks, widths 768 / 512)."""

    def num_layers(self, m):
        return 12

    def width(self, m):
        return 768 if m == VISION else 512


def count(**cfg):
    method = get_method_class("msta")(make_config("msta", **cfg), Shapes())
    return sum(p.numel() for p in method.parameters())


def test_paper_budget_8_7m_and_authors_logs_1_744m():
    assert count(preset="paper") == 8_712_192  # the paper's 8.7M
    assert count() == count(preset="authors") == 1_744_000  # the default is the authors' logs setting
    assert make_config("msta") == make_config("msta", preset="authors")
    # the literal reading (a full r -> d 3D conv from the bottleneck) nearly doubles the budget
    assert count(preset="paper", temporal="conv3d") == 8_712_192 + 12 * ((256 * 768 * 3 + 768) - (768 * 3 + 768))
    assert count(preset="paper", temporal="none") == 8_712_192 - 12 * (768 * 3 + 768)
    assert count(preset="paper", shared=False) == 8_712_192 - 12 * (256 * 256 + 256)


def test_default_adapts_blocks_8_to_12(tiny_backbone_factory):
    method = get_method_class("msta")(make_config("msta"), Shapes())
    assert method.layer_ids == {VISION: [7, 8, 9, 10, 11], TEXT: [7, 8, 9, 10, 11]}
    assert method.config.scale == 0.005 and method.config.r == 128 and method.config.position == "block"


def test_block_parallel_hook_reads_block_input_and_adds_to_block_output(tiny_backbone):
    block = tiny_backbone.blocks(TEXT)[0]
    x = torch.randn(2, 5, 48)
    lin = torch.nn.Linear(48, 48)
    with torch.no_grad():
        plain = block(x)
        handles = hook_block(block, "block", lin, form="block_parallel")
        hooked = block(x)
        for h in handles:
            h.remove()
        seq = hook_block(block, "ffn", lin)
        sequential = block(x)
        for h in seq:
            h.remove()
    assert torch.allclose(hooked, plain + lin(x), atol=1e-6)
    assert not torch.allclose(sequential, hooked, atol=1e-4)  # not the branch-output form
    assert torch.equal(block(x), plain)  # removed cleanly


def test_msta_is_parallel_to_the_whole_block(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("msta", start=0, scale=1.0))
    torch.manual_seed(0)
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    method = model.method
    block = model.backbone.blocks(TEXT)[1]
    seen = {}
    def keep_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["q_x"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "q_x"}  # the causal mask

    def keep_output(module, args, out):
        seen["out"] = out

    h = block.register_forward_pre_hook(keep_input, with_kwargs=True)
    h2 = block.register_forward_hook(keep_output)
    tokens = model.tokenize(["a red circle"])
    with torch.no_grad():
        model.encode_text(tokens)
        h.remove()
        h2.remove()
        with model.disable_adapters():
            frozen_out = block(seen["x"], **seen["kwargs"])
        expected = frozen_out + method.text["1"](seen["x"], method.shared[method._slot(TEXT, 1)])
    assert torch.allclose(seen["out"], expected, atol=1e-5)
    old = apply_method(tiny_backbone_factory(0), make_config("msta", start=0, position="ffn"))
    assert old.method.config.position == "ffn"  # the earlier sequential form stays available


def test_kaiming_init_and_identity(tiny_backbone_factory):
    torch.manual_seed(0)
    method = get_method_class("msta")(make_config("msta", preset="paper"), Shapes())
    down = method.vision["0"].down.weight
    assert down.std().item() == pytest.approx(1 / 768 ** 0.5, rel=0.02)  # Kaiming (fan_in, gain 1)
    assert method.shared[0].weight.std().item() == pytest.approx(1 / 256 ** 0.5, rel=0.02)
    up = method.vision["0"].up
    assert up.up.weight.abs().sum() == 0 and up.conv.weight.abs().sum() == 0  # zero up: identity
    assert method.identity_at_init
    lit = get_method_class("msta")(make_config("msta", preset="paper", init="kaiming_all"), Shapes())
    assert lit.vision["0"].up.up.weight.std().item() == pytest.approx(1 / 256 ** 0.5, rel=0.05)
    assert not lit.identity_at_init

    backbone = tiny_backbone_factory(0)
    video = torch.randn(1, 3, 3, 32, 32)
    tokens = backbone.tokenize(["a dog"])
    with torch.no_grad():
        ref = backbone.encode_video(video), backbone.encode_text(tokens)
    for temporal in ("depthwise", "conv3d", "none"):
        model = apply_method(backbone, make_config("msta", start=0, temporal=temporal))
        with torch.no_grad():
            assert torch.equal(model.encode_video(video), ref[0]) and torch.equal(model.encode_text(tokens), ref[1])
        model.delete_method("default")


def test_no_shared_projection_ablation(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("msta", start=0, shared=False))
    assert not hasattr(model.method, "shared")
    video = torch.randn(1, 2, 3, 32, 32)
    model.encode_video(video).pow(2).sum().backward()  # runs without the middle projection


# ------------------------------------------------------------------------------ L_CC
CAPTIONS = ["the red circle moves left", "a blue square appears", "two dots"]
DESCS = [["a red circle", "the circle slides to the left", "a red disc"],
         ["a blue square", "", ""],
         ["", "", ""]]


def _setup(tiny_backbone_factory, alpha=1.0):
    model = apply_method(tiny_backbone_factory(0), make_config("msta", start=0, scale=1.0, consistency_weight=alpha))
    torch.manual_seed(2)
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    desc_tokens = torch.stack([model.tokenize(d) for d in DESCS])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    return model, desc_tokens, mask


def _frozen(model, texts):
    with torch.no_grad(), model.disable_adapters():
        return F.normalize(model.backbone.encode_text(model.tokenize(texts)), dim=-1)


def test_consistency_loss_one_term_per_kind(tiny_backbone_factory):
    model, desc_tokens, mask = _setup(tiny_backbone_factory, alpha=0.5)
    kind = torch.tensor([[0, 1, 0], [1, -1, -1], [-1, -1, -1]])  # spatial, temporal, spatial | temporal
    text = model.encode_text(model.tokenize(CAPTIONS))
    batch = {"desc_tokens": desc_tokens, "desc_mask": mask, "desc_kind": kind}
    loss = model.method.extra_loss(model, batch, {"text": text})
    e = _frozen(model, ["a red circle", "the circle slides to the left", "a red disc", "a blue square"])
    d_spatial_0 = (e[0] + e[2]) / 2
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1)  # noqa: E731
    spatial = 1 - cos(text[0], d_spatial_0)  # only item 0 has spatial descriptions
    temporal = ((1 - cos(text[0], e[1])) + (1 - cos(text[1], e[3]))) / 2  # items 0 and 1
    assert loss.item() == pytest.approx((0.5 * (spatial + temporal)).item(), rel=1e-5)
    terms = model.method.consistency_terms(model, batch, text)
    assert set(terms) == {"spatial", "temporal"}


def test_items_without_descriptions_do_not_dilute(tiny_backbone_factory):
    model, desc_tokens, mask = _setup(tiny_backbone_factory)
    text = model.encode_text(model.tokenize(CAPTIONS))
    kind = torch.tensor([[0, 0, 0], [0, -1, -1], [-1, -1, -1]])
    full = model.method.extra_loss(model, {"desc_tokens": desc_tokens, "desc_mask": mask, "desc_kind": kind},
                                   {"text": text})
    two = model.method.extra_loss(model, {"desc_tokens": desc_tokens[:2], "desc_mask": mask[:2],
                                          "desc_kind": kind[:2]}, {"text": text[:2]})
    assert full.item() == pytest.approx(two.item(), rel=1e-6)  # item 2 (no descriptions) adds nothing


def test_batches_without_kinds_are_one_generic_term(tiny_backbone_factory):
    model, desc_tokens, mask = _setup(tiny_backbone_factory)
    text = model.encode_text(model.tokenize(CAPTIONS))
    loss = model.method.extra_loss(model, {"desc_tokens": desc_tokens, "desc_mask": mask}, {"text": text})
    e = _frozen(model, ["a red circle", "the circle slides to the left", "a red disc", "a blue square"])
    mean0 = (e[0] + e[1] + e[2]) / 3
    expected = ((1 - F.cosine_similarity(text[0], mean0, dim=0)) + (1 - F.cosine_similarity(text[1], e[3], dim=0))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.method.consistency_terms(model, {"desc_tokens": desc_tokens, "desc_mask": mask}, text).keys() == {"generic"}
    none = model.method.extra_loss(model, {"desc_tokens": desc_tokens, "desc_mask": torch.zeros_like(mask)},
                                   {"text": text})
    assert none is None


def test_checkpoints_saved_before_the_paper_pass_keep_their_meaning():
    from xmodal.methods import config_from_dict

    old_msta = {"method": "msta", "r": 64, "scale": 1.0, "start": "auto", "position": "ffn",
                "temporal_kernel": [3, 1, 1], "modalities": "both", "consistency_weight": 1.0}
    cfg = config_from_dict(old_msta)
    method = get_method_class("msta")(cfg, Shapes())
    assert method.layer_ids[VISION] == [8, 9, 10, 11]  # the old top third, not today's blocks 8-12
    old_mv = {"method": "mv_adapter", "cmt_mode": "output"}
    mv = config_from_dict(old_mv)
    assert (mv.cmt_mode, mv.patch_temporal) == ("down_out", True)
    assert config_from_dict({"method": "mv_adapter"}).patch_temporal is False
