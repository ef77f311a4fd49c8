"""Video/image decoding: the 1-fps + uniform sampling rule, odd inputs and the corrupt-input policy."""

from __future__ import annotations

import logging
import math
import os

import av
import numpy as np
import pytest
import torch

from videos import palette_index, write_video
from xmodal.data.media import (
    MediaError,
    MediaPolicy,
    clip_transform,
    decode_frames,
    load_clip,
    load_image,
    read_image_array,
    sample_targets,
    uniform_indices,
)
from xmodal.errors import DataError, XModalError

MSRVTT = "video/msrvtt_1kA"


def _stream_facts(path):
    """(stream duration in s, every frame's time from the stream start) read directly with PyAV."""
    with av.open(path) as c:
        s = c.streams.video[0]
        origin = float(s.start_time * s.time_base)
        duration = float(s.duration * s.time_base)
        times = [f.time - origin for f in c.decode(s)]
    return duration, times


# --------------------------------------------------------------------------- sampling rule
def test_sample_targets_and_uniform_indices():
    assert sample_targets(0.0, 3.0, 1.0) == [0.0, 1.0, 2.0]
    assert sample_targets(0.0, 3.2, 1.0) == [0.0, 1.0, 2.0, 3.0]
    assert sample_targets(2.5, 4.0, 2.0) == [2.5, 3.0, 3.5]
    assert sample_targets(1.0, 1.0, 1.0) == [1.0]  # at least one point
    assert uniform_indices(20, 6) == [0, 4, 8, 11, 15, 19]
    assert uniform_indices(5, 12) == [0, 1, 2, 3, 4]
    assert uniform_indices(5, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["video7375", "video8807", "video9771", "video8331", "video9908"])
def test_real_msrvtt_clip_sampling(shared_data, name):
    """1 fps grid over the container's duration, then 12 uniform picks of the nearest frames."""
    path = str(shared_data / MSRVTT / f"{name}.mp4")
    duration, times = _stream_facts(path)
    decoded = decode_frames(path, fps=1.0, num_frames=12)

    grid = list(range(math.ceil(duration - 1e-9)))
    targets = [grid[i] for i in np.round(np.linspace(0, len(grid) - 1, min(12, len(grid)))).astype(int)]
    assert len(decoded) == min(12, len(grid)) == decoded.frames.shape[0]
    assert decoded.duration == pytest.approx(duration, abs=1e-3)
    assert all(b > a for a, b in zip(decoded.timestamps, decoded.timestamps[1:]))
    assert decoded.timestamps[-1] < duration
    for target, got in zip(targets, decoded.timestamps):
        nearest = min(times, key=lambda t: (abs(t - target), t))
        assert got == pytest.approx(nearest, abs=1e-6), (target, got, nearest)
    assert decoded.frames.dtype == np.uint8 and decoded.frames.shape[-1] == 3


def test_real_2fps_reencode_keeps_whole_seconds(shared_data):
    """The 640x360 2-fps re-encodes have a frame on every whole second: picks are exact."""
    path = str(shared_data / MSRVTT / "video8331.mp4")  # 32 frames at 2 fps = 16 s
    decoded = decode_frames(path, num_frames=None)
    assert decoded.timestamps == [float(k) for k in range(16)]
    assert decoded.frames.shape == (16, 360, 640, 3)
    decoded = decode_frames(path, fps=2.0, num_frames=None)
    assert decoded.timestamps == [k / 2 for k in range(32)]


def test_real_clip_load_clip_pads_short_clip(shared_data):
    path = str(shared_data / MSRVTT / "video9770.mp4")  # 11 s -> 11 frames at 1 fps
    pixels, mask = load_clip(path, num_frames=12, transform=clip_transform(32))
    assert pixels.shape == (12, 3, 32, 32) and pixels.dtype == torch.float32
    assert mask.tolist() == [True] * 11 + [False]
    assert torch.count_nonzero(pixels[11]) == 0
    assert pixels[:11].std() > 0.1  # normalised real content


# --------------------------------------------------------------------------- own videos
def test_which_frames_are_picked_at_odd_fps(tmp_path):
    """7.5 fps, 4 s: targets 0,1,2,3 s; at 1 s and 3 s two frames tie and the earlier wins."""
    path = write_video(tmp_path / "odd_fps.mp4", 30, 7.5, color_of=lambda i: i)
    decoded = decode_frames(path, num_frames=12)
    assert [palette_index(f) for f in decoded.frames] == [0, 7, 15, 22]
    assert decoded.timestamps == pytest.approx([0.0, 7 / 7.5, 2.0, 22 / 7.5])
    assert decoded.duration == pytest.approx(4.0)


def test_uniform_subsampling_and_segments(tmp_path):
    path = write_video(tmp_path / "twenty.mp4", 200, 10.0)  # 20 s, colour = second
    decoded = decode_frames(path, num_frames=6)
    assert [palette_index(f) for f in decoded.frames] == [0, 4, 8, 11, 15, 19]
    # a segment: the grid starts at `start`
    seg = decode_frames(path, num_frames=12, start=5.5, end=9.2)
    assert seg.timestamps == pytest.approx([5.5, 6.5, 7.5, 8.5])
    assert [palette_index(f) for f in seg.frames] == [5, 6, 7, 8]
    # a late segment is reached by seeking; same frames as sequential decoding would give
    late = decode_frames(path, num_frames=12, start=12.0, end=15.0)
    assert late.timestamps == pytest.approx([12.0, 13.0, 14.0])
    assert [palette_index(f) for f in late.frames] == [12, 13, 14]
    # segment past the end is clamped to the last second of the video
    tail = decode_frames(path, num_frames=12, start=30.0, end=40.0)
    assert len(tail) == 1 and palette_index(tail.frames[0]) == 19


def test_ntsc_rate_picks_nearest_frames(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", 150, 30000 / 1001)  # ~5 s at 29.97
    decoded = decode_frames(path, num_frames=12)
    assert len(decoded) == 6  # duration 5.005 s -> targets 0..5 (5 s is served by the last frame)
    times = [i * 1001 / 30000 for i in range(150)]
    for k, t in enumerate(decoded.timestamps):
        assert t == pytest.approx(min(times, key=lambda x: (abs(x - k), x)), abs=1e-6)
    assert [palette_index(f) for f in decoded.frames] == [0, 1, 2, 3, 4, 4]


def test_short_video_is_padded(tmp_path):
    path = write_video(tmp_path / "three.mp4", 30, 10.0)  # 3 s
    pixels, mask = load_clip(path, num_frames=12)
    assert mask.tolist() == [True] * 3 + [False] * 9
    assert pixels.shape == (12, 3, 48, 64)
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert torch.count_nonzero(pixels[3:]) == 0
    colours = [palette_index((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for p in pixels[:3]]
    assert colours == [0, 1, 2]


def test_single_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", 1, 25.0, color_of=lambda i: 9)
    decoded = decode_frames(path)
    assert len(decoded) == 1 and decoded.timestamps == [0.0]
    assert palette_index(decoded.frames[0]) == 9
    pixels, mask = load_clip(path, num_frames=4, transform=clip_transform(32))
    assert mask.tolist() == [True, False, False, False]


@pytest.mark.parametrize("suffix,codec,pix_fmt", [(".mp4", "mpeg4", "yuv420p"), (".mkv", "ffv1", "yuv444p")])
def test_odd_frame_size(tmp_path, suffix, codec, pix_fmt):
    """97x61 decodes at its own size; the CLIP transform makes it square (mkv: no stream duration)."""
    path = write_video(tmp_path / f"odd{suffix}", 10, 5.0, width=97, height=61, codec=codec, pix_fmt=pix_fmt)
    decoded = decode_frames(path)
    assert decoded.frames.shape == (2, 61, 97, 3)
    assert decoded.duration == pytest.approx(2.0)
    pixels, mask = load_clip(path, num_frames=3, transform=clip_transform(32))
    assert pixels.shape == (3, 3, 32, 32) and mask.tolist() == [True, True, False]


def test_stream_without_duration_or_timestamps(tmp_path):
    """A raw H.264 stream has neither a duration nor timestamps: times come from frame counts."""
    path = write_video(tmp_path / "raw.h264", 60, 25.0, fmt="h264", color_of=lambda i: i // 25)
    with av.open(path) as c:
        assert c.streams.video[0].duration is None and c.duration is None
    decoded = decode_frames(path, num_frames=12)
    assert decoded.timestamps == pytest.approx([0.0, 1.0, 2.0])
    assert [palette_index(f) for f in decoded.frames] == [0, 1, 2]
    assert decoded.duration == pytest.approx(60 / 25)
    assert len(decode_frames(path, num_frames=2)) == 2
    assert [palette_index(f) for f in decode_frames(path, start=1.0).frames] == [1, 2]
    past_end = decode_frames(path, start=10.0, end=12.0)  # nearest frame to it: the last one
    assert past_end.timestamps == pytest.approx([59 / 25])


def test_transform_matches_open_clip_on_pil_and_arrays(shared_data):
    import open_clip
    from PIL import Image

    path = sorted((shared_data / "image" / "coco_karpathy_test").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB")
    transform = clip_transform(48)
    reference = open_clip.image_transform(48, is_train=False)(image)
    assert torch.equal(transform(image), reference)
    assert torch.equal(transform(np.asarray(image)), reference)
    assert torch.equal(load_image(str(path), transform=transform), reference)
    raw = load_image(str(path))
    assert raw.shape == (3, image.height, image.width) and float(raw.max()) <= 1.0
    with pytest.raises(TypeError):
        transform(np.zeros((4, 4), np.float32))


# --------------------------------------------------------------------------- corrupt input
@pytest.fixture
def corrupt_files(tmp_path, shared_data):
    real = (shared_data / MSRVTT / "video9770.mp4").read_bytes()
    jpeg = sorted((shared_data / "image" / "coco_karpathy_test").glob("*.jpg"))[0].read_bytes()
    files = {
        "missing": tmp_path / "does_not_exist.mp4",
        "empty": tmp_path / "empty.mp4",
        "truncated": tmp_path / "first_half.mp4",
        "random": tmp_path / "random.mp4",
        "bad_jpeg": tmp_path / "broken.jpg",
        "random_jpeg": tmp_path / "noise.jpg",
        "directory": tmp_path / "folder.mp4",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(real[: len(real) // 2])
    files["random"].write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    files["bad_jpeg"].write_bytes(jpeg[: len(jpeg) // 2])
    files["random_jpeg"].write_bytes(b"\xff\xd8\xff" + os.urandom(3000))
    files["directory"].mkdir()
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "bad_jpeg", "random_jpeg", "directory"])
def test_corrupt_media_raise_media_error(corrupt_files, kind):
    path = corrupt_files[kind]
    loader = load_image if path.endswith(".jpg") else load_clip
    with pytest.raises(MediaError) as info:
        loader(path)
    err = info.value
    assert isinstance(err, DataError) and isinstance(err, XModalError)
    assert err.path == path and path in str(err) and err.reason
    with pytest.raises(MediaError):
        decode_frames(path)


def test_truncated_in_the_middle_of_the_data(tmp_path):
    """moov atom first (faststart) and half the samples missing: reported as truncated."""
    path = write_video(tmp_path / "noise.mp4", 80, 10.0, faststart=True, noise=True)
    assert len(decode_frames(path)) == 8
    data = open(path, "rb").read()
    cut = tmp_path / "noise_half.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated") as info:
        decode_frames(str(cut))
    assert info.value.path == str(cut)


def test_decoding_is_bounded_in_time(tmp_path):
    path = write_video(tmp_path / "v.mp4", 20, 10.0)
    with pytest.raises(MediaError, match="timed out"):
        decode_frames(path, timeout=0.0)


def test_policy_skips_and_counts_or_raises(corrupt_files, tmp_path, caplog):
    good = write_video(tmp_path / "good.mp4", 20, 10.0)
    policy = MediaPolicy()
    with caplog.at_level(logging.WARNING, logger="xmodal.media"):
        assert policy.call(load_clip, corrupt_files["random"]) is None
        assert policy.call(load_clip, corrupt_files["random"]) is None
        assert policy.call(load_clip, corrupt_files["missing"]) is None
        pixels, mask = policy.call(load_clip, good, num_frames=4)
    assert mask.tolist() == [True, True, False, False]
    assert (policy.loaded, policy.skipped) == (1, 3)
    assert set(policy.failures) == {corrupt_files["random"], corrupt_files["missing"]}
    assert "does not exist" in policy.failures[corrupt_files["missing"]]
    warned = [r for r in caplog.records if corrupt_files["random"] in r.getMessage()]
    assert len(warned) == 1  # logged once per path
    summary = policy.summary()
    assert summary["skipped"] == 3 and summary["failed_files"] == 2

    strict = MediaPolicy(strict=True)
    with pytest.raises(MediaError):
        strict.call(load_clip, corrupt_files["empty"])
    assert strict.call(load_clip, good, num_frames=2)[1].all()


class _Clips(torch.utils.data.Dataset):
    """A tiny dataset that skips unreadable clips through a MediaPolicy (zeros, empty mask)."""

    def __init__(self, paths):
        self.paths = paths
        self.policy = MediaPolicy()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        got = self.policy.call(load_clip, self.paths[i], num_frames=4, transform=clip_transform(32))
        if got is None:
            return torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.bool)
        return got


@pytest.mark.timeout(60)
def test_corrupt_file_in_dataloader_worker_does_not_hang(corrupt_files, tmp_path):
    good = write_video(tmp_path / "good.mp4", 30, 10.0)
    paths = [good, corrupt_files["random"], corrupt_files["truncated"], corrupt_files["empty"], good]
    # spawn, not fork: a worker forked from this long-lived pytest process (many threads by now)
    # can deadlock inside torch's own worker start-up (seen: torch.manual_seed -> xpu lazy init),
    # which has nothing to do with the media; a fresh interpreter tests only the decoding.
    loader = torch.utils.data.DataLoader(_Clips(paths), batch_size=5, num_workers=1,
                                         multiprocessing_context="spawn")
    (pixels, mask), = list(loader)
    assert pixels.shape == (5, 4, 3, 32, 32)
    assert mask.sum(dim=1).tolist() == [3, 0, 0, 0, 3]


# --------------------------------------------------------------------------- orientation, bit depth, corruption
@pytest.mark.parametrize("rotation,corner", [(90, "bottom_left"), (-90, "top_right"), (180, "bottom_right"),
                                             (0, "top_left")])
def test_video_display_rotation_is_applied(tmp_path, rotation, corner):
    """A display matrix (phones' portrait video) turns the picture as players do (counter-clockwise r)."""
    import fractions

    path = tmp_path / f"rot{rotation}.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fractions.Fraction(10))
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.set_display_rotation(rotation)
        for _ in range(10):
            a = np.zeros((48, 64, 3), np.uint8)
            a[:16, :16] = 255  # a white block in the stored picture's top-left corner
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    frame = decode_frames(str(path)).frames[0]
    assert frame.shape == ((64, 48, 3) if rotation in (90, -90) else (48, 64, 3))
    h, w = frame.shape[:2]
    corners = {"top_left": frame[:8, :8], "top_right": frame[:8, w - 8:],
               "bottom_left": frame[h - 8:, :8], "bottom_right": frame[h - 8:, w - 8:]}
    assert {k for k, v in corners.items() if v.mean() > 200} == {corner}


def test_jpeg_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = 255  # white top-left corner in the stored pixels
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    array = read_image_array(str(path))
    assert array.shape == (60, 40, 3)  # upright: portrait
    assert array[:8, -8:].mean() > 200 and array[:8, :8].mean() < 50  # the corner moved to the top right
    assert load_image(str(path)).shape == (3, 60, 40)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    array = read_image_array(str(path))
    assert array.dtype == np.uint8 and array.shape == (48, 64, 3)
    expected = np.round(ramp.astype(float) * 255 / 65535)
    assert np.abs(array[..., 0].astype(float) - expected).max() <= 0.5 + 1e-9
    assert 120 < array.mean() < 135  # clipping made nearly everything 255


@pytest.mark.parametrize("ext,codec", [("mkv", "libx264"), ("webm", "libvpx-vp9"), ("mp4", "libx264")])
def test_truncated_file_is_reported_for_every_container(tmp_path, ext, codec):
    """Half the data missing: the frames stop long before the declared duration, in any container."""
    path = write_video(tmp_path / f"full.{ext}", 100, 10.0, codec=codec, faststart=ext == "mp4", noise=True)
    assert len(decode_frames(path)) == 10
    data = open(path, "rb").read()
    cut = tmp_path / f"half.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    for seek in (True, False):
        with pytest.raises(MediaError, match="truncated") as info:
            decode_frames(str(cut), seek=seek)
        assert info.value.path == str(cut)


def test_jpeg_with_corrupt_scan_data_is_an_error(shared_data, tmp_path):
    source = sorted((shared_data / "image" / "coco_karpathy_test").glob("*.jpg"))[0]
    data = bytearray(source.read_bytes())
    scan = data.find(b"\xff\xda")
    rng = np.random.default_rng(0)
    for pos in rng.integers(scan + 200, len(data) - 100, 20):
        data[pos] = int(rng.integers(0, 256))
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(bytes(data))
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # Pillow alone decodes it without complaint
    with pytest.raises(MediaError, match="corrupt JPEG data") as info:
        load_image(str(path))
    assert info.value.path == str(path)
    read_image_array(str(source))  # the intact file is fine


@pytest.mark.parametrize("fps", [0, -1.0, float("nan"), "x"])
def test_bad_fps_is_one_config_error_not_a_media_failure(tmp_path, fps):
    from xmodal.data.media import InvalidFpsError

    path = write_video(tmp_path / "v.mp4", 20, 10.0)
    policy = MediaPolicy()
    with pytest.raises(InvalidFpsError, match="data.fps") as info:
        policy.call(load_clip, path, fps=fps)
    assert isinstance(info.value, XModalError) and not isinstance(info.value, MediaError)
    assert policy.skipped == 0 and not policy.failures  # no video is blamed
    with pytest.raises(XModalError, match="data.fps"):
        decode_frames(path, fps=fps)


def test_video_shorter_than_its_audio_is_not_truncated(tmp_path):
    """Matroska: 5 s of video, 10 s of audio. The video track's DURATION tag says 5 s: no false alarm."""
    from videos import write_video_with_longer_audio

    path = write_video_with_longer_audio(tmp_path / "av.mkv")
    decoded = decode_frames(path)  # the grid follows the container's 10 s; the video's tail ends at 4.9 s
    assert decoded.timestamps[:5] == [0.0, 1.0, 2.0, 3.0, 4.0] and max(decoded.timestamps) == pytest.approx(4.9)
    assert decoded.grid == 10 and len(decoded) == 7
