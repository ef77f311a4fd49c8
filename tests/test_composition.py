"""Several methods at once on different towers (MV-Adapter's baseline pairs): one config, one
adapter checkpoint, the composed count is the sum of the parts', save/load is bit-exact."""

import pytest
import torch

from xmodal.engine.config import RunConfig
from xmodal.errors import XModalError
from xmodal.methods import AdaptedModel, apply_method, make_config

VIDEO = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PAIRS = [
    [{"name": "st_adapter"}, {"name": "adaptformer", "towers": ["text"]}],
    [{"name": "convpass"}, {"name": "adaptformer", "towers": "text"}],
    [{"name": "adaptformer", "towers": ["vision"]}, {"name": "adaptformer", "towers": ["text"], "r": 16}],
]


def _count(backbone, config):
    model = apply_method(backbone, config)
    trainable = model.parameter_counts()[0]
    model.delete_method("default")
    return trainable


@pytest.mark.parametrize("parts", PAIRS, ids=["st+adaptmlp", "convpass+adaptmlp", "adaptformer+adaptmlp"])
def test_count_is_the_sum_and_towers_are_respected(tiny_backbone, parts):
    composed = make_config("compose", methods=parts)
    singles = composed.part_configs()
    assert _count(tiny_backbone, composed) == sum(_count(tiny_backbone, c) for c in singles)
    text_part = singles[1]
    assert text_part.method == "adaptformer" and text_part.modalities == "text"


def test_one_checkpoint_round_trip_bit_exact(tiny_backbone_factory, tmp_path):
    config = make_config("compose", methods=PAIRS[0])
    model = apply_method(tiny_backbone_factory(0), config)
    assert model.method.identity_at_init
    torch.manual_seed(3)
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    tokens = model.tokenize(["a red circle moves left"])
    with torch.no_grad():
        v, t = model.encode_video(VIDEO), model.encode_text(tokens)
    model.save_adapter(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = AdaptedModel(tiny_backbone_factory(0))
    method = fresh.load_adapter(tmp_path / "ad")
    assert [p.name for p in method.parts] == ["st_adapter", "adaptformer"]
    with torch.no_grad():
        assert torch.equal(fresh.encode_video(VIDEO), v) and torch.equal(fresh.encode_text(tokens), t)
    state = method.trainable_state(fresh.backbone)
    assert any(k.startswith("parts.0.") for k in state) and any(k.startswith("parts.1.text.") for k in state)
    fresh.set_active(None)  # detaching every part restores the frozen backbone
    with torch.no_grad():
        assert torch.equal(fresh.encode_video(VIDEO), tiny_backbone_factory(0).encode_video(VIDEO))


def test_from_run_config():
    cfg = RunConfig(method={"name": "compose", "methods": [{"name": "st_adapter"},
                                                           {"name": "adaptformer", "towers": ["text"], "preset": None}]})
    composed = cfg.method_config("run.yaml")
    assert [d["method"] for d in composed.methods] == ["st_adapter", "adaptformer"]
    assert composed.methods[1]["modalities"] == "text"


def test_refusals(tiny_backbone):
    with pytest.raises(XModalError, match="compose cannot contain compose"):
        make_config("compose", methods=[{"name": "compose"}])
    with pytest.raises(XModalError, match="fixed tower"):
        make_config("compose", methods=[{"name": "vpt", "towers": ["text"]}])
    with pytest.raises(XModalError, match="missing 'name'"):
        make_config("compose", methods=[{"towers": ["text"]}])
    with pytest.raises(XModalError, match="at most one"):
        apply_method(tiny_backbone, make_config("compose", methods=[{"name": "coop"}, {"name": "vl_prompt"}]))
