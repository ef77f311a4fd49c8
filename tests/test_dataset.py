"""TrainDataset / EvalDataset / collate: the batch contract, per-epoch caption draws that
resume exactly, the corrupt-media policy, and the wiring to xmodal.data.media."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from xmodal.data import EvalDataset, Item, TrainDataset, VisualLoader, collate, read_dataset
from xmodal.data.dataset import VisualDataset
from xmodal.data.media import MediaError, clip_transform

FIX = Path(__file__).resolve().parent / "fixtures"


def fake_tokenize(texts, length=8):
    """Deterministic stand-in tokenizer: word lengths, zero padded."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [len(w) + 1 for w in t.split()][:length]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class FakeVisual:
    """Item -> frames whose pixel value encodes the item; some items can be made 'corrupt'."""

    def __init__(self, bad=(), frames=None, size=4):
        self.bad, self.frames, self.size, self.calls = set(bad), frames, size, []

    def __call__(self, item, num_frames):
        self.calls.append(item.id)
        if item.id in self.bad:
            raise MediaError(item.media, "moov atom not found")
        real = self.frames if self.frames is not None else num_frames
        pixels = torch.zeros(num_frames, 3, self.size, self.size)
        pixels[:real] = float(item.id.strip("v")) if item.id.strip("v").isdigit() else -1.0
        mask = torch.arange(num_frames) < real
        return pixels, mask


def items(n=6, caps=5, root=None):
    """Items v0..v{n-1}; with `root`, their (empty) media files exist there (FakeVisual decodes)."""
    out = [Item(id=f"v{i}", media=f"{root or '/nowhere'}/v{i}.mp4", kind="video",
                captions=[f"caption {k} of video {i}" for k in range(caps)]) for i in range(n)]
    if root is not None:
        for item in out:
            Path(item.media).write_bytes(b"")
    return out


def test_train_batch_contract():
    ds = TrainDataset(items(4), fake_tokenize, FakeVisual(frames=3), num_frames=5, seed=1)
    batch = collate([ds[i] for i in range(4)])
    assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == torch.long
    assert batch["pixels"].shape == (4, 5, 3, 4, 4) and batch["pixels"].dtype == torch.float32
    assert batch["frame_mask"].dtype == torch.bool and batch["frame_mask"].sum(1).tolist() == [3, 3, 3, 3]
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["skipped"] == 0
    assert all(c.endswith(f"of video {i}") for i, c in enumerate(batch["captions"]))
    assert torch.equal(batch["tokens"][2], fake_tokenize([batch["captions"][2]])[0])
    assert batch["pixels"][2, 0].max().item() == 2.0 and batch["pixels"][2, 4].abs().sum() == 0
    assert "desc_tokens" not in batch


def test_caption_draw_is_seeded_per_epoch_and_resumable():
    data = items(40, caps=20)
    ds = TrainDataset(data, fake_tokenize, FakeVisual(), num_frames=1, seed=7)
    epoch0 = [ds[i]["caption"] for i in range(len(ds))]
    ds.set_epoch(1)
    epoch1 = [ds[i]["caption"] for i in range(len(ds))]
    assert epoch0 != epoch1  # a new caption mix every epoch
    assert len(set(epoch0)) == 40  # one caption per video
    # a fresh dataset (a resumed run) at epoch 1 sees exactly the same captions, in any access order
    resumed = TrainDataset(data, fake_tokenize, FakeVisual(), num_frames=1, seed=7)
    resumed.set_epoch(1)
    assert [resumed[i]["caption"] for i in reversed(range(40))] == epoch1[::-1]
    other_seed = TrainDataset(data, fake_tokenize, FakeVisual(), num_frames=1, seed=8)
    assert [other_seed[i]["caption"] for i in range(40)] != epoch0
    # over epochs every caption of an item gets drawn
    seen = {ds.caption_index(0, epoch=e) for e in range(200)}
    assert seen == set(range(20))


def test_unfold_captions_yields_every_pair_once():
    ds = TrainDataset(items(3, caps=4), fake_tokenize, FakeVisual(), num_frames=2, unfold_captions=True)
    assert len(ds) == 12
    pairs = [(ds[i]["index"], ds[i]["caption"]) for i in range(12)]
    assert len(set(pairs)) == 12 and [p[0] for p in pairs] == [0] * 4 + [1] * 4 + [2] * 4


def test_corrupt_media_skipped_counted_and_logged_once(caplog):
    loader = FakeVisual(bad={"v1", "v3"})
    ds = TrainDataset(items(5), fake_tokenize, loader, num_frames=2)
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(5)] + [ds[1]]
    assert samples[1] is None and samples[3] is None and samples[5] is None
    batch = collate(samples)
    assert batch["index"].tolist() == [0, 2, 4] and batch["skipped"] == 3 and batch["pixels"].shape[0] == 3
    assert ds.skipped == 3 and set(ds.failures) == {"/nowhere/v1.mp4", "/nowhere/v3.mp4"}
    warned = [r.getMessage() for r in caplog.records if "v1.mp4" in r.getMessage()]
    assert len(warned) == 1 and "moov atom not found" in warned[0]
    assert collate([None, None]) is None
    strict = TrainDataset(items(5), fake_tokenize, FakeVisual(bad={"v1"}), num_frames=2, strict=True)
    with pytest.raises(MediaError, match="v1.mp4: moov atom not found"):
        strict[1]


def test_descriptions_become_padded_desc_tokens():
    data = items(3, caps=1)
    data[0].descriptions = ["a long description", "second one", "third"]
    data[2].descriptions = ["only one"]
    ds = TrainDataset(data, fake_tokenize, FakeVisual(), num_frames=2, max_descriptions=2)
    batch = collate([ds[i] for i in range(3)])
    assert batch["desc_tokens"].shape == (3, 2, 8) and batch["desc_mask"].tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(batch["desc_tokens"][0], fake_tokenize(["a long description", "second one"]))
    assert batch["desc_tokens"][1].abs().sum() == 0
    vis = collate([VisualDataset(data, FakeVisual(), 2, tokenize=fake_tokenize)[i] for i in range(3)])
    assert vis["desc_tokens"].shape == (3, 3, 8) and vis["desc_mask"].sum().item() == 4


def test_eval_dataset_texts_gallery_and_loader(tmp_path):
    data = items(3, caps=2, root=tmp_path)
    data[1].captions = ["the only caption of video 1"]
    ev = EvalDataset(data, fake_tokenize, FakeVisual(bad={"v2"}), num_frames=3)
    assert ev.texts == data[0].captions + data[1].captions + data[2].captions
    assert ev.text_to_visual.tolist() == [0, 0, 1, 2, 2] and ev.visual_to_texts == [[0, 1], [2], [3, 4]]
    assert ev.num_texts == 5 and ev.num_visuals == 3
    gallery = list(DataLoader(ev.visuals, batch_size=2, collate_fn=collate))
    assert gallery[1] is None  # the batch holding only the corrupt v2 is dropped whole
    assert gallery[0]["index"].tolist() == [0, 1]
    assert gallery[0]["pixels"].shape == (2, 3, 3, 4, 4) and ev.skipped == 1
    texts = next(iter(DataLoader(ev.text_dataset, batch_size=5, collate_fn=collate)))
    assert texts["tokens"].shape == (5, 8) and texts["visual_index"].tolist() == [0, 0, 1, 2, 2]
    assert texts["captions"] == ev.texts and "pixels" not in texts
    assert EvalDataset(data, max_captions=1).texts == [data[0].captions[0], data[1].captions[0], data[2].captions[0]]


def test_from_spec_uses_protocol_frames_and_checks_items(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    spec = read_dataset("didemo", tmp_path, "train", annotation_file=_didemo(tmp_path))
    loader = FakeVisual(frames=1)
    ds = TrainDataset.from_spec(spec, fake_tokenize, loader)
    assert ds.num_frames == 64 and ds[0]["pixels"].shape[0] == 64
    assert EvalDataset.from_spec(spec, fake_tokenize, loader, num_frames=8).visuals.num_frames == 8
    from xmodal.errors import DataError

    with pytest.raises(DataError, match=r"dataset item 0 \('x'\): expected at least one caption"):
        TrainDataset([Item("x", "/a.mp4", "video", [])], fake_tokenize, loader)


def _didemo(tmp_path):
    path = tmp_path / "train_data.json"
    path.write_text('[{"video": "a.mp4", "description": "a moment.", "times": [[0, 1]]}]')
    return path


# ------------------------------------------------------------------ real media wiring
def test_visual_loader_reads_real_images_and_skips_corrupt(shared_data, tmp_path, tiny_backbone):
    images = sorted((shared_data / "image" / "coco_karpathy_test").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    data = [Item(id=p.stem, media=str(p), kind="image", captions=[f"photo {k}"]) for k, p in enumerate(images)]
    data.append(Item(id="broken", media=str(bad), kind="image", captions=["broken"]))
    tokenize = functools.partial(tiny_backbone.tokenize, max_words=16)
    ds = TrainDataset(data, tokenize, VisualLoader(clip_transform(tiny_backbone.image_size)), num_frames=12)
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixels"].shape == (2, 1, 3, 32, 32) and batch["frame_mask"].all()
    assert batch["tokens"].shape == (2, tiny_backbone.context_length) and batch["skipped"] == 1
    assert str(bad) in ds.failures
    with torch.no_grad():
        feats = tiny_backbone.encode_visual(batch["pixels"].flatten(0, 1)).squeeze(1)
    assert feats.shape == (2, tiny_backbone.embed_dim) and torch.isfinite(feats).all()


def test_visual_loader_reads_real_video_segment(shared_data):
    video = shared_data / "video" / "msrvtt_1kA" / "video7202.mp4"  # 640x360, 2 fps, 21 s
    loader = VisualLoader(clip_transform(32), fps=1.0)
    pixels, mask = loader(Item("video7202", str(video), "video", ["x"]), 12)
    assert pixels.shape == (12, 3, 32, 32) and mask.all()
    pixels, mask = loader(Item("video7202", str(video), "video", ["x"], start=2.0, end=6.0), 12)
    assert mask.sum().item() == 4 and pixels[4:].abs().sum() == 0
