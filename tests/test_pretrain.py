"""`xmodal pretrain`: the loss goes down, the release file loads, resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xmodal.cli import main
from xmodal.errors import CheckpointMismatchError, DataError, XModalError
from xmodal.pretrain import (
    PretrainConfig, encode_text_trimmed, load_corpus, lr_at, pretrain, retrieval_metrics, trim_tokens,
)
from xmodal.synth import write_image_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_image_corpus(out, n=56, n_test=24, seed=1, progress=False)  # 32 train, 24 held out
    return out


def _cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), arch="xmodal-test", steps=8, batch=16, lr=1e-3, warmup=2,
                log_every=2, save_every=4, seed=0, threads=1)
    base.update(kw)
    return PretrainConfig(**base)


def _quiet(_line: str) -> None:
    pass


# ---------------------------------------------------------------------------- pieces
def test_trimmed_text_encoding_equals_open_clip(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a small red circle on the left", "a large blue striped star at the top right"])
    short = trim_tokens(tokens)
    assert short.shape[1] < tokens.shape[1] and (tokens[:, short.shape[1]:] == 0).all()
    with torch.no_grad():
        full = tiny_backbone.clip.encode_text(tokens)
        trimmed = encode_text_trimmed(tiny_backbone.clip, short)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)


def test_retrieval_metrics_ranks():
    sim = torch.eye(4)
    m = retrieval_metrics(sim, torch.arange(4))
    assert m["t2v/R@1"] == 100.0 and m["v2t/R@1"] == 100.0 and m["t2v/MdR"] == 1.0
    m = retrieval_metrics(torch.ones(4, 4), torch.arange(4))  # a constant model scores chance, as in eval
    assert m["t2v/R@1"] == 25.0 and m["t2v/MnR"] == 2.5 and m["t2v/tied_queries"] == 4


def test_retrieval_metrics_with_several_captions_per_image():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.6]])  # 4 captions x 2 images
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1, 1]))
    # caption ranks: t0 -> 1, t1 (0.2 < 0.8) -> 2, t2 (0.3 < 0.7) -> 2, t3 -> 1
    assert m["t2v/R@1"] == 50.0 and m["t2v/MnR"] == 1.5 and m["t2v/R@5"] == 100.0
    # image 0: its best caption t0 ranks first; image 1: its best (t3, 0.6) is beaten by t1 (0.8)
    assert m["v2t/R@1"] == 50.0 and m["v2t/MnR"] == 1.5


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = PretrainConfig(data="d", out="o", steps=100, warmup=10, lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_load_corpus_errors_name_the_file(tmp_path, corpus):
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "x", "image": "missing.png", "captions": ["a"]}) + "\n")
    with pytest.raises(DataError, match="missing.png"):
        load_corpus(tmp_path, "train", 32)
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "x", "image": "missing.png"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: 'captions'"):
        load_corpus(tmp_path, "train", 32)
    c = load_corpus(corpus, "test", 32)
    assert c.images.shape == (24, 3, 32, 32) and c.images.dtype == torch.uint8 and len(c.captions) == 24


# ----------------------------------------------------------------------------- runs
def test_pretrain_learns_and_writes_a_loadable_fp16_model(corpus, tmp_path, tiny_backbone_factory):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(corpus), "--out", str(out), "--arch", "xmodal-test", "--steps", "60",
                 "--batch", "32", "--lr", "2e-3", "--warmup", "5", "--threads", "1", "--no-augment",
                 "--log-every", "10", "--save-every", "30"])
    assert code == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] > math.log(32) - 0.2  # starts near chance for a batch of 32
    assert losses[-1] < 0.5 * math.log(32)  # and learns to match its training pairs

    path = out / "model.safetensors"
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "xmodal-test" and meta["steps"] == "60"
    fresh = tiny_backbone_factory(123)
    assert set(state) == set(fresh.clip.state_dict())
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    fresh.clip.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    try:  # the project's loader, once it exists, must accept the file too
        import xmodal.backbones.weights  # noqa: F401
    except ImportError:
        pass
    else:
        from xmodal.backbones.factory import create_backbone

        loaded = create_backbone("xmodal-test", pretrained=str(path))
        torch.testing.assert_close(loaded.clip.logit_scale.detach(), state["logit_scale"].float())

    summary = json.loads((out / "pretrain_summary.json").read_text())
    zs = summary["zero_shot"]
    assert summary["finished"] and zs["items"] == 24 and zs["chance/R@1"] == pytest.approx(100 / 24)
    assert {"t2v/R@1", "v2t/R@1", "t2v/MdR"} <= set(zs)
    card = (out / "MODEL_CARD.md").read_text()
    assert summary["command"] in card and summary["command"].startswith("xmodal pretrain --data")
    assert "--steps 60" in card and "seed 0" in card and f"{zs['t2v/R@1']:.1f}" in card
    assert "xmodal synth images" in card  # the data's own generation command


def test_resume_reproduces_an_uninterrupted_run(corpus, tmp_path):
    straight = pretrain(_cfg(corpus, tmp_path / "a"), echo=_quiet)
    first = pretrain(_cfg(corpus, tmp_path / "b", stop_after=4), echo=_quiet)
    assert first == {"finished": False, "step": 4}
    assert not (tmp_path / "b/model.safetensors").exists()
    resumed = pretrain(_cfg(corpus, tmp_path / "b", resume=True), echo=_quiet)
    assert resumed["finished"] and len(resumed["sessions"]) == 2 and resumed["sessions"][1]["start_step"] == 4
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in resumed["history"] if "loss" in r] == [2, 4, 6, 8]
    assert straight["zero_shot"] == resumed["zero_shot"]


def test_resume_refuses_changed_settings_and_overwrite(corpus, tmp_path):
    pretrain(_cfg(corpus, tmp_path, stop_after=2, steps=4, save_every=2), echo=_quiet)
    with pytest.raises(CheckpointMismatchError, match="lr"):
        pretrain(_cfg(corpus, tmp_path, steps=4, lr=5e-4, resume=True), echo=_quiet)
    with pytest.raises(XModalError, match="--resume"):
        pretrain(_cfg(corpus, tmp_path, steps=4), echo=_quiet)
    with pytest.raises(XModalError, match="--batch 64"):
        pretrain(_cfg(corpus, tmp_path / "other", batch=64), echo=_quiet)
