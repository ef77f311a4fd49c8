"""MV-Adapter and MSTA: identity at init, temporal mixing, masking, tying/sharing, L_CC."""

import pytest
import torch

from xmodal.methods import apply_method, make_config

G = torch.Generator().manual_seed(0)
VIDEO = torch.randn(2, 4, 3, 32, 32, generator=G)


def _randomise(model, std=0.2):
    torch.manual_seed(1)
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=std)


@pytest.mark.parametrize("name", ["mv_adapter", "msta"])
def test_identity_at_init(tiny_backbone_factory, name):
    backbone = tiny_backbone_factory(0)
    tokens = backbone.tokenize(["the red circle moves left"])
    with torch.no_grad():
        ref_v, ref_t = backbone.encode_video(VIDEO), backbone.encode_text(tokens)
    model = apply_method(backbone, make_config(name))
    with torch.no_grad():
        assert torch.equal(model.encode_video(VIDEO), ref_v)
        assert torch.equal(model.encode_text(tokens), ref_t)


@pytest.mark.parametrize("name,cfg,mixes", [
    ("mv_adapter", {"temporal": "full"}, True),
    ("mv_adapter", {"temporal": "no_calibration"}, True),
    ("mv_adapter", {"temporal": "none"}, False),
    ("msta", {"start": 0, "scale": 1.0}, True),
    ("msta", {"start": 0, "scale": 1.0, "temporal_kernel": (1, 1, 1)}, False),
    ("msta", {"start": 0, "scale": 1.0, "temporal": "conv3d"}, True),
    ("msta", {"start": 0, "scale": 1.0, "temporal": "none"}, False),
])
def test_temporal_mixing(tiny_backbone_factory, name, cfg, mixes):
    model = apply_method(tiny_backbone_factory(0), make_config(name, **cfg))
    _randomise(model)
    edited = VIDEO.clone()
    edited[:, 0] += 1.0
    with torch.no_grad():
        # frame 1: with 2 blocks and MSTA's block-parallel form, frame 0's pixels reach the
        # neighbouring frame's CLS through the second block's temporal conv
        a, b = model.encode_video(VIDEO)[:, 1], model.encode_video(edited)[:, 1]
    assert (not torch.allclose(a, b, atol=1e-6)) == mixes


def test_mv_adapter_padded_frames_do_not_leak(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("mv_adapter"))
    _randomise(model)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    edited = VIDEO.clone()
    edited[0, 2:] = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.encode_video(VIDEO, mask)
        b = model.encode_video(edited, mask)
    assert torch.allclose(a[0, :2], b[0, :2], atol=1e-5)
    assert torch.allclose(a[1], b[1], atol=1e-5)


def test_mv_adapter_cross_modality_tying(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("mv_adapter", cmt_layers="last:1"))
    assert len(model.method.factors) == 1 and model.method.tied == {"vision": [1], "text": [1]}
    _randomise(model)
    tokens = model.tokenize(["a blue square appears"])
    for loss_of in (lambda: model.encode_video(VIDEO).pow(2).sum(), lambda: model.encode_text(tokens).pow(2).sum()):
        model.zero_grad()
        loss_of().backward()
        assert model.method.factors[0].grad.abs().sum() > 0  # both towers reach the shared factor
    no_cmt = apply_method(tiny_backbone_factory(0), make_config("mv_adapter", cmt=False))
    assert len(no_cmt.method.factors) == 0
    per_in = apply_method(tiny_backbone_factory(0), make_config("mv_adapter", cmt_mode="input"))
    assert per_in.method.vision["1"].tie.proj.out_features == 64  # vision width
    assert per_in.method.text["1"].tie.proj.out_features == 48  # text width


def test_mv_adapter_ablation_sizes_grow(tiny_backbone_factory):
    counts = [apply_method(tiny_backbone_factory(0), make_config("mv_adapter", temporal=t)).parameter_counts()[0]
              for t in ("none", "no_calibration", "full")]
    assert counts[0] < counts[1] < counts[2]


def test_msta_shared_middle_projection_and_top_layers(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("msta"))
    assert model.method.layer_ids == {"vision": [1], "text": [1]}  # top third of 2 blocks
    _randomise(model)
    shared = model.method.shared[0].weight
    tokens = model.tokenize(["a blue square appears"])
    model.encode_video(VIDEO).pow(2).sum().backward()
    g_vision = shared.grad.clone()
    model.zero_grad()
    model.encode_text(tokens).pow(2).sum().backward()
    assert g_vision.abs().sum() > 0 and shared.grad.abs().sum() > 0


def test_msta_consistency_loss(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("msta", start=0, scale=1.0))
    captions = ["the red circle moves left", "a blue square appears"]
    desc = ["the red circle moves left", "a blue square appears"]
    tokens = model.tokenize(captions)
    batch = {"desc_tokens": model.tokenize(desc).unsqueeze(1), "desc_mask": torch.ones(2, 1, dtype=torch.bool)}
    text = model.encode_text(tokens)
    loss = model.method.extra_loss(model, batch, {"text": text})
    assert loss.abs() < 1e-5  # identity at init: caption == its description under the frozen model
    _randomise(model)
    text = model.encode_text(tokens)
    loss = model.method.extra_loss(model, batch, {"text": text})
    assert loss > 1e-3
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.text.parameters())
    assert model.method.extra_loss(model, {}, {"text": text}) is None


def test_msta_consistency_loss_through_the_trainer(tiny_backbone_factory):
    """The engine's outputs reach MSTA's L_CC: the trainer's loss = InfoNCE + alpha * L_CC."""
    from xmodal.engine.config import TrainConfig
    from xmodal.engine.heads import SimilarityHead
    from xmodal.engine.loss import contrastive_loss
    from xmodal.engine.train import Trainer

    model = apply_method(tiny_backbone_factory(0), make_config("msta", start=0, scale=1.0))
    _randomise(model)
    captions = ["the red circle moves left", "a blue square appears"]
    desc = [["from second 1 the red circle moves to the left", "a red circle"], ["a blue square appears", ""]]
    batch = {"tokens": model.tokenize(captions), "pixels": torch.randn(2, 2, 3, 32, 32),
             "frame_mask": torch.ones(2, 2, dtype=torch.bool), "captions": captions,
             "desc_tokens": torch.stack([model.tokenize(d) for d in desc]),
             "desc_mask": torch.tensor([[True, True], [True, False]]),
             "desc_kind": torch.tensor([[1, 0], [1, -1]])}  # temporal, spatial | temporal, padding
    head = SimilarityHead("mean")
    trainer = Trainer(model, head, TrainConfig(lr=1e-3, device="cpu", precision="fp32", progress=False), 10)
    with torch.no_grad():
        total, _ = trainer.forward_loss(batch)
        text, frames = model(batch["tokens"], batch["pixels"], batch["frame_mask"])
        plain = contrastive_loss(text, frames, batch["frame_mask"], head, model.logit_scale).loss
        l_cc = model.method.extra_loss(model, batch, {"text": text})
    assert l_cc > 1e-3
    assert float(total) == pytest.approx(float(plain + l_cc), rel=1e-5)
    r = trainer.step([batch])  # and a full update runs with descriptions in the batch
    assert r.loss == pytest.approx(float(total), rel=1e-4)
