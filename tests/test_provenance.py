"""Provenance: file hashes, weights/adapter records, the one-line header, and adapters that
remember (and check) the backbone weights they were trained on."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import pytest

from xmodal.engine.config import RunConfig
from xmodal.errors import CheckpointMismatchError
from xmodal.provenance import (
    describe_run, file_sha256, head_record, run_record, training_record, weights_record,
)

RUN_FIELDS = ("xmodal_version", "backbone", "pretrained", "weights_sha256", "activation", "adapter", "adapter_sha256",
              "method", "head", "num_frames", "max_words", "dataset", "split", "num_queries", "num_gallery",
              "missing_media", "partial", "tie_policy", "ties_with_ground_truth", "frame_cache", "device", "precision")


def test_file_sha256_is_the_content_hash_and_follows_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    f.write_bytes(b"other bytes")
    os.utime(f, ns=(1, 1))  # even with an old mtime, the size changed: no stale cache hit
    assert file_sha256(f) == hashlib.sha256(b"other bytes").hexdigest()


def test_weights_record_hashes_the_packaged_file_when_the_backbone_does_not_say():
    from xmodal.backbones.weights import EMBEDDED

    bare = SimpleNamespace(name="xmodal-tiny", clip=SimpleNamespace(modules=lambda: []))
    rec = weights_record(bare, "xmodal")
    assert rec["pretrained"] == "xmodal"
    assert rec["weights_sha256"] == hashlib.sha256(EMBEDDED["xmodal-tiny"].read_bytes()).hexdigest()
    assert weights_record(bare, None)["pretrained"] == "random" and weights_record(bare, None)["weights_sha256"] is None
    info = {"pretrained": "openai", "weights_sha256": "f" * 64, "weights_path": "/w", "activation": "quick_gelu",
            "format": "openai"}
    told = SimpleNamespace(name="x", weights_info=info)
    assert weights_record(told, "ignored") == told.weights_info


def _run(**over):
    base = dict(backbone="ViT-B-32", weights={"pretrained": "openai", "weights_sha256": "ab" * 32,
                                              "activation": "quick_gelu"},
                method={"name": "zero_shot", "config": {}}, head={"pooling": "mean", "temperature": 5.0},
                num_frames=12, max_words=32, dataset="coco", split="test", num_queries={"t2v": 25000, "v2t": 5000},
                num_gallery=5000, tie_policy="mean", ties_with_ground_truth={"t2v": 3, "v2t": 0},
                device="cuda:0", precision="bf16-autocast", gallery_kind="image", num_items_requested=5000)
    base.update(over)
    return run_record(**base)


def test_run_record_has_every_field_and_the_header_says_the_same():
    run = _run()
    for name in RUN_FIELDS:
        assert name in run, name
    json.dumps(run, allow_nan=False)  # plain JSON
    line = describe_run(run)
    assert "\n" not in line
    for part in ("ViT-B-32 weights openai", "sha256 abababababab", "zero-shot", "mean pooling",
                 "coco test: 25000 texts x 5000 images", "ties mean (3 t2i / 0 i2t", "cuda:0 bf16-autocast"):
        assert part in line, part
    assert "PARTIAL" not in line and "RANDOM" not in line

    partial = describe_run(_run(missing_media=2, unreadable_media=1, gallery_kind="video"))
    assert "PARTIAL: 3 of 5000 items" in partial and "videos" in partial and "t2v" in partial
    assert _run(missing_media=2)["partial"] is True and _run()["partial"] is False
    rand = describe_run(_run(weights={"pretrained": "random", "weights_sha256": None}))
    assert "RANDOM WEIGHTS" in rand


def test_training_record_of_a_config():
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.num_frames, cfg.data.max_words = "didemo", 64, 64
    cfg.head.pooling = "mean"
    rec = training_record(cfg, {"pretrained": "openai", "weights_sha256": "cd" * 32, "activation": "quick_gelu"})
    assert rec == {"pretrained": "openai", "weights_sha256": "cd" * 32, "activation": "quick_gelu",
                   "head": head_record(cfg.head), "num_frames": 64, "max_words": 64, "dataset": "didemo",
                   "train_split": "train", "eval_split": "test"}


def test_adapter_checkpoint_keeps_and_checks_its_training(tiny_backbone_factory, tmp_path, capsys):
    from xmodal.methods import AdaptedModel, apply_method, make_config
    from xmodal.methods.checkpoint import load_adapter

    model = apply_method(tiny_backbone_factory(0), make_config("lora", r=2))
    record = {"pretrained": "openai", "weights_sha256": "ab" * 32, "num_frames": 8}
    model.training_record = record  # what fit() sets
    model.save_adapter(tmp_path / "a")
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["training"] == record

    same = {"pretrained": "openai", "weights_sha256": "ab" * 32}
    other = {"pretrained": "laion", "weights_sha256": "cd" * 32}
    load_adapter(AdaptedModel(tiny_backbone_factory(0)), tmp_path / "a", weights=same)
    with pytest.raises(CheckpointMismatchError, match=r"trained on backbone weights 'openai' \(sha256 abababababab\)"
                                                      r".*'laion' \(sha256 cdcdcdcdcdcd\).*--force"):
        load_adapter(AdaptedModel(tiny_backbone_factory(0)), tmp_path / "a", weights=other)
    # the backbone's own record (random weights here) is the default: also a mismatch
    with pytest.raises(CheckpointMismatchError, match="'random'"):
        AdaptedModel(tiny_backbone_factory(0)).load_adapter(tmp_path / "a")
    method = load_adapter(AdaptedModel(tiny_backbone_factory(0)), tmp_path / "a", weights=other, force=True)
    assert "loaded anyway (--force)" in method.weights_warning
    assert "WARNING" in capsys.readouterr().err

    # an adapter saved without a record (older xmodal) still loads; nothing to compare
    legacy = apply_method(tiny_backbone_factory(0), make_config("lora", r=2))
    legacy.save_adapter(tmp_path / "legacy")
    assert "training" not in json.loads((tmp_path / "legacy/adapter_config.json").read_text())
    loaded = load_adapter(AdaptedModel(tiny_backbone_factory(0)), tmp_path / "legacy", weights=other)
    assert loaded.weights_warning is None
