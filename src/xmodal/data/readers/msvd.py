"""MSVD (Chen & Dolan, 2011) in the CLIP4Clip / collaborative-experts layout.

- `raw-captions.pkl`: a pickled dict video_id -> list of captions, each a list of tokens.
  It is read with an unpickler that only builds dicts, lists and strings, so a crafted
  file cannot run code.
- `train_list.txt` / `val_list.txt` / `test_list.txt`: one video id per line
  (1200 / 100 / 670 videos).
- `test_gt.json`: the test captions as JSON (video id -> list of caption strings), used
  when `raw-captions.pkl` is absent.

Evaluation is multi-caption: every caption of a test video is a query (~40 per video).
Videos are `{video_id}.avi` (re-encoded `.mp4` also accepted) under videos/, YouTubeClips/ or root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    MediaFinder,
    annotation_dirs,
    as_text_list,
    check_split,
    fail,
    find_annotation,
    finish,
    load_json,
    media_dirs,
    read_id_list,
)
from xmodal.errors import DataError
from xmodal.safe_pickle import builtin_globals, restricted_loads

NAME = "msvd"
SPLITS = ("train", "val", "test")
CAPTIONS_PKL = "raw-captions.pkl"
TEST_GT = "test_gt.json"
_ALLOWED = builtin_globals(("dict", "list", "str"))  # the shared restricted unpickler refuses every other global


def load_raw_captions(path: Path) -> Dict[str, List[str]]:
    """video id -> captions (tokens joined by spaces) from a raw-captions.pkl file."""
    try:
        data = restricted_loads(Path(path).read_bytes(), _ALLOWED)
    except Exception as exc:  # any failure of an untrusted pickle is a malformed file
        raise DataError(f"{path}: expected a pickled dict of video id -> list of token lists ({exc})") from None
    if not isinstance(data, dict):
        raise fail(path, "top level", "a dict of video id -> list of token lists", type(data).__name__)
    captions: Dict[str, List[str]] = {}
    for vid, caps in data.items():
        if not isinstance(vid, str) or not isinstance(caps, list) or not caps:
            raise fail(path, f"key {vid!r}", "a string id mapping to a non-empty list of captions", type(caps).__name__)
        out = []
        for i, cap in enumerate(caps):
            if isinstance(cap, list) and cap and all(isinstance(t, str) for t in cap):
                text = " ".join(t.strip() for t in cap if t.strip())
            elif isinstance(cap, str):
                text = cap.strip()
            else:
                raise fail(path, f"key {vid!r} caption {i}", "a list of token strings", cap)
            if not text:
                raise fail(path, f"key {vid!r} caption {i}", "at least one non-empty token", cap)
            out.append(text)
        captions[vid] = out
    return captions


def load_test_gt(path: Path) -> Dict[str, List[str]]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise fail(path, "top level", "an object of video id -> list of captions", type(data).__name__)
    return {vid: as_text_list(caps, path, f"key {vid!r}") for vid, caps in data.items()}


def read(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None) -> DatasetSpec:
    """Items of an MSVD split, each with all its captions."""
    check_split(NAME, split, SPLITS)
    dirs = annotation_dirs(root, annotations)
    finder = MediaFinder(media_dirs(root, media_dir, ("videos", "YouTubeClips")), (".avi", ".mp4", ".mkv", ".webm"))
    if annotation_file is not None:
        cap_path = find_annotation(NAME, split, [], dirs, annotation_file)
    else:
        names = [CAPTIONS_PKL, TEST_GT] if split == "test" else [CAPTIONS_PKL]
        cap_path = find_annotation(NAME, split, names, dirs)
    if cap_path.suffix == ".json":
        captions = load_test_gt(cap_path)
    else:
        captions = load_raw_captions(cap_path)
    list_path = find_annotation(NAME, split, [f"{split}_list.txt"], dirs, required=cap_path.suffix != ".json")
    ids = read_id_list(list_path) if list_path is not None else list(captions)
    items = []
    for vid in ids:
        if vid not in captions:
            raise DataError(f"{cap_path}: expected captions for video {vid!r} listed in {list_path}, found none")
        items.append(Item(id=vid, media=finder.find([vid]), kind="video", captions=captions[vid]))
    sources = [cap_path] + ([list_path] if list_path is not None else [])
    return finish(NAME, split, items, root, sources, max_frames=12, multi_caption_eval=True)
