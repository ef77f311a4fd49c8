"""A tiny served world for the `xmodal serve` tests: generated videos and images, two adapters.

Videos show one palette colour per second (tests/videos.py), so a thumbnail's colour says
which second it was cut from. Three indices share the `xmodal-test` backbone (random
weights, explicitly): `plain` (no adapter), `ada` and `adb` (two different LoRA adapters
whose weights are perturbed so they change the embeddings). Features are encoded with each
index's own adapter, and `gallery.json` records captions and fps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for videos.py

from videos import write_video  # noqa: E402

SEED = 0
NUM_FRAMES = 4
HEAD = {"pooling": "text_conditioned", "temperature": 5.0, "normalize": False}
VIDEOS = {  # id -> (frames, fps, colour of second s)
    "sunrise": (20, 4.0, lambda s: 3 + s),
    "traffic": (24, 4.0, lambda s: 20 + 2 * s),
    "forest": (16, 4.0, lambda s: 40 + s),
    "ocean": (28, 4.0, lambda s: 50 + s),
}
IMAGES = {"red-square": (220, 30, 30), "blue-square": (30, 40, 220)}
CAPTIONS = {"sunrise": ["the sun rises over the hills"], "traffic": ["cars drive through a busy street"],
            "forest": ["wind moves the trees in a forest"], "ocean": ["waves roll onto a sandy beach"],
            "red-square": ["a red square"], "blue-square": ["a blue square on black"]}


def make_media(root: Path, codec: str = "libvpx", ext: str = "webm") -> Dict[str, str]:
    """Write the videos (VP8/WebM plays in every browser) and images; id -> absolute path."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for vid, (n, fps, colour) in VIDEOS.items():
        paths[vid] = write_video(root / f"{vid}.{ext}", n, fps, codec=codec, fmt=ext if ext == "webm" else None,
                                 color_of=lambda i, fps=fps, colour=colour: colour(int(i / fps)))
    for name, rgb in IMAGES.items():
        arr = np.zeros((40, 40, 3), np.uint8)
        arr[8:32, 8:32] = rgb
        Image.fromarray(arr).save(root / f"{name}.png")
        paths[name] = str(root / f"{name}.png")
    return paths


def make_backbone():
    from xmodal.serve.models import _create_backbone

    return _create_backbone("xmodal-test", "random", SEED, "cpu")


def make_adapter(out: Path, seed: int) -> Path:
    """A LoRA adapter whose tensors are random (so it really changes both towers)."""
    from xmodal.methods import AdaptedModel
    from xmodal.methods.base import make_config

    model = AdaptedModel(make_backbone())
    model.add_method(make_config("lora", r=4), "default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_adapter(out)
    return out


def build_index(out: Path, media: Dict[str, str], adapter=None, captions: bool = True,
                num_frames: int = NUM_FRAMES, segments=None) -> Path:
    """Encode every item with the index's model (+ adapter) and save a GalleryIndex."""
    from xmodal.data.media import load_clip
    from xmodal.encoding import encode_videos
    from xmodal.methods import AdaptedModel
    from xmodal.retrieval_index import GalleryIndex

    model = AdaptedModel(make_backbone())
    if adapter is not None:
        model.load_adapter(adapter)
    segments = segments or {}
    pixels, masks = zip(*[load_clip(p, num_frames=num_frames, fps=1.0, transform=model.backbone.preprocess_val,
                                    start=segments.get(i, (None, None))[0], end=segments.get(i, (None, None))[1])
                          for i, p in media.items()])
    feats = encode_videos(model, torch.stack(pixels), torch.stack(masks), progress=False)
    meta = {"backbone": "xmodal-test", "pretrained": "random", "seed": SEED,
            "adapter": str(adapter) if adapter else None, "head": dict(HEAD), "max_words": 32,
            "dataset": "generated", "split": "test", "fps": 1.0}
    if segments:
        meta["segments"] = [list(segments[i]) if i in segments else None for i in media]
    caps = [CAPTIONS[i] for i in media] if captions else None
    GalleryIndex(feats, torch.stack(masks), list(media), list(media.values()), meta, captions=caps).save(out)
    return out


def build_world(root: Path) -> Dict[str, Path]:
    """media/, adapters/{a,b}, indices/{plain,ada,adb}; returns name -> index folder (and 'media')."""
    media = make_media(root / "media")
    ada = make_adapter(root / "adapters" / "a", 1)
    adb = make_adapter(root / "adapters" / "b", 2)
    return {"plain": build_index(root / "indices" / "plain", media),
            "ada": build_index(root / "indices" / "ada", media, ada),
            "adb": build_index(root / "indices" / "adb", media, adb),
            "media": root / "media"}


_SESSION_WORLD: Dict[str, Path] = {}


def session_world(tmp_path_factory) -> Dict[str, Path]:
    """One world per test session, shared by every serve test module (tests only read it)."""
    if not _SESSION_WORLD:
        _SESSION_WORLD.update(build_world(tmp_path_factory.mktemp("serve_world")))
    return dict(_SESSION_WORLD)


def specs(world: Dict[str, Path]):
    return [f"{name}={world[name]}" for name in ("plain", "ada", "adb")]


if __name__ == "__main__":  # build a world to look at: python tests/e2e/serve_world.py OUT
    w = build_world(Path(sys.argv[1]))
    print(json.dumps({k: str(v) for k, v in w.items()}, indent=1))
