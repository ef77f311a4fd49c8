"""End-to-end training on real media through the real data pipeline (own-data JSONL with
PyAV-written videos and PIL images), exact resume, and DDP (2 gloo processes) equivalence."""

import csv
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tolerances import decimal_rounding, layout_tolerance
from xmodal.cli import main
from xmodal.engine.config import load_config
from xmodal.engine.evaluate import METRIC_KEYS
from xmodal.errors import XModalError

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "purple": (150, 40, 180), "white": (240, 240, 240), "black": (15, 15, 15), "orange": (240, 140, 20)}


def _write_video(path, rgb, frames=4, fps=2):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            a = np.zeros((32, 32, 3), np.uint8)
            a[:] = rgb
            a[(i * 7) % 26:(i * 7) % 26 + 6] = 255 - np.array(rgb, np.uint8)  # a moving bar
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_own_data(root):
    """8 items (6 videos, 2 images), two captions each, as train.jsonl / test.jsonl under `root`."""
    from PIL import Image

    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        if i % 4 == 3:
            Image.new("RGB", (40, 36), rgb).save(root / f"{name}.png")
            rows.append({"image": f"{name}.png", "captions": [f"a {name} picture", f"plain {name} colour"]})
        else:
            _write_video(root / f"{name}.mp4", rgb)
            rows.append({"video": f"{name}.mp4", "captions": [f"a {name} video with a bar", f"{name} clip"]})
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    return make_own_data(tmp_path_factory.mktemp("own"))


def _config_file(tmp_path, own_data, **train):
    train = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", "progress": False, "seed": 7, **train}
    cfg = {
        "data": {"dataset": "jsonl", "root": str(own_data), "num_frames": 3, "max_words": 16, "num_workers": 0},
        "model": {"backbone": "xmodal-test", "pretrained": "random"},
        # "normal" init: the adapter is not the identity, so every update changes the scores;
        # dropout makes the RNG state part of what resume must restore
        "method": {"name": "cross_modal_adapter", "r": 4, "d_s": 8, "init": "normal", "dropout": 0.1},
        "train": train,
        "eval": {"batch_size": 3},
    }
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run, kind):
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == kind]


def _losses(run):
    return np.array([float(r["loss"]) for r in _rows(run, "step")])


def test_train_eval_plot_end_to_end(tmp_path, own_data, capsys):
    cfg = _config_file(tmp_path, own_data, tensorboard=True)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "train.eval_every=1"]) == 0
    for name in ("config.yaml", "metrics.csv", "metrics.json", "best/adapter_model.safetensors",
                 "best/metrics.json", "last/adapter_config.json", "last/optimizer.safetensors", "last/rng.json",
                 "last/trainer_state.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    steps, epochs = _rows(run, "step"), _rows(run, "epoch")
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]          # 8 items / global batch 4, 2 epochs
    assert len(epochs) == 2 and all(np.isfinite(_losses(run)))
    lrs = [float(r["lr"]) for r in steps]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[1] < lrs[0]  # warm-up 0 steps, cosine decay
    final = json.loads((run / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(final) and final["epoch"] == 2
    assert final["run"]["tie_policy"] == "mean" and final["run"]["pretrained"] == "random"  # provenance
    assert json.loads((run / "best/metrics.json").read_text())["run"]["num_frames"] == 3
    assert json.loads((run / "best/adapter_config.json").read_text())["training"]["max_words"] == 16
    state = json.loads((run / "last/trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["trainer"]["global_step"] == 4
    resolved = load_config(run / "config.yaml")
    assert resolved.train.eval_every == 1 and resolved.method["r"] == 4

    # evaluation of the best adapter reproduces the metrics recorded during training
    best = json.loads((run / "best/metrics.json").read_text())
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(run / "config.yaml"), "--adapter", str(run / "best"), "--pretrained", "random",
                 "--out", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(got)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(best[k]), k
    printed = capsys.readouterr().out
    assert "t2v" in printed and "R@1" in printed

    # zero-shot through the flag form
    out0 = tmp_path / "eval0"
    assert main(["eval", "--dataset", "jsonl", "--root", str(own_data), "--split", "test", "--backbone",
                 "xmodal-test", "--pretrained", "random", "--num-frames", "3", "--pooling", "mean", "--dual-softmax",
                 "--out", str(out0)]) == 0
    assert set(METRIC_KEYS) <= set(json.loads((out0 / "metrics.json").read_text()))

    assert main(["plot", str(run)]) == 0
    for png in ("loss.png", "recall.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_exactly(tmp_path, own_data):
    from xmodal.engine.train import fit

    cfg = load_config(_config_file(tmp_path, own_data, epochs=3, tensorboard=False))
    straight = fit(cfg, tmp_path / "straight", log=lambda *_: None)
    part = fit(cfg, tmp_path / "resumed", stop_after_epochs=1, log=lambda *_: None)
    assert part.epochs_done == 1 and len(part.step_losses) == 2
    assert not (tmp_path / "resumed/metrics.json").exists()
    rest = fit(cfg, tmp_path / "resumed", resume=True, log=lambda *_: None)
    assert rest.epochs_done == 3 and rest.global_step == straight.global_step == 6
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert len(_rows(tmp_path / "resumed", "epoch")) == 3
    wa = load_file(str(tmp_path / "straight/last/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "resumed/last/adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    oa = load_file(str(tmp_path / "straight/last/optimizer.safetensors"))
    ob = load_file(str(tmp_path / "resumed/last/optimizer.safetensors"))
    assert oa.keys() == ob.keys() and any(k.endswith("exp_avg_sq") for k in oa)
    for k in oa:
        torch.testing.assert_close(ob[k], oa[k], atol=1e-6, rtol=1e-5)
    ma = json.loads((tmp_path / "straight/metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed/metrics.json").read_text())
    assert {k: ma[k] for k in METRIC_KEYS} == {k: mb[k] for k in METRIC_KEYS}

    # a finished run resumes to a no-op; a different batch size cannot resume exactly
    again = fit(cfg, tmp_path / "resumed", resume=True, log=lambda *_: None)
    assert again.epochs_done == 3 and again.step_losses == []
    other = load_config(_config_file(tmp_path, own_data, epochs=3, batch_size=2, tensorboard=False))
    with pytest.raises(XModalError, match="resume needs the same"):
        fit(other, tmp_path / "resumed", resume=True, log=lambda *_: None)
    with pytest.raises(XModalError, match="no training checkpoint"):
        fit(cfg, tmp_path / "nothing", resume=True, log=lambda *_: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_path, run_dir):
    """What `torchrun --nproc_per_node 2 -m xmodal train ...` does in each process."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from xmodal.engine import distributed as dist_utils
    from xmodal.engine.train import fit

    try:
        fit(load_config(cfg_path), run_dir, log=lambda *_: None)
    finally:
        dist_utils.cleanup()


def test_ddp_two_processes_match_one(tmp_path, own_data):
    from xmodal.engine.train import fit

    cfg_path = _config_file(tmp_path, own_data, epochs=1, tensorboard=False, warmup_ratio=0.0)
    # dropout off: the two layouts draw different dropout masks by design (per-rank seeds)
    text = cfg_path.read_text().replace("dropout: 0.1", "dropout: 0.0")
    cfg_path.write_text(text)
    single = tmp_path / "single"
    fit(load_config(cfg_path), single, log=lambda *_: None)
    ddp = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(cfg_path), str(ddp)), nprocs=2, join=True)

    s_rows, d_rows = _rows(single, "step"), _rows(ddp, "step")
    assert len(s_rows) == len(d_rows) == 2
    # Same global batches, same loss and same (averaged) gradient, up to the rounding of a
    # different reduction order (the batch is split over ranks, thread counts differ): the loss
    # is a mean of log-sum-exps of logits bounded by the logit scale s, each an embed_dim-long
    # dot product; the gradient norm sums batch x embed_dim products of O(norm) terms.
    embed_dim, batch = 32, 4
    for a, b in zip(s_rows, d_rows):
        loss, scale, norm = float(a["loss"]), float(a["logit_scale"]), float(a["grad_norm"])
        assert abs(float(b["loss"]) - loss) <= layout_tolerance(scale, embed_dim) + 2 * decimal_rounding(loss)
        assert abs(float(b["grad_norm"]) - norm) <= layout_tolerance(norm, batch * embed_dim) + 2 * decimal_rounding(norm)
    wa = load_file(str(single / "last/adapter_model.safetensors"))
    wb = load_file(str(ddp / "last/adapter_model.safetensors"))
    # AdamW's step lr * m / (sqrt(v) + eps) moves by at most lr * dg / eps for a gradient error dg
    # (worst where the gradient is ~0); dg is the layout rounding of an element's sum of
    # batch x embed_dim terms of the typical (RMS) gradient size; two updates.
    lr, adam_eps = float(s_rows[0]["lr"]), 1e-6
    rms_grad = max(float(r["grad_norm"]) for r in s_rows) / math.sqrt(sum(v.numel() for v in wa.values()))
    for k in wa:
        dg = layout_tolerance(rms_grad, batch * embed_dim)
        tol = 2 * lr * min(1.0, dg / adam_eps) + layout_tolerance(float(wa[k].abs().max()), 1)
        torch.testing.assert_close(wb[k], wa[k], atol=tol, rtol=0)
    # sharded evaluation over two ranks gives the single-process metrics
    ma = json.loads((single / "metrics.json").read_text())
    mb = json.loads((ddp / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert mb[k] == pytest.approx(ma[k]), k
    assert json.loads((ddp / "last/rng.json").read_text())["world_size"] == 2


def test_unreadable_gallery_item_never_enters_the_gallery(tmp_path, own_data, tiny_backbone):
    """A video that fails to decode is an error naming it; allowed, it leaves the gallery and later
    items keep their own features (no zero row that would score 0 with every text)."""
    import shutil

    from xmodal.engine.evaluate import encode_eval_set
    from xmodal.engine.train import build_data
    from xmodal.methods import AdaptedModel

    root = tmp_path / "data"
    shutil.copytree(own_data, root)
    (root / "green.mp4").write_bytes(b"not a video at all")
    cfg = load_config(_config_file(tmp_path, root))
    model = AdaptedModel(tiny_backbone)
    data = build_data(cfg, model, need_train=False, log=lambda *_: None)
    bad = [i for i, it in enumerate(data.eval.items) if it.media.endswith("green.mp4")][0]
    with pytest.raises(XModalError, match=r"1 of 8 gallery items have unreadable media \(.*green\.mp4"):
        encode_eval_set(model, data.eval.texts, data.eval.visuals, collate_fn=data.collate, max_words=16,
                        batch_size=3)
    text, frames, mask, kept = encode_eval_set(model, data.eval.texts, data.eval.visuals, collate_fn=data.collate,
                                               max_words=16, batch_size=3, allow_missing=True, return_kept=True)
    assert kept.tolist() == [i for i in range(len(data.eval.items)) if i != bad]
    assert frames.shape[0] == len(data.eval.items) - 1 and text.shape[0] == len(data.eval.texts)
    assert mask.any(dim=1).all()
    # the item after the broken one, encoded on its own, matches its row in the gallery
    row = kept.tolist().index(bad + 1)
    alone = data.collate([data.eval.visuals[bad + 1]])
    with torch.no_grad():
        feats = model.encode_video(alone["pixels"], alone["frame_mask"])
    torch.testing.assert_close(frames[row, : feats.shape[1]], feats[0], atol=1e-5, rtol=1e-5)
