"""`xmodal eval` (and the shared train/index paths) on real media: required weights, protocol
defaults and their precedence, provenance in metrics.json and in the printed header, image
names, missing/unreadable media, --save-sims, and adapters that remember their training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from xmodal.cli import build_parser, main
from xmodal.engine.evaluate import METRIC_KEYS
from xmodal.metrics import retrieval_metrics

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "purple": (150, 40, 180), "white": (240, 240, 240)}

#: fields the issue asks every `run` object to carry
RUN_FIELDS = ("xmodal_version", "backbone", "pretrained", "weights_sha256", "activation", "adapter", "adapter_sha256",
              "method", "head", "num_frames", "max_words", "dataset", "split", "num_queries", "num_gallery",
              "missing_media", "partial", "tie_policy", "ties_with_ground_truth", "frame_cache", "device", "precision")


def _images(root: Path, names=COLORS, missing=(), broken=()) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        if name in broken:
            (root / f"{name}.png").write_bytes(b"not a png at all")
        elif name not in missing:
            Image.new("RGB", (40, 36), COLORS[name]).save(root / f"{name}.png")
        rows.append({"image": f"{name}.png", "captions": [f"a {name} picture", f"plain {name} colour"]})
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("images"))


def _eval(root, out, *extra):
    return main(["eval", "--dataset", "jsonl", "--root", str(root), "--backbone", "xmodal-test",
                 "--out", str(out), "--batch-size", "6", "--num-workers", "0", "--device", "cpu", *extra])


# ---------------------------------------------------------------------------- weights
def test_backbone_without_weights_is_an_error(images, tmp_path, capsys):
    assert _eval(images, tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "xmodal-test has no weights" in err and "--pretrained" in err
    assert "random" in err and "OpenCLIP tag" in err and "xmodal-tiny" in err
    assert not (tmp_path / "e").exists()

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "jsonl", "root": str(images)},
                                   "model": {"backbone": "xmodal-test"}, "method": {"name": "lora"}}))
    assert main(["eval", "--config", str(cfg), "--out", str(tmp_path / "e")]) == 2
    assert "model.pretrained" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and "model.pretrained" in err and not (tmp_path / "run").exists()
    # `xmodal index` shares the check (add_model_data_args + the same config resolution)
    assert main(["index", "--dataset", "jsonl", "--root", str(images), "--backbone", "xmodal-test",
                 "--out", str(tmp_path / "idx")]) == 2
    assert "has no weights" in capsys.readouterr().err


def test_random_weights_must_be_asked_for_and_are_announced(images, tmp_path, capsys):
    assert _eval(images, tmp_path / "e", "--pretrained", "random") == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "RANDOM WEIGHTS" in header and "zero-shot" in header
    run = json.loads((tmp_path / "e/metrics.json").read_text())["run"]
    assert run["pretrained"] == "random" and run["weights_sha256"] is None


def test_packaged_tiny_defaults_to_its_weights(images, tmp_path, capsys):
    from xmodal.backbones.weights import EMBEDDED
    from xmodal.provenance import file_sha256

    assert main(["eval", "--dataset", "jsonl", "--root", str(images), "--backbone", "xmodal-tiny",
                 "--num-frames", "1", "--out", str(tmp_path / "e"), "--device", "cpu", "--num-workers", "0"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "weights xmodal, packaged default of xmodal-tiny" in header
    run = json.loads((tmp_path / "e/metrics.json").read_text())["run"]
    assert run["pretrained"] == "xmodal"
    assert run["weights_sha256"] == file_sha256(EMBEDDED["xmodal-tiny"]) and len(run["weights_sha256"]) == 64


# ------------------------------------------------------------------------- provenance
def test_metrics_json_carries_the_run_and_image_names(images, tmp_path, capsys):
    assert _eval(images, tmp_path / "e", "--pretrained", "random", "--pooling", "mean") == 0
    lines = capsys.readouterr().out.splitlines()
    header, table = lines[0], lines[1:4]
    assert "12 texts x 6 images" in header and "ties mean" in header and "mean pooling" in header
    assert [row.split()[0] for row in table[1:]] == ["t2i", "i2t"] and "R@Sum" in table[0]
    data = json.loads((tmp_path / "e/metrics.json").read_text())
    run = data["run"]
    for name in RUN_FIELDS:
        assert name in run, name
    assert run["dataset"] == "jsonl" and run["split"] == "test" and run["gallery_kind"] == "image"
    assert run["num_queries"] == {"t2v": 12, "v2t": 6} and run["num_gallery"] == 6
    assert run["partial"] is False and run["missing_media"] == 0 and run["tie_policy"] == "mean"
    assert set(run["ties_with_ground_truth"]) == {"t2v", "v2t"}
    assert run["head"]["pooling"] == "mean" and run["method"] == {"name": "zero_shot", "config": {}}
    assert run["settings_source"]["head.pooling"] == "flag" and run["settings_source"]["data.num_frames"] == "protocol"
    assert run["device"] == "cpu" and run["precision"] == "fp32" and run["frame_cache"] is None
    for key in METRIC_KEYS:  # t2v/v2t keys stay; image names are added beside them
        image_key = key.replace("t2v/", "t2i/").replace("v2t/", "i2t/")
        assert data[image_key] == data[key]


def test_save_sims_reproduces_the_metrics(images, tmp_path, capsys):
    assert _eval(images, tmp_path / "e", "--pretrained", "random", "--save-sims", "--ties", "pessimistic") == 0
    out = tmp_path / "e"
    sims = np.load(out / "sims.npy")
    ids = json.loads((out / "sims_ids.json").read_text())
    ranks = json.loads((out / "ranks.json").read_text())
    assert sims.shape == (12, 6) and len(ids["rows"]) == 12 and ids["columns"] == [f"{c}.png" for c in COLORS]
    gt = [ids["columns"].index(r["item_id"]) for r in ids["rows"]]
    again = retrieval_metrics(sims, gt, ties="pessimistic")
    saved = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert saved[key] == pytest.approx(again[key], abs=1e-4), key
    assert ranks["tie_policy"] == "pessimistic" and len(ranks["t2v"]) == 12 and len(ranks["v2t"]) == 6
    assert np.mean(np.array(ranks["t2v"]) <= 1) * 100 == pytest.approx(saved["t2v/R@1"])


# -------------------------------------------------------------- missing / unreadable
def test_missing_media_is_an_error_unless_allowed(tmp_path, capsys):
    root = _images(tmp_path / "data", missing=("blue",))
    assert _eval(root, tmp_path / "e", "--pretrained", "random") == 2
    err = capsys.readouterr().err
    assert "1 of 6" in err and "blue.png" in err and "--allow-missing" in err
    assert _eval(root, tmp_path / "e", "--pretrained", "random", "--allow-missing") == 0
    assert "PARTIAL" in capsys.readouterr().out.splitlines()[0]
    run = json.loads((tmp_path / "e/metrics.json").read_text())["run"]
    assert run["partial"] is True and run["missing_media"] == 1 and run["num_gallery"] == 5
    assert run["num_queries"] == {"t2v": 10, "v2t": 5}


def test_unreadable_media_never_enters_the_gallery(tmp_path, capsys):
    root = _images(tmp_path / "data", broken=("green",))
    assert _eval(root, tmp_path / "e", "--pretrained", "random") == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "green.png" in err and "--allow-missing" in err
    assert _eval(root, tmp_path / "e", "--pretrained", "random", "--allow-missing", "--save-sims") == 0
    run = json.loads((tmp_path / "e/metrics.json").read_text())["run"]
    assert run["partial"] is True and run["unreadable_media"] == 1 and run["num_gallery"] == 5
    assert run["num_queries"]["t2v"] == 10  # the unreadable item's captions left with it
    ids = json.loads((tmp_path / "e/sims_ids.json").read_text())
    assert "green.png" not in ids["columns"] and np.load(tmp_path / "e/sims.npy").shape == (10, 5)


# ----------------------------------------------------------- protocol defaults / adapter
def _settings(*argv):
    from xmodal.cli.eval import resolve_settings

    args = build_parser().parse_args(["eval", *argv])
    return resolve_settings(args)


def test_protocol_defaults_and_precedence(tmp_path):
    cfg, s = _settings("--dataset", "didemo", "--root", str(tmp_path), "--backbone", "xmodal-test",
                       "--pretrained", "random")
    assert (cfg.data.num_frames, cfg.data.max_words) == (64, 64)
    assert s.source["data.num_frames"] == s.source["data.max_words"] == "protocol"
    cfg, s = _settings("--dataset", "activitynet", "--root", str(tmp_path), "--backbone", "xmodal-test",
                       "--pretrained", "random", "--num-frames", "8")
    assert cfg.data.num_frames == 8 and s.source["data.num_frames"] == "flag"
    assert cfg.data.max_words == 64 and cfg.data.eval_split == "val_1"


def _saved_adapter(tmp_path, training):
    from xmodal.backbones.factory import create_backbone
    from xmodal.methods import apply_method, make_config
    from xmodal.methods.checkpoint import save_adapter

    model = apply_method(create_backbone("xmodal-test", None, seed=0), make_config("lora", r=2))
    directory = tmp_path / "adapter"
    save_adapter(model, directory, training=training)
    return directory


def test_adapter_settings_are_reused_and_weights_checked(images, tmp_path, capsys):
    record = {"pretrained": "random", "weights_sha256": None, "head": {"pooling": "mean", "temperature": 2.0,
                                                                        "normalize": False},
              "num_frames": 3, "max_words": 20, "dataset": "jsonl", "train_split": "train", "eval_split": "test"}
    adapter = _saved_adapter(tmp_path, record)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["training"] == record
    # flag > adapter > protocol
    cfg, s = _settings("--dataset", "didemo", "--root", str(tmp_path), "--adapter", str(adapter),
                       "--max-words", "40")
    assert cfg.model.backbone == "xmodal-test" and cfg.model.pretrained == "random"
    assert (cfg.data.num_frames, s.source["data.num_frames"]) == (3, "adapter")
    assert (cfg.data.max_words, s.source["data.max_words"]) == (40, "flag")
    assert (cfg.head.pooling, cfg.head.temperature) == ("mean", 2.0) and s.source["head.pooling"] == "adapter"

    assert _eval(images, tmp_path / "e", "--adapter", str(adapter)) == 0
    run = json.loads((tmp_path / "e/metrics.json").read_text())["run"]
    assert run["method"]["name"] == "lora" and run["adapter_sha256"] and run["num_frames"] == 3
    assert run["adapter_training"] == record and run["adapter_weights_mismatch"] is None
    capsys.readouterr()

    # an adapter trained on other weights is refused, or loaded loudly with --force
    other = _saved_adapter(tmp_path / "other", {**record, "pretrained": "openai", "weights_sha256": "ab" * 32})
    assert _eval(images, tmp_path / "e2", "--adapter", str(other), "--pretrained", "random") == 2
    err = capsys.readouterr().err
    assert "trained on backbone weights 'openai'" in err and "--force" in err and not (tmp_path / "e2").exists()
    assert _eval(images, tmp_path / "e2", "--adapter", str(other), "--pretrained", "random", "--force") == 0
    assert "WARNING" in capsys.readouterr().err
    run = json.loads((tmp_path / "e2/metrics.json").read_text())["run"]
    assert "loaded anyway (--force)" in run["adapter_weights_mismatch"]


def test_train_cli_follows_the_protocol_and_records_training(tmp_path, capsys, monkeypatch):
    """`xmodal train` resolves weights/protocol like eval, and hands the settings to fit()."""
    from xmodal.cli import train as train_cli

    seen = {}

    class Done(Exception):
        pass

    def fake_fit(cfg, *a, **k):
        seen["cfg"] = cfg
        raise Done

    monkeypatch.setattr("xmodal.engine.train.fit", fake_fit)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "didemo", "root": str(tmp_path)},
                                   "model": {"backbone": "xmodal-tiny"}, "method": {"name": "lora"}}))
    with pytest.raises(Done):
        train_cli.run(argparse.Namespace(config=str(cfg), overrides=["data.max_words=48"], set_overrides=[],
                                         out=None, resume=False, stop_after_epochs=None))
    got = seen["cfg"]
    assert got.model.pretrained == "xmodal" and got.data.num_frames == 64 and got.data.max_words == 48
    out = capsys.readouterr().out
    assert "packaged default" in out and "data.num_frames=64 (didemo protocol default" in out
