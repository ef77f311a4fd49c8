"""DiDeMo (Hendricks et al., 2017) as paragraph-to-video retrieval.

Two published forms are read:

- the original moment annotations `{split}_data.json`: a list of `{"video", "description",
  "times": [[s, e], ...], "annotation_id", ...}` where s/e index six 5-second segments
  (each annotator gave one [s, e]);
- the paragraph form `{split}_data_paragraph_fdvs.json`: `{video_id: {"caption",
  "caption_list", "timestamps", ...}}`.

All descriptions of a video become one paragraph. `order="time"` (default) sorts them by
the moment most annotators chose (ties keep annotation order), which reproduces the
published paragraph file exactly; `order="annotation"` keeps file order (CLIP4Clip).
A video stored under two extensions (x.mov and x.mp4) is one item, keyed by its stem, in
the moment form (which lists a video once per description); in the paragraph form, two
keys for one video are an error. Segment indices must satisfy 0 <= start <= end <= 5.
Items cover the annotated first 30 s; the protocol samples up to 64 frames.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Dict

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    MediaFinder,
    annotation_dirs,
    as_text,
    check_split,
    fail,
    find_annotation,
    finish,
    load_json,
    media_dirs,
    read_id_list,
    split_stem,
)
from xmodal.errors import DataError

NAME = "didemo"
SPLITS = ("train", "val", "test")
ORDERS = ("time", "annotation")
ANNOTATED_SECONDS = 30.0
NUM_SEGMENTS = 6  # 5-second segments of the annotated first 30 s


def _moment(times, path, where):
    """The [s, e] segment pair chosen by most annotators (first one on ties)."""
    if not isinstance(times, list) or not times:
        raise fail(path, where, "a non-empty list of [start, end] segment indices", times)
    counts: Dict[tuple, int] = {}
    for i, t in enumerate(times):
        if not (isinstance(t, list) and len(t) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in t)
                and 0 <= t[0] <= t[1] < NUM_SEGMENTS):
            raise fail(path, f"{where}[{i}]", f"[start, end] segment indices with 0 <= start <= end <= {NUM_SEGMENTS - 1}", t)
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    best = max(counts.values())
    return next(t for t, c in counts.items() if c == best)


def _read_moments(path: Path, data, order: str):
    if not isinstance(data, list):
        raise fail(path, "top level", "a list of moment annotations {video, description, times}", type(data).__name__)
    videos: Dict[str, dict] = {}
    for i, ann in enumerate(data):
        where = f"[{i}]"
        if not isinstance(ann, dict):
            raise fail(path, where, "an object with video, description and times", ann)
        filename = posixpath.normpath(as_text(ann.get("video"), path, f"{where}.video"))  # ./a.mov is a.mov
        text = as_text(ann.get("description"), path, f"{where}.description")
        moment = _moment(ann.get("times"), path, f"{where}.times")
        entry = videos.setdefault(split_stem(filename), {"files": [], "moments": []})
        if filename not in entry["files"]:
            entry["files"].append(filename)
        entry["moments"].append((moment, len(entry["moments"]), text))
    paragraphs = {}
    for vid, entry in videos.items():
        moments = sorted(entry["moments"]) if order == "time" else entry["moments"]
        paragraphs[vid] = (" ".join(m[2] for m in moments), entry["files"])
    return paragraphs


def _read_paragraphs(path: Path, data):
    if not isinstance(data, dict):
        raise fail(path, "top level", "an object of video id -> {caption, ...}", type(data).__name__)
    out = {}
    keys: Dict[str, str] = {}
    for vid, entry in data.items():
        if not isinstance(entry, dict):
            raise fail(path, f"key {vid!r}", "an object with a caption", entry)
        name = posixpath.normpath(vid)
        stem = split_stem(name)
        if stem in keys:
            raise fail(path, f"key {vid!r}", f"one entry per video (key {keys[stem]!r} is the same video)", vid)
        keys[stem] = vid
        out[stem] = (as_text(entry.get("caption"), path, f"key {vid!r}.caption"), [name] if stem != name else [])
    return out


def read(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None,
         order: str = "time") -> DatasetSpec:
    """One item per video with its paragraph (all descriptions joined)."""
    check_split(NAME, split, SPLITS)
    if order not in ORDERS:
        raise DataError(f"{NAME}: option order={order!r}; expected one of {', '.join(ORDERS)}")
    dirs = annotation_dirs(root, annotations)
    names = [f"{split}_data.json", f"{split}_data_paragraph_fdvs.json", f"{split}_data_paragraph.json"]
    path = find_annotation(NAME, split, names, dirs, annotation_file)
    data = load_json(path)
    paragraphs = _read_moments(path, data, order) if isinstance(data, list) else _read_paragraphs(path, data)
    sources = [path]
    list_path = find_annotation(NAME, split, [f"{split}_list.txt"], dirs, required=False)
    if list_path is not None:
        keep = {split_stem(v) for v in read_id_list(list_path)}
        paragraphs = {k: v for k, v in paragraphs.items() if k in keep}
        sources.append(list_path)
    finder = MediaFinder(media_dirs(root, media_dir))
    items = [
        Item(id=vid, media=finder.find([vid], files), kind="video", captions=[text], start=0.0, end=ANNOTATED_SECONDS)
        for vid, (text, files) in paragraphs.items()
    ]
    return finish(NAME, split, items, root, sources, max_frames=64, paragraph=True,
                  notes=f"paragraphs in {order} order; first {ANNOTATED_SECONDS:g} s annotated")
