"""Flickr30K and COCO image-text retrieval on the Karpathy splits.

Two published forms:

- `dataset_coco.json` / `dataset_flickr30k.json` (Karpathy & Fei-Fei): `{"images": [{"filename",
  "filepath" (COCO only), "split": train|restval|val|test, "sentences": [{"raw", "tokens", ...}],
  ...}], "dataset": ...}`; COCO's `restval` images join `train`.
- the line-per-image test files (`coco_caption_karpathy_test.jsonl`,
  `f30k_caption_karpathy_test*.jsonl`, or the same as one JSON list):
  `{"image": "<dir>/<file>.jpg", "caption": [...] or "..."}`.

Evaluation keeps the first `max_captions` (5) captions per image, the standard 5k/1k
protocol (a few COCO images have 6 or 7); `max_captions=0` keeps all. Image paths from
the line form are looked up under the media directory with their leading folders, then
with fewer of them, so a flat folder of images works too. Paths are normalised
(`./val2014/a.jpg` is `val2014/a.jpg`); line files with one caption string per record list
an image once per caption, so its records are merged; a repeated image in a file of
caption lists, or in the Karpathy JSON, is an error naming both records.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    IMAGE_EXTS,
    MediaFinder,
    annotation_dirs,
    as_text,
    check_split,
    fail,
    find_annotation,
    finish,
    json_lines,
    load_json,
    split_stem,
)
from xmodal.errors import DataError

SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
LINE_FILES = {
    "coco": ["coco_caption_karpathy_{split}.jsonl", "coco_karpathy_{split}.jsonl", "coco_karpathy_{split}.json"],
    "flickr30k": [
        "f30k_caption_karpathy_{split}.jsonl",
        "f30k_caption_karpathy_{split}_1cap.jsonl",
        "flickr30k_{split}.jsonl",
        "flickr30k_{split}.json",
    ],
}
IMAGE_SUBDIRS = {"coco": ("images",), "flickr30k": ("flickr30k-images", "flickr30k_images", "images")}


def _media_roots(root, media_dir, name) -> List[Path]:
    if media_dir is not None:
        return [Path(media_dir)]
    root = Path(root)
    return [root] + [root / s for s in IMAGE_SUBDIRS[name]]


class _PrefixDirs:
    """For rel 'a/b/x.jpg': base/a/b, base/b, base for every base (absolute str, memoised)."""

    def __init__(self, bases: List[Path]):
        self.bases = [os.path.abspath(b) for b in bases]
        self._memo: Dict[str, List[str]] = {}

    def __call__(self, rel: PurePosixPath) -> List[str]:
        key = str(rel.parent)
        if key not in self._memo:
            parts = rel.parent.parts
            self._memo[key] = [os.path.join(b, *parts[i:]) for b in self.bases for i in range(len(parts) + 1)]
        return self._memo[key]


def _read_karpathy(path: Path, data, split: str, prefix_dirs: _PrefixDirs, finder: MediaFinder) -> List[Item]:
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise fail(path, "top level", 'an object with an "images" list', type(data).__name__)
    wanted = KARPATHY_SPLITS[split]
    items = []
    seen: Dict[str, int] = {}
    for i, img in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            raise fail(path, where, "an object with filename, split and sentences", img)
        img_split = as_text(img.get("split"), path, f"{where}.split")
        if img_split not in ("train", "restval", "val", "test"):
            raise fail(path, f"{where}.split", "one of train, restval, val, test", img_split)
        if img_split not in wanted:
            continue
        filename = as_text(img.get("filename"), path, f"{where}.filename")
        sentences = img.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise fail(path, f"{where}.sentences", "a non-empty list of {raw, tokens}", sentences)
        captions = []
        for j, sent in enumerate(sentences):
            if not isinstance(sent, dict):
                raise fail(path, f"{where}.sentences[{j}]", "an object with raw", sent)
            captions.append(as_text(sent.get("raw"), path, f"{where}.sentences[{j}].raw"))
        if filename in seen:
            raise fail(path, f"{where}.filename", f"each image once (also images[{seen[filename]}])", filename)
        seen[filename] = i
        filepath = img.get("filepath")
        rel = PurePosixPath(filepath) / filename if isinstance(filepath, str) and filepath else PurePosixPath(filename)
        media = finder.find(filenames=[filename], dirs=prefix_dirs(rel))
        items.append(Item(id=split_stem(filename), media=media, kind="image", captions=captions))
    return items


def _line_records(path: Path, data=None):
    """(where, record) pairs from a JSONL file or a (loaded) JSON list."""
    if path.suffix == ".json":
        if not isinstance(data, list):
            raise fail(path, "top level", "a list of {image, caption}", type(data).__name__)
        return [(f"[{i}]", rec) for i, rec in enumerate(data)]
    return [(f"line {n}", rec) for n, rec in json_lines(path)]


def _read_lines(path: Path, data, prefix_dirs: _PrefixDirs, finder: MediaFinder) -> List[Item]:
    """One item per image. Files with one caption string per record (one record per caption)
    list an image on several records: their captions are merged. An image repeated in a
    file of caption lists is an error naming both records."""
    items: Dict[str, Item] = {}
    first: Dict[str, tuple] = {}  # normalised image path -> (where, caption given as a string)
    for where, rec in _line_records(path, data):
        if not isinstance(rec, dict):
            raise fail(path, where, 'an object with "image" and "caption"', rec)
        image = as_text(rec.get("image"), path, f"{where} field 'image'")
        caption = rec.get("caption", rec.get("captions"))
        if isinstance(caption, str):
            captions = [as_text(caption, path, f"{where} field 'caption'")]
        elif isinstance(caption, list) and caption:
            captions = [as_text(c, path, f"{where} field 'caption'[{k}]") for k, c in enumerate(caption)]
        else:
            raise fail(path, f"{where} field 'caption'", "a caption string or a non-empty list of them", caption)
        rel = PurePosixPath(posixpath.normpath(image.replace("\\", "/")))
        key = str(rel)
        if key in items:
            was, single = first[key]
            if not (single and isinstance(caption, str)):
                raise fail(path, where, f"each image once (also {was}; give all its captions in one record)", image)
            items[key].captions.extend(captions)
            continue
        first[key] = (where, isinstance(caption, str))
        media = finder.find(filenames=[rel.name], dirs=prefix_dirs(rel))
        items[key] = Item(id=split_stem(rel.name), media=media, kind="image", captions=captions)
    return list(items.values())


def read(name: str, root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None,
         max_captions: Optional[int] = None) -> DatasetSpec:
    """Items of a Karpathy split of `name` ('coco' or 'flickr30k')."""
    if name not in LINE_FILES:
        raise DataError(f"karpathy reader: unknown dataset {name!r}; expected coco or flickr30k")
    check_split(name, split, SPLITS)
    if max_captions is None:
        max_captions = 0 if split == "train" else 5
    if not isinstance(max_captions, int) or max_captions < 0:
        raise DataError(f"{name}: option max_captions={max_captions!r}; expected an integer >= 0 (0 keeps all)")
    names = [f"dataset_{name}.json"] + [n.format(split=split) for n in LINE_FILES[name]]
    path = find_annotation(name, split, names, annotation_dirs(root, annotations), annotation_file)
    bases = _media_roots(root, media_dir, name)
    finder = MediaFinder(bases, IMAGE_EXTS)
    data = load_json(path) if path.suffix == ".json" else None
    if isinstance(data, dict):
        items = _read_karpathy(path, data, split, _PrefixDirs(bases), finder)
    else:
        items = _read_lines(path, data, _PrefixDirs(bases), finder)
    if max_captions:
        for item in items:
            del item.captions[max_captions:]
    multi = any(len(item.captions) > 1 for item in items)
    return finish(name, split, items, root, [path], max_frames=1, multi_caption_eval=multi)


def read_coco(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None,
              max_captions: Optional[int] = None) -> DatasetSpec:
    """COCO 2014 on the Karpathy splits (113k train incl. restval / 5k val / 5k test)."""
    return read("coco", root, split, annotations=annotations, annotation_file=annotation_file,
                media_dir=media_dir, max_captions=max_captions)


def read_flickr30k(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None,
                   max_captions: Optional[int] = None) -> DatasetSpec:
    """Flickr30K on the Karpathy splits (29k train / 1k val / 1k test)."""
    return read("flickr30k", root, split, annotations=annotations, annotation_file=annotation_file,
                media_dir=media_dir, max_captions=max_captions)
