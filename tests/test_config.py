from pathlib import Path

import pytest
import yaml

from xmodal.engine.config import RunConfig, apply_overrides, dump_config, load_config, parse_override
from xmodal.errors import XModalError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    method = cfg.method_config(str(path))  # the method's own fields are checked by its config class
    assert method.method == cfg.method["name"]
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_paper_settings():
    m = load_config(CONFIGS / "msrvtt_cross_modal_adapter_vitb32.yaml")
    assert (m.train.lr, m.train.batch_size, m.train.epochs) == (1e-5, 128, 5)
    assert (m.data.num_frames, m.data.max_words, m.model.backbone) == (12, 32, "ViT-B-32")
    assert (m.method["r"], m.method["d_s"], m.train.weight_decay, m.train.warmup_ratio) == (8, 16, 0.2, 0.1)
    assert m.head.pooling == "text_conditioned" and m.head.normalize is False
    a = load_config(CONFIGS / "activitynet_cross_modal_adapter_vitb32.yaml")
    assert a.method["r"] == 16 and a.data.num_frames == 64
    for name in ("coco", "flickr30k"):
        c = load_config(CONFIGS / f"{name}_cross_modal_adapter_vitb32.yaml")
        assert (c.train.lr, c.train.batch_size, c.data.num_frames) == (1e-3, 256, 1)
    for name in ("msvd", "didemo", "lsmdc"):
        assert load_config(CONFIGS / f"{name}_cross_modal_adapter_vitb32.yaml").data.dataset == name
    from xmodal.cli.demo import DEMO_CONFIG

    s = load_config(DEMO_CONFIG)  # packaged with xmodal: the embedded default
    assert (s.model.backbone, s.model.pretrained, s.data.dataset) == ("xmodal-tiny", "xmodal", "jsonl")


def test_overrides_are_dotted_and_yaml_typed():
    cfg = load_config(CONFIGS / "msrvtt_cross_modal_adapter_vitb32.yaml",
                      ["train.lr=1e-4", "method.r=16", "train.progress=false", "data.options={fps: 2}",
                       "model.pretrained=null", "train.betas=[0.9, 0.999]", "output_dir=/tmp/x"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.method["r"] == 16 and cfg.method["d_s"] == 16
    assert cfg.train.progress is False and cfg.data.options == {"fps": 2}
    assert cfg.model.pretrained is None and cfg.train.betas == [0.9, 0.999] and cfg.output_dir == "/tmp/x"
    assert parse_override("a.b= 3") == ("a.b", 3)
    assert apply_overrides({"x": {"y": 1}}, ["x.z=two"]) == {"x": {"y": 1, "z": "two"}}
    with pytest.raises(XModalError, match="key=value"):
        parse_override("train.lr")


def test_unknown_keys_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lrr": 1.0}}))
    with pytest.raises(XModalError, match=r"bad\.yaml.*train\.lrr"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"trainer": {}}))
    with pytest.raises(XModalError, match=r"bad\.yaml.*'trainer'"):
        load_config(bad)
    good = CONFIGS / "msrvtt_cross_modal_adapter_vitb32.yaml"
    expected = r"train\.epoch=3.*msrvtt_cross_modal_adapter_vitb32\.yaml.*unknown key 'train\.epoch'"
    with pytest.raises(XModalError, match=expected):
        load_config(good, ["train.epoch=3"])
    cfg = load_config(good, ["method.rank=3"])  # method fields belong to the method's config class
    with pytest.raises(XModalError, match="rank"):
        cfg.method_config(str(good))


def test_wrong_types_and_ranges_are_rejected(tmp_path):
    good = CONFIGS / "msrvtt_cross_modal_adapter_vitb32.yaml"
    with pytest.raises(XModalError, match=r"train\.epochs.*integer"):
        load_config(good, ["train.epochs=two"])
    with pytest.raises(XModalError, match=r"train\.progress.*true/false"):
        load_config(good, ["train.progress=3"])
    with pytest.raises(XModalError, match="not divisible"):
        load_config(good, ["train.grad_accum=3"])
    with pytest.raises(XModalError, match="pooling"):
        load_config(good, ["head.pooling=max"])
    with pytest.raises(XModalError, match="best_metric"):
        load_config(good, ["train.best_metric=accuracy"])
    with pytest.raises(XModalError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    s = tmp_path / "s.yaml"
    s.write_text("train:\n  lr: 1e-5\n")  # YAML 1.1 reads this as a string; still a number here
    assert load_config(s).train.lr == 1e-5


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(CONFIGS / "didemo_cross_modal_adapter_vitb32.yaml", ["train.seed=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, RunConfig)
    assert not list(tmp_path.glob(".config.yaml*"))  # no temporary file left behind


@pytest.mark.parametrize("override,message", [
    ("data.num_workers=-1", r"data\.num_workers=-1: expected >= 0"),
    ("data.fps=0", r"data\.fps=0\.0: expected a frame rate > 0"),
    ("train.log_every=0", r"train\.log_every must be >= 1"),
    ("train.save_every_steps=-2", r"train\.save_every_steps must be >= 0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, override, message):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": {"root": "/data"}}))
    with pytest.raises(XModalError, match=message) as info:
        load_config(good, [override])
    assert "good.yaml" in str(info.value) and "\n" not in str(info.value)


def test_an_empty_config_file_says_data_root_is_unset(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(XModalError, match=r"empty\.yaml: the config file is empty, so data\.root is unset"):
        load_config(empty)
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(XModalError, match="data.root is unset"):
        load_config(empty)
    assert load_config(empty, ["data.root=/data"]).data.root == "/data"  # an override may supply it
    cfg = load_config(empty, ["data.root=/data", "train.save_every_steps=100"])
    assert cfg.train.save_every_steps == 100
