"""Adapter-only checkpoints: contents, exact reload, many adapters on one backbone, refusals, atomicity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import xmodal
from xmodal.errors import CheckpointMismatchError, XModalError
from xmodal.methods import AdaptedModel, apply_method, list_methods, make_config
from xmodal.methods import checkpoint as ckpt
from xmodal.methods.base import REGISTRY, Method, MethodConfig, hook_block, register

VISION_W, TEXT_W = 64, 48


# ------------------------------------------------------------ a test-only method
@dataclass
class TinyBottleneckConfig(MethodConfig):
    method: ClassVar[str] = "test_bottleneck"
    r: int = 4


class TinyBottleneck(Method):
    """Sequential bottleneck after each block's MLP, through `hook_block` (no backbone change)."""

    name = "test_bottleneck"
    config_class = TinyBottleneckConfig

    def __init__(self, config, backbone):
        super().__init__(config, backbone)
        self.towers = nn.ModuleDict()
        for m in ("vision", "text"):
            w = backbone.width(m)
            self.towers[m] = nn.ModuleList(
                nn.Sequential(nn.Linear(w, config.r), nn.GELU(), nn.Linear(config.r, w))
                for _ in range(backbone.num_layers(m))
            )
            for seq in self.towers[m]:
                nn.init.zeros_(seq[2].weight)
                nn.init.zeros_(seq[2].bias)

    def attach(self, backbone):
        for m, adapters in self.towers.items():
            for block, adapter in zip(backbone.blocks(m), adapters):
                self.add_handles(hook_block(block, "ffn", adapter))


@pytest.fixture
def bottleneck_registered():
    register(TinyBottleneck)
    yield
    REGISTRY.pop("test_bottleneck", None)


# ------------------------------------------------------------------- helpers
def _inputs(backbone):
    g = torch.Generator().manual_seed(2)
    tokens = backbone.tokenize(["a dog runs on the beach", "a red car", "two people talk"])
    return tokens, torch.randn(3, 2, 3, 32, 32, generator=g)


def _embed(model, tokens, video):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_video(video)


def _perturb(model, seed):
    """Stand in for training: move every trainable tensor of the active adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


CONFIGS = {
    "lora": dict(r=4, qkv="q,v"),
    "partial": dict(k=1),
    "projection": dict(include_ln=True),
    "full_finetune": dict(),
    "test_bottleneck": dict(r=3),
    "cross_modal_adapter": dict(r=4, d_s=4),
}


def _trained(backbone, name, seed=0, adapter_name="default"):
    model = apply_method(backbone, make_config(name, **CONFIGS[name]), adapter_name=adapter_name)
    _perturb(model, seed)
    return model


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["lora", "partial", "projection", "full_finetune", "test_bottleneck"])
def test_save_contents_and_exact_reload(tiny_backbone_factory, bottleneck_registered, tmp_path, name):
    source = tiny_backbone_factory(0)
    model = _trained(source, name)
    tokens, video = _inputs(source)
    expected = _embed(model, tokens, video)
    model.save_adapter(tmp_path / "ad")

    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["method"] == name
    assert meta["xmodal_version"] == xmodal.__version__
    assert meta["backbone"]["name"] == "xmodal-test"
    assert meta["backbone"]["vision_width"] == VISION_W and meta["backbone"]["text_width"] == TEXT_W
    for field, value in model.method.config.to_dict().items():  # every hyper-parameter, JSON-typed
        assert meta[field] == json.loads(json.dumps(value)), field

    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    state = model.method.trainable_state(source)
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)
    backbone_names = {n for n, _ in source.named_parameters()}
    if name in ("lora", "test_bottleneck"):  # adapters store no backbone tensor
        assert not set(saved) & backbone_names and not any(k.startswith("clip.") for k in saved)
        assert sum(v.numel() for v in saved.values()) == model.parameter_counts()[0]
    else:  # backbone-tuning baselines store exactly the tensors they train, under backbone names
        assert set(saved) == set(model.method.tensor_names) <= backbone_names
    if name == "full_finetune":  # the baseline's cost: the whole model per task
        assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in source.parameters()) - 1

    fresh = tiny_backbone_factory(0)
    frozen = _embed(fresh, tokens, video)
    loaded = AdaptedModel(fresh)
    loaded.load_adapter(tmp_path / "ad")
    assert loaded.active == "default" and loaded.method.config == model.method.config
    got = _embed(loaded, tokens, video)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.allclose(got[0], frozen[0], atol=1e-4)  # the adapter really does something


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_round_trips(tiny_backbone_factory, tmp_path, name):
    """Trained tensors (randomised here) reload onto a fresh backbone: same video and text embeddings."""
    model = apply_method(tiny_backbone_factory(0), make_config(name))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = ["a blue square appears", "the red circle moves left"]
    with torch.no_grad():
        want_v, want_t = model.encode_video(video), model.encode_text(model.tokenize(captions))
    model.save_adapter(tmp_path / name)
    fresh = AdaptedModel(tiny_backbone_factory(0))
    fresh.load_adapter(tmp_path / name)
    with torch.no_grad():
        assert torch.equal(fresh.encode_video(video), want_v)
        assert torch.equal(fresh.encode_text(fresh.tokenize(captions)), want_t)


def test_many_adapters_switch_on_one_backbone(tiny_backbone_factory, bottleneck_registered, tmp_path):
    tokens, video = _inputs(tiny_backbone_factory(0))
    expected = {}
    adapters = [("lora_a", "lora"), ("lora_b", "lora"), ("part", "partial"), ("bneck", "test_bottleneck")]
    if "cross_modal_adapter" in REGISTRY:  # the paper's own method, when its module is present
        adapters.append(("xma", "cross_modal_adapter"))
    for i, (adapter, method) in enumerate(adapters):
        model = _trained(tiny_backbone_factory(0), method, seed=10 + i, adapter_name=adapter)
        expected[adapter] = _embed(model, tokens, video)
        model.save_adapter(tmp_path / adapter)

    backbone = tiny_backbone_factory(0)
    snap = {k: v.clone() for k, v in backbone.state_dict().items()}
    ids = {n: id(p) for n, p in backbone.named_parameters()}
    frozen = _embed(backbone, tokens, video)
    model = AdaptedModel(backbone)
    for adapter in expected:
        model.load_adapter(tmp_path / adapter, activate=False)
    assert model.active is None and list(model.methods) == list(expected)

    for adapter in ["lora_a", "part", "lora_b", "bneck", "part", "lora_a", "part"] + list(expected)[4:] + ["part"]:
        model.set_active(adapter)
        got = _embed(model, tokens, video)
        assert torch.equal(got[0], expected[adapter][0]) and torch.equal(got[1], expected[adapter][1]), adapter
    assert not torch.allclose(expected["lora_a"][0], expected["lora_b"][0], atol=1e-4)

    model.set_active(None)
    now = backbone.state_dict()
    assert sorted(now) == sorted(snap) and all(torch.equal(now[k], v) for k, v in snap.items())
    assert {n: id(p) for n, p in backbone.named_parameters()} == ids  # never reloaded or replaced
    got = _embed(model, tokens, video)
    assert torch.equal(got[0], frozen[0]) and torch.equal(got[1], frozen[1])


def test_resave_of_switched_adapter_matches_original(tiny_backbone_factory, tmp_path):
    model = _trained(tiny_backbone_factory(0), "partial", adapter_name="p")
    model.save_adapter(tmp_path / "p1")
    model.add_method(make_config("lora", r=2), "l")  # p is detached now
    model.save_adapter(tmp_path / "p2", adapter_name="p")
    a = load_file(str(tmp_path / "p1" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "p2" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _wide_backbone(tmp_path, name="xmodal-test-wide"):
    import open_clip

    from xmodal.backbones.factory import create_backbone

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{name}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(cfg_dir)
    return create_backbone(name, seed=0)


def test_refuses_other_backbone_name(tiny_backbone, tmp_path):
    _trained(tiny_backbone, "lora").save_adapter(tmp_path / "ad")
    wide = AdaptedModel(_wide_backbone(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="'xmodal-test'.*'xmodal-test-wide'"):
        wide.load_adapter(tmp_path / "ad")
    assert len(wide.methods) == 0


def test_refuses_same_name_other_shapes(tiny_backbone, tmp_path):
    _trained(tiny_backbone, "lora").save_adapter(tmp_path / "ad")
    wide = _wide_backbone(tmp_path)
    wide.name = "xmodal-test"  # e.g. a locally edited config under the same name
    with pytest.raises(CheckpointMismatchError, match="vision_width: checkpoint 64 vs backbone 96"):
        AdaptedModel(wide).load_adapter(tmp_path / "ad")


def test_refuses_tensor_shape_or_name_mismatch(tiny_backbone_factory, tmp_path):
    model = _trained(tiny_backbone_factory(0), "lora")
    model.save_adapter(tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = "vision.0.attn.in_proj.q.lora_A"
    bad = dict(state, **{key: torch.zeros(5, VISION_W)})
    save_file(bad, str(weights))
    target = AdaptedModel(tiny_backbone_factory(0))
    with pytest.raises(CheckpointMismatchError, match=r"vision.0.attn.in_proj.q.lora_A.*\(5, 64\).*\(4, 64\)"):
        target.load_adapter(tmp_path / "ad")
    assert len(target.methods) == 0  # the half-built adapter is removed again

    del state[key]
    save_file(state, str(weights))
    with pytest.raises(CheckpointMismatchError, match="missing.*vision.0.attn.in_proj.q.lora_A"):
        target.load_adapter(tmp_path / "ad")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_give_clear_error(tiny_backbone_factory, tmp_path, damage):
    _trained(tiny_backbone_factory(0), "lora").save_adapter(tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07not a tensor file" * 10,
                         "empty": b""}[damage])
    target = AdaptedModel(tiny_backbone_factory(0))
    with pytest.raises(XModalError, match="adapter_model.safetensors: not a readable safetensors file"):
        target.load_adapter(tmp_path / "ad")
    assert len(target.methods) == 0


def test_missing_and_invalid_files(tiny_backbone, tmp_path):
    model = AdaptedModel(tiny_backbone)
    with pytest.raises(XModalError, match="adapter_config.json: not found"):
        model.load_adapter(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(XModalError, match="invalid JSON"):
        model.load_adapter(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({
        "method": "lora", "r": 4, "rank_typo": 3, "backbone": ckpt.backbone_signature(tiny_backbone)}))
    with pytest.raises(XModalError, match="unknown field.*rank_typo"):
        model.load_adapter(tmp_path / "bad")
    with pytest.raises(XModalError, match="no adapter"):
        model.save_adapter(tmp_path / "out")


def test_save_is_atomic(tiny_backbone_factory, tmp_path, monkeypatch):
    model = _trained(tiny_backbone_factory(0), "lora", seed=1)
    target = tmp_path / "ad"
    model.save_adapter(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    _perturb(model, seed=2)  # a newer state whose save fails half-way through the weights file
    real_save = ckpt.save_safetensors

    def failing_save(tensors, path, metadata=None):
        real_save(dict(list(tensors.items())[:2]), path, metadata)
        with open(path, "ab") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_safetensors", failing_save)
    with pytest.raises(XModalError, match="disk full"):  # xmodal.atomic's one-line WriteError
        model.save_adapter(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp dirs left behind

    # a failure while swapping directories puts the previous checkpoint back as well
    monkeypatch.setattr(ckpt, "save_safetensors", real_save)
    import xmodal.atomic as atomic_module

    real_replace = atomic_module.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", flaky_replace)
    with pytest.raises(XModalError, match="rename failed"):
        model.save_adapter(target)
    monkeypatch.setattr(atomic_module.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]

    model.save_adapter(target)  # and a clean save replaces it
    assert {p.name: p.read_bytes() for p in target.iterdir()} != before
    fresh = AdaptedModel(tiny_backbone_factory(0))
    fresh.load_adapter(target)
    tokens, video = _inputs(fresh.backbone)
    assert torch.equal(_embed(fresh, tokens, video)[0], _embed(model, tokens, video)[0])
