"""Paper presets: every preset reproduces the budget its paper prints (on that paper's backbone,
within the stated tolerance), and presets are reachable from make_config, YAML and the CLI."""

import json

import pytest
import yaml

from xmodal.engine.config import RunConfig, load_config
from xmodal.errors import XModalError
from xmodal.methods import AdaptedModel, make_config
from xmodal.methods.presets import all_presets, get_preset, presets_of


@pytest.fixture(scope="module")
def vit_b32():
    from xmodal.backbones.factory import create_backbone

    return create_backbone("ViT-B-32", seed=0)


def test_every_paper_budget(vit_b32):
    """Within tolerance of the paper's printed number (presets.py says why where they differ)."""
    model = AdaptedModel(vit_b32)
    checked = {}
    for preset in all_presets():
        if preset.paper_count is None or preset.backbone != "ViT-B-32":
            continue
        model.add_method(make_config(preset.method, preset=preset.name), adapter_name="p")
        trainable = model.parameter_report()["trainable"]
        model.delete_method("p")
        assert abs(trainable - preset.paper_count) <= preset.tolerance, (preset, trainable)
        checked[(preset.method, preset.name)] = trainable
    assert checked == {
        ("cross_modal_adapter", "paper"): 519_168, ("cross_modal_adapter", "paper_r16"): 1_008_000,
        ("adapter_attn", "paper"): 1_982_976, ("adapter_attn", "paper_image"): 507_264,
        ("vpt", "paper"): 55_296, ("vl_prompt", "paper"): 79_872, ("maple", "paper"): 4_740_096,
        ("partial", "paper"): 10_240_256, ("msta", "paper"): 8_712_192, ("msta", "authors"): 1_744_000,
    }


def test_paper_denominators(vit_b32):
    model = AdaptedModel(vit_b32)
    model.add_method(make_config("msta", preset="paper"))
    r = model.parameter_report()
    token_table = 49408 * 512
    assert r["backbone_without_token_embedding"] == r["backbone"] - token_table
    assert r["paper_denominator"] == "backbone_without_token_embedding"
    assert r["percent_paper"] == pytest.approx(100 * 8_712_192 / (r["backbone"] - token_table))
    assert r["percent"] == pytest.approx(100 * 8_712_192 / (r["backbone"] + 8_712_192))
    model.delete_method("default")
    model.add_method(make_config("cross_modal_adapter"))
    r = model.parameter_report()
    assert r["paper_denominator"] == "backbone" and r["percent_paper"] == pytest.approx(100 * 519_168 / r["backbone"])


def test_preset_then_fields():
    cfg = make_config("adapter_attn", preset="paper", scale=2.0)
    assert (cfg.r, cfg.scale) == (64, 2.0)
    with pytest.raises(XModalError, match="no preset 'nope'.*paper"):
        make_config("adapter_attn", preset="nope")
    assert get_preset("vpt", "paper").fields == {"n_tokens": 6, "depth": "all"}
    assert set(presets_of("msta")) == {"paper", "authors"}


def test_preset_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "maple", "preset": "paper", "n_ctx": 3}}))
    cfg = load_config(path).method_config(str(path))
    assert (cfg.depth, cfg.n_ctx) == (12, 3)
    bad = RunConfig(method={"name": "maple", "preset": "video"})
    with pytest.raises(XModalError, match="maple.*no preset 'video'"):
        bad.method_config("run.yaml")


def test_cli_preset_paper(capsys):
    from xmodal.cli import main

    rc = main(["methods", "--backbone", "xmodal-test", "--preset", "paper", "--method", "vpt",
               "--method", "lora", "--json"])
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rc == 0
    assert rows["vpt"]["preset"] == "paper" and rows["vpt"]["paper_count"] == 50_000
    assert rows["vpt"]["trainable"] == 6 * 64 * 2  # 6 tokens x width 64 x 2 blocks of xmodal-test
    assert rows["lora"]["preset"] is None and rows["lora"]["paper_count"] is None
