"""ST-Adapter and Convpass: identity at init, temporal mixing, gradients, checkpoints."""

import pytest
import torch

from xmodal.methods import apply_method, make_config


def _video(seed=0, b=2, f=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, f, 3, 32, 32, generator=g)


@pytest.mark.parametrize("name", ["st_adapter", "convpass"])
def test_identity_at_init_and_gradients(tiny_backbone_factory, name):
    backbone = tiny_backbone_factory(0)
    video = _video()
    with torch.no_grad():
        ref = backbone.encode_video(video)
        ref_text = backbone.encode_text(backbone.tokenize(["a red circle"]))
    model = apply_method(backbone, make_config(name))
    with torch.no_grad():
        assert torch.equal(model.encode_video(video), ref)
        assert torch.equal(model.encode_text(model.tokenize(["a red circle"])), ref_text)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.encode_video(video).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is None for p in backbone.parameters())
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert not torch.allclose(model.encode_video(video), ref)


def test_st_adapter_mixes_frames_convpass_does_not(tiny_backbone_factory):
    """Changing frame 0 changes frame 2's feature only through the temporal conv."""
    video = _video()
    edited = video.clone()
    edited[:, 0] += 1.0
    for name, mixes in [("st_adapter", True), ("convpass", False)]:
        model = apply_method(tiny_backbone_factory(0), make_config(name))
        for p in model.trainable_parameters():
            torch.nn.init.normal_(p, std=0.2)
        with torch.no_grad():
            a = model.encode_video(video)[:, 1]
            b = model.encode_video(edited)[:, 1]
        assert (not torch.allclose(a, b)) == mixes, name


def test_st_adapter_images_are_one_frame_clips(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("st_adapter"))
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.2)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), model.encode_video(images[:, None])[:, 0], atol=1e-6)


def test_parameter_counts(tiny_backbone_factory):
    backbone = tiny_backbone_factory(0)  # vision width 64, 2 blocks
    model = apply_method(backbone, make_config("st_adapter"))
    c = 32  # half the width
    per_block = (64 * c + c) + (c * 3 + c) + (c * 64 + 64)
    assert model.parameter_counts()[0] == 2 * per_block
    model = apply_method(tiny_backbone_factory(0), make_config("convpass", positions="ffn", layers="last:1"))
    assert model.parameter_counts()[0] == (64 * 8 + 8) + (8 * 8 * 9 + 8) + (8 * 64 + 64)
