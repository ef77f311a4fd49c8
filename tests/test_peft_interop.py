"""peft interop: an xmodal LoRA exported as a peft folder loads onto a transformers CLIPModel with
PeftModel.from_pretrained and gives the same embeddings; a peft LoRA trained on a CLIPModel
imports into xmodal (today's load_adapter refused it: "adapter was trained on backbone None")."""

import json

import pytest
import torch

from xmodal.backbones.weights import save_hf_clip
from xmodal.errors import XModalError
from xmodal.methods import AdaptedModel, apply_method, make_config
from xmodal.methods.peft_interop import export_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CAPTIONS = ["the red circle moves left", "a blue square appears"]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _hf_features(hf, tokens):
    with torch.no_grad():
        t = hf.get_text_features(input_ids=tokens)
        v = hf.get_image_features(pixel_values=IMAGES)
    t = getattr(t, "pooler_output", t)
    v = getattr(v, "pooler_output", v)
    return t, v


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_backbone_factory):
    return save_hf_clip(tiny_backbone_factory(0), tmp_path_factory.mktemp("hf") / "clip")


def test_export_loads_in_peft_with_same_embeddings(tiny_backbone_factory, hf_dir, tmp_path):
    model = apply_method(tiny_backbone_factory(0), make_config("lora", r=4, alpha=8, qkv="q,v"))
    _randomise(model.trainable_parameters())
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        ref_t, ref_v = model.encode_text(tokens), model.encode_image(IMAGES)
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(hf_dir))
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert "vision_model.encoder.layers.0.self_attn.q_proj" in meta["target_modules"]
    assert not any("k_proj" in t for t in meta["target_modules"])

    hf = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
    plain_t, plain_v = _hf_features(hf, tokens)
    assert (plain_t - ref_t).abs().max() > 1e-3  # the LoRA changes the embeddings
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    t, v = _hf_features(peft_model.base_model.model, tokens)
    assert torch.allclose(t, ref_t, atol=2e-5) and torch.allclose(v, ref_v, atol=2e-5)


def test_import_peft_lora_trained_on_clipmodel(tiny_backbone_factory, hf_dir, tmp_path):
    hf = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"], lora_dropout=0.1)
    pm = peft.get_peft_model(hf, cfg)
    _randomise([p for n, p in pm.named_parameters() if "lora_" in n], seed=3)
    pm.eval()
    model = AdaptedModel(tiny_backbone_factory(0))
    tokens = model.tokenize(CAPTIONS)
    ref_t, ref_v = _hf_features(pm.base_model.model, tokens)
    pm.save_pretrained(str(tmp_path / "peft"))

    method = model.load_adapter(tmp_path / "peft")  # today: "adapter was trained on backbone None"
    assert method.name == "lora" and method.config.r == 4 and method.config.alpha == 16
    assert method.imported_from["format"] == "peft"
    with torch.no_grad():
        t, v = model.encode_text(tokens), model.encode_image(IMAGES)
    assert torch.allclose(t, ref_t, atol=2e-5) and torch.allclose(v, ref_v, atol=2e-5)
    state = method.trainable_state(model.backbone)
    assert method.config.qkv == "q,v"
    assert "vision.0.attn.in_proj.k.lora_A" not in state and "text.1.mlp.c_fc.lora_B" in state
    assert "text.1.mlp.c_proj.lora_B" not in state
    # round trip: exporting the imported adapter gives back peft's tensors
    export_peft(model, tmp_path / "again")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    for k, v in a.items():
        assert torch.equal(b[k], v)


def test_import_refuses_what_does_not_convert(tiny_backbone_factory, tmp_path):
    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))
    from safetensors.torch import save_file

    save_file({"base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
              str(d / "adapter_model.safetensors"))
    model = AdaptedModel(tiny_backbone_factory(0))
    with pytest.raises(XModalError, match="use_dora"):
        model.load_adapter(d)
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["use_dora"] = False
    (d / "adapter_config.json").write_text(json.dumps(meta))
    save_file({"base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 96),
               "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(96, 4)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(XModalError, match="shape"):  # a peft adapter for a wider CLIP
        model.load_adapter(d)
    assert not model.methods


def test_export_refuses_other_methods(tiny_backbone_factory, tmp_path):
    model = apply_method(tiny_backbone_factory(0), make_config("cross_modal_adapter"))
    with pytest.raises(XModalError, match="only 'lora'"):
        export_peft(model, tmp_path / "x")
