"""Experiment trackers: W&B offline (no network) receives the scalars, the provenance and the final metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmodal.engine.trackers import WandbTracker, build_trackers, check_wandb_config
from xmodal.errors import XModalError


def _run_file(root: Path, needle: bytes, timeout: float = 30.0) -> bytes:
    """The offline run file, once the W&B service has flushed it (it writes asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        files = list(root.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        blob = files[0].read_bytes() if files else b""
        if needle in blob or time.monotonic() > deadline:
            return blob
        time.sleep(0.2)


def test_wandb_offline_records_scalars_provenance_and_final_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = WandbTracker({"project": "xmodal-test", "run_name": "unit"}, tmp_path, config={"lr": 0.001})
    tracker.set_provenance({"backbone": "xmodal-test", "weights_sha256": "abc123feed"})
    tracker.log({"kind": "step", "epoch": 1, "step": 1, "loss": 0.75, "lr": 0.001})
    tracker.log({"kind": "epoch", "epoch": 1, "step": 1, "t2v/R@1": 12.5})
    tracker.finish({"t2v/R@1": 12.5, "v2t/R@1": 10.0})
    blob = _run_file(tmp_path, b"v2t/R@1")      # offline: everything stays in the run file, nothing was sent
    for needle in (b"train/loss", b"eval/t2v/R@1", b"abc123feed", b"v2t/R@1", b"xmodal-test"):
        assert needle in blob, needle


@pytest.mark.parametrize("cfg, msg", [
    ({"run_name": "x"}, "train.wandb.project: required"),
    ({"project": "p", "mode": "cloud"}, "train.wandb.mode: expected one of"),
    ({"project": "p", "prject": "q"}, "unknown key(s) ['prject']"),
    ("p", "expected a mapping"),
])
def test_wandb_config_errors_are_one_line(cfg, msg):
    with pytest.raises(XModalError) as e:
        check_wandb_config(cfg)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_no_trackers_when_nothing_asked(tmp_path):
    assert build_trackers(tmp_path, tensorboard=False, wandb_cfg=None) == []
    assert check_wandb_config({"project": "p"})["mode"] == "offline"


def test_train_logs_to_wandb_offline(tmp_path, monkeypatch):
    """`train.wandb` in a run config: the same scalars as metrics.csv, the run's provenance, the final metrics."""
    pytest.importorskip("wandb")
    import yaml

    from test_train_engine import make_own_data
    from xmodal.cli import main

    monkeypatch.delenv("WANDB_MODE", raising=False)
    data = make_own_data(tmp_path)
    cfg = {
        "data": {"dataset": "jsonl", "root": str(data), "num_frames": 2, "max_words": 16, "num_workers": 0},
        "model": {"backbone": "xmodal-test", "pretrained": "random"},
        "method": {"name": "cross_modal_adapter", "r": 4, "d_s": 8},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "progress": False, "log_every": 1,
                  "tensorboard": False, "wandb": {"project": "xmodal-ci", "run_name": "tiny",
                                                  "dir": str(tmp_path / "wb")}},
        "eval": {"batch_size": 4},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    blob = _run_file(tmp_path / "wb", b"weights_sha256")
    for needle in (b"train/loss", b"eval/t2v/R@1", b"weights_sha256", b"xmodal-test", b"tie_policy"):
        assert needle in blob, needle
