"""The frame cache: extraction, index.json, reading back through load_clip, resume and staleness."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from videos import palette_index, write_video
from xmodal.cli import main as cli_main
from xmodal.cli.extract_frames import read_manifest
from xmodal.atomic import WriteError
from xmodal.data.frame_cache import FrameCache, FrameCacheError, extract_frames, item_dirname, open_frame_cache
from xmodal.data.media import MediaError, clip_transform, decode_frames, load_clip, load_image
from xmodal.errors import XModalError

MSRVTT = "video/msrvtt_1kA"
SIZE = 32


@pytest.fixture(scope="module")
def clips(shared_data, tmp_path_factory):
    """Two real MSR-VTT clips (30 fps and 2 fps) and one own 6-s clip with colour per second."""
    own = write_video(tmp_path_factory.mktemp("own") / "own.mp4", 60, 10.0, width=80, height=60)
    return [
        {"id": "video9770", "media": str(shared_data / MSRVTT / "video9770.mp4"), "kind": "video"},
        {"id": "video9908", "media": str(shared_data / MSRVTT / "video9908.mp4"), "kind": "video"},
        {"id": "own/clip 1", "media": own, "kind": "video"},
    ]


@pytest.fixture(scope="module")
def npy_cache(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("npy_cache")
    summary = extract_frames(clips, out, fmt="npy", size=SIZE, progress=False, bench_clips=2)
    return out, summary


def test_npy_cache_matches_direct_decoding_exactly(clips, npy_cache):
    out, summary = npy_cache
    assert summary["extracted"] == 3 and summary["failed"] == 0
    cache = FrameCache(out)
    transform = clip_transform(SIZE)
    for item in clips:
        direct, dmask = load_clip(item["media"], num_frames=12, transform=transform)
        cached, cmask = load_clip(item["media"], num_frames=12, transform=transform, cache=cache)
        assert torch.equal(dmask, cmask)
        assert torch.equal(direct, cached), item["id"]
        # a different frame budget samples from the cached 1-fps frames like the decoder does
        want = decode_frames(item["media"], num_frames=5).timestamps
        assert cache.sample(item["media"], num_frames=5, size=SIZE).timestamps == pytest.approx(want, abs=1e-5)


def test_index_content(clips, npy_cache):
    out, summary = npy_cache
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 1 and set(index["items"]) == {c["id"] for c in clips}
    for item in clips:
        entry = index["items"][item["id"]]
        full = decode_frames(item["media"], num_frames=None)
        st = os.stat(item["media"])
        assert entry["source"] == item["media"]
        assert (entry["mtime_ns"], entry["size_bytes"]) == (st.st_mtime_ns, st.st_size)
        assert entry["format"] == "npy" and entry["fps"] == 1.0 and entry["num_frames"] == 0
        assert entry["frames"] == len(full) == len(entry["timestamps"])
        assert entry["timestamps"] == pytest.approx(full.timestamps, abs=1e-5)
        assert entry["duration"] == pytest.approx(full.duration, abs=1e-5)
        stored = np.load(out / entry["dir"] / "frames.npy")
        assert stored.dtype == np.uint8 and stored.shape[0] == entry["frames"]
        assert min(stored.shape[1:3]) == SIZE and (entry["height"], entry["width"]) == stored.shape[1:3]
    assert index["items"]["own/clip 1"]["dir"] == item_dirname("own/clip 1") != "own/clip 1"
    own = np.load(out / item_dirname("own/clip 1") / "frames.npy")
    assert [palette_index(f) for f in own] == [0, 1, 2, 3, 4, 5]


def test_summary_reports_both_rates(npy_cache):
    out, summary = npy_cache
    saved = json.loads((out / "extract_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["frames_written"] == 11 + 13 + 6
    assert saved["decode_clips_per_s"] > 0 and saved["decode_frames_per_s"] > 0
    bench = saved["read_benchmark"]
    assert bench["clips"] == 2 and bench["cache_clips_per_s"] > 0 and bench["decode_clips_per_s"] > 0
    assert bench["speedup"] == pytest.approx(bench["cache_clips_per_s"] / bench["decode_clips_per_s"], rel=0.01)


def test_jpeg_cache_resume_and_staleness(tmp_path):
    sources = [write_video(tmp_path / f"v{i}.mp4", 40, 10.0, color_of=lambda j, i=i: i * 5 + j // 10)
               for i in range(3)]
    out = tmp_path / "cache"
    first = extract_frames(sources, out, fmt="jpeg", size=SIZE, progress=False, bench_clips=0)
    assert (first["extracted"], first["already_cached"]) == (3, 0)
    assert first["lossless"] is False
    assert sorted(os.listdir(out / "v1")) == ["000.jpg", "001.jpg", "002.jpg", "003.jpg"]
    cache = FrameCache(out)
    assert cache.describe() == {"path": str(out.resolve()), "format": "jpeg", "lossless": False}
    transform = clip_transform(SIZE)
    direct, _ = load_clip(sources[1], num_frames=4, transform=transform)
    cached, mask = load_clip(sources[1], num_frames=4, transform=transform, cache=cache)
    assert mask.all() and (direct - cached).abs().mean() < 0.05  # JPEG loss only
    frames = cache.sample(sources[1], num_frames=12, size=SIZE).frames
    assert [palette_index(f) for f in frames] == [5, 6, 7, 8]

    stamp = os.stat(out / "v0" / "000.jpg").st_mtime_ns
    second = extract_frames(sources, out, fmt="jpeg", size=SIZE, progress=False, bench_clips=0)
    assert (second["extracted"], second["already_cached"]) == (0, 3)
    assert os.stat(out / "v0" / "000.jpg").st_mtime_ns == stamp  # nothing rewritten

    # the source changes: the entry is stale, load_clip decodes the new content
    write_video(sources[0], 20, 10.0, color_of=lambda j: 40)
    cache = FrameCache(out)
    assert cache.find(sources[0]) is None and cache.find(sources[1]) is not None
    frames, mask = load_clip(sources[0], num_frames=3, cache=cache)
    assert mask.tolist() == [True, True, False]
    third = extract_frames(sources, out, fmt="jpeg", size=SIZE, progress=False, bench_clips=0)
    assert (third["extracted"], third["already_cached"]) == (1, 2)
    assert FrameCache(out).entry("v0")["frames"] == 2
    # other settings are a different cache content: re-extracted
    fourth = extract_frames(sources, out, fmt="jpeg", size=SIZE, num_frames=2, progress=False, bench_clips=0)
    assert fourth["extracted"] == 3


def test_failures_are_counted_or_strict(tmp_path):
    good = [write_video(tmp_path / f"ok{i}.mp4", 20, 10.0) for i in range(2)]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(5000))
    out = tmp_path / "cache"
    summary = extract_frames([good[0], str(bad), good[1]], out, fmt="npy", size=0, progress=False,
                             bench_clips=0)
    assert (summary["extracted"], summary["failed"]) == (2, 1)
    assert list(summary["failures"]) == [str(bad)]
    assert "bad" not in FrameCache(out)

    strict_out = tmp_path / "strict"
    with pytest.raises(MediaError) as info:
        extract_frames([good[0], str(bad), good[1]], strict_out, fmt="npy", size=0, progress=False,
                       bench_clips=0, strict=True)
    assert info.value.path == str(bad)
    assert "ok0" in FrameCache(strict_out)  # work done before the failure was saved


def test_parallel_workers_segments_and_images(tmp_path, shared_data):
    video = write_video(tmp_path / "long.mp4", 120, 10.0)  # 12 s, colour = second
    image = sorted((shared_data / "image" / "coco_karpathy_test").glob("*.jpg"))[0]
    items = [
        {"id": "moment", "media": video, "kind": "video", "start": 2.0, "end": 8.0},
        {"id": "whole", "media": video, "kind": "video"},
        {"id": "img", "media": str(image), "kind": "image"},
    ]
    out = tmp_path / "cache"
    summary = extract_frames(items, out, fmt="npy", size=SIZE, workers=2, progress=False, bench_clips=0)
    assert summary["extracted"] == 3
    cache = FrameCache(out)
    moment = cache.sample(video, num_frames=12, start=2.0, end=8.0, size=SIZE)
    assert moment.timestamps == pytest.approx([2, 3, 4, 5, 6, 7])
    assert cache.find(video, start=2.0, end=8.0)["dir"] == "moment"
    # a sub-segment's 1-fps grid is not the cached one: not served approximately, decoded instead
    assert cache.sample(video, num_frames=12, start=2.5, end=5.0, size=SIZE) is None
    transform = clip_transform(SIZE)
    direct, _ = load_clip(video, num_frames=4, start=2.5, end=5.0, transform=transform)
    via_cache, _ = load_clip(video, num_frames=4, start=2.5, end=5.0, transform=transform, cache=cache)
    assert torch.equal(direct, via_cache)
    # the image is cached resized; through the model's transform it equals the direct load exactly
    assert torch.equal(load_image(str(image), transform, cache=cache), load_image(str(image), transform))
    # raw frames (no transform) would differ from the shrunk cached ones: refused, not served
    with pytest.raises(FrameCacheError, match="shrunk to 32px"):
        load_image(str(image), cache=cache)


def test_cli_with_shared_manifest(shared_data, tmp_path, capsys):
    manifest = shared_data / MSRVTT / "manifest.json"
    items = read_manifest(str(manifest))
    assert len(items) == 13 and all(os.path.isfile(i["media"]) for i in items)
    assert items[0]["id"] == "video7202"
    small = tmp_path / "two.jsonl"
    records = [{"id": i["id"], "media": i["media"]} for i in items[9:11]] + [{"video_id": "gone", "file": "gone.mp4"}]
    small.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "cache"
    rc = cli_main(["extract-frames", "--manifest", str(small), "--out", str(out), "--format", "npy",
                   "--size", str(SIZE), "--bench-clips", "2", "--no-progress", "--skip-missing"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "frames/s" in printed and "cache" in printed and "decoding" in printed
    summary = json.loads((out / "extract_summary.json").read_text())
    assert summary["extracted"] == 2 and summary["items"] == 2 and summary["failed"] == 0
    assert summary["read_benchmark"]["clips"] == 2
    assert read_manifest(str(small))[2]["media"] == str(tmp_path / "gone.mp4")
    # argument errors are user-facing
    assert cli_main(["extract-frames", "--out", str(out)]) == 2
    assert "DATASET" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli_main(["extract-frames", "--manifest", str(bad), "--out", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_broken_index_is_a_user_error(tmp_path):
    (tmp_path / "index.json").write_text("[1, 2]")
    with pytest.raises(XModalError, match="index.json"):
        FrameCache(tmp_path)


# --------------------------------------------------------------------------- lossless by default
def test_default_cache_is_lossless_for_the_model(shared_data, tmp_path, tiny_backbone):
    """A cached evaluation equals a direct-decode one: same pixels per item, same similarity matrix.

    The cache is built with the defaults except --size = the model's input size (32 for
    xmodal-test); video items (real 30-fps and 2-fps MSR-VTT clips, one own clip) and image items.
    """
    from xmodal.data import EvalDataset, Item, VisualLoader, collate

    model = tiny_backbone.eval()
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    own = write_video(tmp_path / "own.mp4", 75, 25.0, width=90, height=70, texture=True, gop=25)
    images = sorted((shared_data / "image" / "coco_karpathy_test").glob("*.jpg"))[:2]
    items = [Item(id=n, media=str(shared_data / MSRVTT / f"{n}.mp4"), kind="video", captions=[f"clip {n}"])
             for n in ("video9770", "video9908")]
    items += [Item(id="own", media=own, kind="video", captions=["colours"])]
    items += [Item(id=p.stem, media=str(p), kind="image", captions=[f"photo {p.stem}"]) for p in images]
    out = tmp_path / "cache"
    summary = extract_frames(items, out, size=size, progress=False, bench_clips=0)
    assert summary["extracted"] == len(items) and summary["format"] == "npy" and summary["lossless"]
    cache = open_frame_cache(out)
    assert cache.describe() == {"path": str(out.resolve()), "format": "npy", "lossless": True}

    transform = clip_transform(size)
    direct = EvalDataset(items, model.tokenize, VisualLoader(transform), num_frames=6)
    cached = EvalDataset(items, model.tokenize, VisualLoader(transform, cache=cache), num_frames=6)
    for i in range(len(items)):
        a, b = direct.visuals[i], cached.visuals[i]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["frame_mask"], b["frame_mask"]), items[i].id

    def similarity(ds):
        batch = collate([ds.visuals[i] for i in range(len(items))])
        with torch.no_grad():
            frames = model.encode_video(batch["pixels"], batch["frame_mask"])
            m = batch["frame_mask"].unsqueeze(-1).float()
            video = torch.nn.functional.normalize((frames * m).sum(1) / m.sum(1), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(model.tokenize(ds.texts)), dim=-1)
        return text @ video.T

    assert torch.equal(similarity(direct), similarity(cached))


def test_cache_built_for_another_input_size_is_refused(clips, npy_cache):
    """A 32-px cache read for a 48-px model would resize twice: a one-line error, not other pixels."""
    out, _ = npy_cache
    cache = FrameCache(out)
    with pytest.raises(FrameCacheError, match=r"shrunk to 32px.*input size of 48px.*--size 48") as info:
        load_clip(clips[0]["media"], num_frames=4, transform=clip_transform(48), cache=cache)
    assert "\n" not in str(info.value)


def test_cache_path_must_exist_unless_building(tmp_path):
    missing = tmp_path / "typo_cache"
    for opener in (FrameCache, open_frame_cache):
        with pytest.raises(FrameCacheError, match="does not exist") as info:
            opener(missing)
        assert str(missing) in str(info.value) and "\n" not in str(info.value)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FrameCacheError, match="no index.json"):
        open_frame_cache(empty)
    assert len(FrameCache(missing, create=True)) == 0  # the writer may start from nothing


def test_index_entry_lacking_a_key_names_file_and_entry(tmp_path):
    video = write_video(tmp_path / "v.mp4", 20, 10.0)
    out = tmp_path / "cache"
    extract_frames([video], out, size=SIZE, progress=False, bench_clips=0)
    index = json.loads((out / "index.json").read_text())
    del index["items"]["v"]["timestamps"]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(FrameCacheError) as info:
        open_frame_cache(out)
    message = str(info.value)
    assert str(out / "index.json") in message and "'v'" in message and "timestamps" in message
    assert "\n" not in message


def test_disk_full_while_writing_frames_is_one_line(tmp_path, monkeypatch):
    import errno

    video = write_video(tmp_path / "v.mp4", 20, 10.0)
    out = tmp_path / "cache"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)  # reserving the frames' space fails
    with pytest.raises(WriteError, match="no space left") as info:
        extract_frames([video], out, size=SIZE, progress=False, bench_clips=0)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["index.json"]  # no half-written item folder


def test_cli_failures_exit_code_and_empty_split(tmp_path, capsys):
    good = write_video(tmp_path / "good.mp4", 20, 10.0)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(4000))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "media": m}) + "\n"
                                for i, m in (("good", good), ("bad", str(bad)), ("bad_again", str(bad)))))
    out = tmp_path / "cache"
    rc = cli_main(["extract-frames", "--manifest", str(manifest), "--out", str(out), "--size", str(SIZE),
                   "--bench-clips", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.count(f"failed: {bad}:") == 1  # each failing path once, with its reason
    assert "decode time per clip" in captured.out
    summary = json.loads((out / "extract_summary.json").read_text())
    assert summary["failed"] == 2 and list(summary["failures"]) == [str(bad)]
    assert set(summary["clip_seconds"]) == {"good"}
    assert FrameCache(out).entry("good")["decode_seconds"] >= 0
    # --skip-missing tolerates failures (exit 0)
    assert cli_main(["extract-frames", "--manifest", str(manifest), "--out", str(out), "--size", str(SIZE),
                     "--bench-clips", "0", "--no-progress", "--skip-missing"]) == 0
    capsys.readouterr()
    # a manifest whose media are all missing matches nothing: an error, not an empty cache
    gone = tmp_path / "gone.jsonl"
    gone.write_text(json.dumps({"id": "x", "media": str(tmp_path / "nope.mp4")}) + "\n")
    assert cli_main(["extract-frames", "--manifest", str(gone), "--out", str(tmp_path / "c2"),
                     "--skip-missing", "--no-progress"]) == 2
    assert "no items" in capsys.readouterr().err
    with pytest.raises(XModalError, match="no items"):
        extract_frames([], tmp_path / "c3", progress=False)


def test_extraction_keeps_only_shrunk_picks(tmp_path, monkeypatch):
    """Every picked frame is shrunk as it is decoded (extract-frames held all full-size frames before)."""
    import xmodal.data.frame_cache as fc

    video = write_video(tmp_path / "big.mp4", 40, 4.0, width=320, height=240)
    shapes = []
    real = fc.resize_shorter

    def spy(frame, size):
        shapes.append(frame.shape)
        return real(frame, size)

    monkeypatch.setattr(fc, "resize_shorter", spy)
    extract_frames([video], tmp_path / "cache", size=SIZE, progress=False, bench_clips=0)
    entry = FrameCache(tmp_path / "cache").entry("big")
    assert len(shapes) == entry["frames"] == 10 and entry["source_short_side"] == 240
    assert (entry["height"], entry["width"]) == (SIZE, int(SIZE * 320 / 240))


def test_entry_with_a_dropped_tail_serves_only_its_own_budget(tmp_path):
    """5 s of video in a 10-s container: 7 of 10 grid frames stored; other budgets are decoded, not subsampled."""
    from videos import write_video_with_longer_audio

    path = write_video_with_longer_audio(tmp_path / "av.mkv")
    out = tmp_path / "cache"
    extract_frames([path], out, size=0, progress=False, bench_clips=0)
    entry = FrameCache(out).entry("av")
    assert (entry["frames"], entry["grid"]) == (7, 10)
    assert np.load(out / entry["dir"] / "frames.npy").shape[0] == 7
    cache = open_frame_cache(out)
    assert cache.sample(path, num_frames=4) is None  # uniform 4 of the 7 kept != the decoder's 4 of 10
    direct, _ = load_clip(path, num_frames=4)
    via, _ = load_clip(path, num_frames=4, cache=cache)
    assert torch.equal(direct, via)
