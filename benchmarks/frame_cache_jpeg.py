"""What a lossy (JPEG) frame cache changes against the lossless default, on the 13 shared MSR-VTT clips.

    python benchmarks/frame_cache_jpeg.py      # xmodal-tiny --pretrained xmodal, 12 frames at 1 fps

Builds an npy cache and a JPEG cache (quality 90) at the model's input size, encodes every clip
from each and from direct decoding, and prints as JSON the max |feature| and |similarity|
differences to direct decoding (npy must be exactly 0), the text->video ranks and the cache sizes.
Reads ../shared/data beside the checkout (or $XMODAL_TEST_DATA).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from xmodal.backbones.factory import create_backbone
from xmodal.cli.extract_frames import read_manifest
from xmodal.data.frame_cache import extract_frames, open_frame_cache
from xmodal.data.media import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, clip_transform, load_clip

DATA = Path(os.environ.get("XMODAL_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def main() -> None:
    torch.set_num_threads(1)
    manifest = DATA / "video" / "msrvtt_1kA" / "manifest.json"
    items = read_manifest(str(manifest))
    captions = [r["caption"] for r in json.loads(manifest.read_text())]
    model = create_backbone("xmodal-tiny", pretrained="xmodal").eval()
    visual = model.clip.visual
    transform = clip_transform(model.image_size, getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN,
                               getattr(visual, "image_std", None) or OPENAI_DATASET_STD)
    work = Path(tempfile.mkdtemp(prefix="xmodal-jpeg-vs-npy-"))
    try:
        caches = {"direct": None}
        for fmt in ("npy", "jpeg"):
            extract_frames(items, work / fmt, fmt=fmt, size=model.image_size, progress=False, bench_clips=0)
            caches[fmt] = open_frame_cache(work / fmt)
        sizes = {f: sum(p.stat().st_size for p in (work / f).rglob("*") if p.is_file()) for f in ("npy", "jpeg")}

        def video_features(cache):
            feats = []
            for item in items:
                pixels, mask = load_clip(item["media"], num_frames=12, transform=transform, cache=cache)
                frames = model.encode_video(pixels[None], mask[None])[0]
                m = mask[:, None].float()
                feats.append(torch.nn.functional.normalize((frames * m).sum(0) / m.sum(), dim=-1))
            return torch.stack(feats)

        with torch.no_grad():
            text = torch.nn.functional.normalize(model.encode_text(model.tokenize(captions)), dim=-1)
            video = {k: video_features(c) for k, c in caches.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sims = {k: text @ v.T for k, v in video.items()}

    def t2v_ranks(s):
        return " ".join(str(int((s[i] > s[i, i]).sum()) + 1) for i in range(len(s)))

    def diff(fmt):
        return {"max_abs_feature_diff": float((video[fmt] - video["direct"]).abs().max()),
                "max_abs_similarity_diff": float((sims[fmt] - sims["direct"]).abs().max()),
                "mean_abs_similarity_diff": float((sims[fmt] - sims["direct"]).abs().mean())}

    print(json.dumps({"clips": len(items), "model": "xmodal-tiny --pretrained xmodal",
                      "input_size": model.image_size, "npy_vs_direct": diff("npy"), "jpeg_vs_direct": diff("jpeg"),
                      "t2v_ranks": {k: t2v_ranks(s) for k, s in sims.items()}, "cache_bytes": sizes}, indent=1))


if __name__ == "__main__":
    main()
