"""The generated video world is bit-reproducible: same arguments, same bytes, whatever runs beside it."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from xmodal.errors import XModalError
from xmodal.synth.world import mp4_bytes, rgb_to_yuv420p

GENERATE = """
import sys
from xmodal.synth import write_video_set
write_video_set(sys.argv[1], n=10, n_test=3, n_order=4, seed=7, fps=2.0, seconds_per_event=3.0, progress=False)
"""


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "synth.json"}


def test_two_concurrent_generations_in_separate_processes_are_byte_identical(tmp_path):
    # different thread settings on purpose: nothing the encoder does may depend on them
    envs = [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "4"}]
    procs = [subprocess.Popen([sys.executable, "-c", GENERATE, str(tmp_path / f"run{k}")],
                              env={**os.environ, **env}) for k, env in enumerate(envs)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = _digests(tmp_path / "run0"), _digests(tmp_path / "run1")
    assert sum(name.endswith(".mp4") for name in a) == 10
    assert a == b


def test_clips_filmed_by_worker_processes_are_the_bytes_one_process_writes(tmp_path):
    from xmodal.synth import write_video_set

    kw = dict(n=12, n_test=3, n_order=4, seed=7, fps=2.0, seconds_per_event=3.0, progress=False)
    write_video_set(tmp_path / "one", workers=1, **kw)
    write_video_set(tmp_path / "three", workers=3, **kw)
    a, b = _digests(tmp_path / "one"), _digests(tmp_path / "three")
    assert sum(name.endswith(".mp4") for name in a) == 12
    assert a == b  # clips, captions and per-clip metadata (frame counts included)
    meta = (tmp_path / "three" / "meta" / "train.jsonl").read_text().splitlines()
    assert all('"frames": 12' in line for line in meta)  # 2 events x 3 s x 2 fps


def test_workers_must_be_positive(tmp_path):
    from xmodal.synth import write_video_set

    with pytest.raises(XModalError, match="workers=0"):
        write_video_set(tmp_path, n=4, n_test=1, seed=0, fps=2.0, seconds_per_event=3.0, progress=False, workers=0)


def test_colour_conversion_is_bt601_limited_range_with_2x2_chroma():
    frames = np.zeros((1, 4, 4, 3), np.uint8)
    frames[0, :, 2:] = 255  # left half black, right half white
    yuv = rgb_to_yuv420p(frames)
    assert yuv.shape == (1, 6, 4)  # 4 luma rows, then Cb (2x2) and Cr (2x2) packed as 2 rows of 4
    assert yuv[0, :4].tolist() == [[16, 16, 235, 235]] * 4
    assert (yuv[0, 4:] == 128).all()
    frames[0] = (255, 0, 0)  # pure red
    y, cb, cr = rgb_to_yuv420p(frames)[0].reshape(-1)[[0, 16, 20]]
    assert (y, cb, cr) == (81, 90, 240)
    with pytest.raises(XModalError, match="height by 4"):
        rgb_to_yuv420p(np.zeros((1, 6, 4, 3), np.uint8))


def test_encoding_a_noisy_clip_again_and_again_gives_the_same_bytes_and_the_frames_back():
    """crf's macroblock tree gave 3-5 different files in 25 encodes of a clip like this one."""
    from xmodal.synth import events as ev
    from xmodal.synth.camera import Camera, film

    story = ev.sample_story(np.random.default_rng(3), n_events=2)
    frames = film(ev.render_clip(story, 2.0, 3.0, 64), Camera((1.05, 0.95, 1.0), 0.5, 2.5, 11))
    other = film(ev.render_clip(ev.sample_story(np.random.default_rng(4)), 2.0, 3.0, 64), Camera((1, 1, 1), 0, 2, 12))
    first = mp4_bytes(frames, 2.0)
    for i in range(12):  # other allocations in between change what the encoder's memory holds
        junk = np.random.default_rng(i).integers(0, 255, size=int(1000 + 7000 * i), dtype=np.uint8)
        mp4_bytes(other, 2.0)
        assert mp4_bytes(frames, 2.0) == first, f"encode {i + 2} differs"
        del junk
    with av.open(io.BytesIO(first)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4.0
