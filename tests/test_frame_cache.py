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
from xmodal.data.frame_cache import FrameCache, extract_frames, item_dirname
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
        assert cache.sample(item["media"], num_frames=5).timestamps == pytest.approx(want, abs=1e-5)


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
    assert sorted(os.listdir(out / "v1")) == ["000.jpg", "001.jpg", "002.jpg", "003.jpg"]
    cache = FrameCache(out)
    transform = clip_transform(SIZE)
    direct, _ = load_clip(sources[1], num_frames=4, transform=transform)
    cached, mask = load_clip(sources[1], num_frames=4, transform=transform, cache=cache)
    assert mask.all() and (direct - cached).abs().mean() < 0.05  # JPEG loss only
    frames = cache.sample(sources[1], num_frames=12).frames
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
    moment = cache.sample(video, num_frames=12, start=2.0, end=8.0)
    assert moment.timestamps == pytest.approx([2, 3, 4, 5, 6, 7])
    assert cache.find(video, start=2.0, end=8.0)["dir"] == "moment"
    # a sub-segment of a cached segment is served from the cached frames
    sub = cache.sample(video, num_frames=12, start=3.0, end=5.0)
    assert [palette_index(f) for f in sub.frames] == [3, 4]
    # the image is cached resized; load_image reads it back through the cache
    pil_size = load_image(str(image)).shape
    cached = load_image(str(image), cache=cache)
    assert min(cached.shape[1:]) == SIZE and cached.shape != pil_size


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
