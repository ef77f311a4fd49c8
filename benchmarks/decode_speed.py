"""Decode time and peak memory of picking N frames from long videos (seeking vs front-to-back).

    python benchmarks/decode_speed.py                      # the full table (first run generates the videos)
    python benchmarks/decode_speed.py --quick              # 10-minute files only
    python benchmarks/decode_speed.py --no-baseline        # skip the slow front-to-back reference

Videos are generated once with PyAV (libx264 ultrafast, 1 frame per second, a keyframe every
10 s of video: x264's default keyframe interval at 25 fps, and YouTube-like), and kept under
benchmarks/.decode_speed_videos/ (git-ignored via its own .gitignore). Each content frame is a
textured picture that shifts every frame and changes colour every minute, so P-frames carry
real data. Low frame rate keeps generation cheap; note that a 25-fps file with the same
keyframe interval decodes up to 25x more frames per pick (the front-to-back cost scales the
same way).

Every measurement runs in a fresh subprocess pinned to ONE core (`sched_setaffinity`, which
FFmpeg's thread count follows) that imports only `xmodal.data.media` (not torch): `seconds` is
the wall time of `decode_frames(path, num_frames=N)` (1 fps grid, uniform N, as training and
evaluation use it), `peak_rss_mb` the process's peak resident set (VmHWM) at the end,
`baseline_rss_mb` its RSS before decoding (interpreter + numpy + PyAV). Mode "seek" is the
default decoder; "front-to-back" (`seek=False`) is the decoder before seeking existed (same
frames, every frame decoded). Results: a table on stdout and benchmarks/results/decode_speed.json.
Target: <= 2 s and <= 300 MB for 12 frames of a 2-hour 1280x720 file on one core.
"""

from __future__ import annotations

import argparse
import fractions
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT / "benchmarks" / ".decode_speed_videos"
RESULT = ROOT / "benchmarks" / "results" / "decode_speed.json"
FPS = 1
KEYFRAME_EVERY_S = 10
SIZES = {"320x240": (320, 240), "1280x720": (1280, 720)}
LENGTHS = {"10min": 600, "2h": 7200}


def video_path(length: str, size: str) -> Path:
    return VIDEOS / f"{length}_{size}_{FPS}fps_gop{KEYFRAME_EVERY_S}s.mp4"


def generate(path: Path, seconds: int, width: int, height: int) -> None:
    """Encode `seconds` s at FPS with a keyframe every KEYFRAME_EVERY_S s (written to a temp name first)."""
    import av
    import numpy as np

    from xmodal.atomic import atomic_file

    rng = np.random.default_rng(0)
    # a smooth random texture (upsampled noise), twice as wide so shifting it never wraps visibly
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 8 + 2, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, : 2 * width]
    with atomic_file(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fractions.Fraction(FPS))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            gop = KEYFRAME_EVERY_S * FPS
            stream.options = {"preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            for i in range(seconds * FPS):
                shift = (i * 7) % width
                frame = texture[:, shift: shift + width].copy()
                frame[..., i // 60 % 3] //= 2  # the colour changes every minute
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def ensure_videos(lengths, sizes) -> None:
    VIDEOS.mkdir(parents=True, exist_ok=True)
    (VIDEOS / ".gitignore").write_text("*\n")
    for length in lengths:
        for size in sizes:
            path = video_path(length, size)
            if path.exists():
                continue
            began = time.perf_counter()
            generate(path, LENGTHS[length], *SIZES[size])
            print(f"generated {path.name} ({path.stat().st_size / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - began:.0f}s", flush=True)


_CHILD = r"""
import importlib.util, json, os, resource, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import xmodal.errors  # light; media.py is loaded by path so the torch-importing package __init__s stay out
spec = importlib.util.spec_from_file_location("xmodal_media", sys.argv[1])
media = importlib.util.module_from_spec(spec); sys.modules[spec.name] = media; spec.loader.exec_module(media)

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024.0

import av, numpy  # noqa: F401  (imported before the baseline is taken)
baseline = rss("VmRSS")
began = time.perf_counter()
got = media.decode_frames(sys.argv[2], num_frames=int(sys.argv[3]), seek=sys.argv[4] == "seek",
                          timeout=float(sys.argv[5]))
seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "peak_rss_mb": rss("VmHWM"), "baseline_rss_mb": baseline,
                  "frames": len(got), "decoded": got.decoded, "seeks": got.seeks,
                  "frame_shape": list(got.frames.shape[1:])}))
"""


def measure(path: Path, num_frames: int, mode: str, timeout: float) -> dict:
    media = ROOT / "src" / "xmodal" / "data" / "media.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(media), str(path), str(num_frames), mode, str(timeout)],
                         capture_output=True, text=True, env=env, timeout=timeout + 120)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed for {path.name} ({mode}, {num_frames}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10-minute files only")
    parser.add_argument("--no-baseline", action="store_true", help="skip the front-to-back (seek=False) runs")
    parser.add_argument("--frames", type=int, nargs="+", default=[12, 64])
    parser.add_argument("--timeout", type=float, default=600.0, help="decode budget per measurement (s)")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args(argv)

    lengths = ["10min"] if args.quick else list(LENGTHS)
    ensure_videos(lengths, SIZES)
    rows = []
    for length in lengths:
        for size in SIZES:
            path = video_path(length, size)
            for n in args.frames:
                modes = ["seek"] + ([] if args.no_baseline or n != args.frames[0] else ["front-to-back"])
                for mode in modes:
                    r = measure(path, n, mode, args.timeout)
                    row = {"video": length, "size": size, "fps": FPS, "keyframe_every_s": KEYFRAME_EVERY_S,
                           "num_frames": n, "mode": mode, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                             for k, v in r.items()}}
                    rows.append(row)
                    print(f"{length:>6} {size:>9} N={n:<3} {mode:<13} {r['seconds']:8.3f} s  "
                          f"peak {r['peak_rss_mb']:7.1f} MB (baseline {r['baseline_rss_mb']:.1f})  "
                          f"decoded {r['decoded']} frames, {r['seeks']} seeks", flush=True)

    target = next((r for r in rows if (r["video"], r["size"], r["num_frames"], r["mode"]) ==
                   ("2h", "1280x720", 12, "seek")), None)
    verdict = None
    if target is not None:
        verdict = {"seconds_ok": target["seconds"] <= 2.0, "memory_ok": target["peak_rss_mb"] <= 300.0}
    print()
    print("| video | size | N | mode | decode s | peak RSS MB | frames decoded | seeks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['video']} | {r['size']} | {r['num_frames']} | {r['mode']} | {r['seconds']:.3f} | "
              f"{r['peak_rss_mb']:.0f} | {r['decoded']} | {r['seeks']} |")
    if verdict is not None:
        met = {k: "met" if ok else "MISSED" for k, ok in verdict.items()}
        print(f"\ntarget (2h 1280x720, 12 frames, one core: <= 2 s, <= 300 MB): "
              f"time {met['seconds_ok']}, memory {met['memory_ok']}")

    from xmodal.atomic import atomic_write_json

    atomic_write_json(args.out, {
        "command": "python benchmarks/decode_speed.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus_visible": os.cpu_count(), "cores_used": 1},
        "videos": {"fps": FPS, "keyframe_every_s": KEYFRAME_EVERY_S, "codec": "h264 (libx264 ultrafast)"},
        "rows": rows, "target_2h_720p_12_frames": verdict,
    })
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
