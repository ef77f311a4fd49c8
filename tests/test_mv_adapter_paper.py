"""MV-Adapter as the paper writes it: patch tokens without temporal information, CMT Down-In by
default (and Up-In / Up-Out, Tab. 7), per-dataset configs with the paper's hyper-parameters."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xmodal.backbones import context
from xmodal.engine.config import load_config
from xmodal.errors import XModalError
from xmodal.methods import apply_method, make_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _randomise(model, std=0.2):
    torch.manual_seed(1)
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=std)


def _video_deltas(adapter, x, frames, factor):
    with torch.no_grad(), context.frames(frames):
        return adapter(x, factor)


@pytest.mark.parametrize("patch_temporal", [False, True])
def test_patch_tokens_get_no_temporal_information(tiny_backbone_factory, patch_temporal):
    model = apply_method(tiny_backbone_factory(0), make_config("mv_adapter", patch_temporal=patch_temporal))
    _randomise(model)
    adapter = model.method.vision["0"]
    frames, tokens = 3, 17  # CLS + 4x4 patches
    x = torch.randn(frames, tokens, 64)
    edited = x.clone()
    edited[0, 1:] += 1.0  # frame 0's patch tokens
    factor = model.method._factor("vision", 0)
    a, b = _video_deltas(adapter, x, frames, factor), _video_deltas(adapter, edited, frames, factor)
    other_patches_same = torch.allclose(a[1:, 1:], b[1:, 1:], atol=1e-6)
    assert other_patches_same == (not patch_temporal)
    assert not torch.allclose(a[1:, 0], b[1:, 0], atol=1e-6)  # the CLS tokens still mix over time
    if not patch_temporal:  # down -> activation -> up, token by token
        expected = adapter.project_up(adapter.project_down(x[:, 1:], factor), factor) * adapter.scale
        assert torch.allclose(a[:, 1:], expected, atol=1e-6)


def test_cmt_default_is_down_in_and_modes_of_tab7(tiny_backbone_factory):
    assert make_config("mv_adapter").cmt_mode == "down_in"
    assert make_config("mv_adapter", cmt_mode="output").cmt_mode == "down_out"  # older configs
    assert make_config("mv_adapter", cmt_mode="input").cmt_mode == "down_in"
    with pytest.raises(XModalError, match="cmt_mode"):
        make_config("mv_adapter", cmt_mode="sideways")
    widths = {"vision": 64, "text": 48}
    expected = {"down_in": widths, "down_out": {"vision": 16, "text": 16},
                "up_in": {"vision": 16, "text": 16}, "up_out": widths}
    x = torch.randn(2, 5, 48)
    for mode, channels in expected.items():
        model = apply_method(tiny_backbone_factory(0), make_config("mv_adapter", bottleneck=16, cmt_mode=mode))
        _randomise(model)
        for m in ("vision", "text"):
            assert getattr(model.method, m)["1"].tie.proj.out_features == channels[m]
        text = model.method.text["1"]
        factor = model.method.factors[0]
        plain_down = F.gelu(text.down(x))
        tied_down = text.project_down(x, factor)
        assert torch.allclose(plain_down, tied_down) == mode.startswith("up")  # beta touches only its projection
        z = torch.randn(2, 5, 16)
        assert torch.allclose(text.up(z), text.project_up(z, factor)) == mode.startswith("down")
        tokens = model.tokenize(["a blue square"])
        model.zero_grad()
        model.encode_text(tokens).pow(2).sum().backward()
        assert factor.grad.abs().sum() > 0


@pytest.mark.parametrize("dataset,frames,words,epochs,batch", [
    ("msrvtt", 12, 32, 5, 128), ("msvd", 12, 32, 5, 128), ("lsmdc", 12, 32, 5, 128),
    ("didemo", 32, 64, 15, 64), ("activitynet", 32, 64, 15, 64),
])
def test_paper_configs_per_dataset(dataset, frames, words, epochs, batch):
    cfg = load_config(CONFIGS / f"{dataset}_mv_adapter_vitb16.yaml")
    assert cfg.data.dataset == dataset and cfg.model.backbone == "ViT-B-16"
    assert (cfg.data.num_frames, cfg.data.max_words, cfg.train.epochs, cfg.train.batch_size) == (frames, words, epochs, batch)
    assert cfg.train.lr == 5e-6 and cfg.train.weight_decay == 0.0  # Adam
    assert cfg.head.pooling == "mean"
    method = cfg.method_config()
    assert (method.method, method.cmt_mode, method.patch_temporal, method.bottleneck, method.scale) == \
        ("mv_adapter", "down_in", False, 64, 0.1)


def test_msta_config():
    cfg = load_config(CONFIGS / "msrvtt_msta_vitb16.yaml")
    method = cfg.method_config()
    assert (method.r, method.start, method.scale, method.position) == (128, "auto", 0.005, "block")
    assert cfg.head.pooling == "mean"
