"""Own data: one JSON object per line.

    {"video": "clips/a.mp4", "captions": ["a dog runs", "..."], "start": 3.0, "end": 9.5}
    {"image": "/data/img/b.jpg", "captions": ["a red car"], "descriptions": ["..."], "id": "b"}
    {"video": "clips/c.mp4", "captions": ["..."], "descriptions": {"spatial": ["..."], "temporal": ["..."]}}

Exactly one of `video` / `image`; `captions` is a non-empty list (a single `caption`
string is accepted too); `descriptions` (a list, or an object by kind: spatial /
temporal / generic), `id`, `start`, `end` (seconds, videos only, finite, start < end) are
optional. Any other key is an error (a typo such as "strat" would otherwise silently play
the whole video). Relative media paths are resolved against the JSONL file's directory
(or `media_dir`); `a.mp4` and `./a.mp4` are the same file, and one media file with the
same segment on two lines is an error naming both (put all its captions on one line).
The default id is the normalised media path as written, plus the segment if one is
given. `root` is the JSONL file itself, or a directory holding `{split}.jsonl`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    annotation_dirs,
    as_seconds,
    as_text,
    check_keys,
    check_segment,
    fail,
    find_annotation,
    finish,
    json_lines,
)
from xmodal.data.readers.descriptions import parse_descriptions
from xmodal.errors import DataError

NAME = "jsonl"
KEYS = ("video", "image", "captions", "caption", "descriptions", "id", "start", "end")


def _number(value, path, where) -> Optional[float]:
    return None if value is None else as_seconds(value, path, where)


def _texts(value, path, where, required: bool) -> List[str]:
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or (required and not value):
        raise fail(path, where, "a non-empty list of strings" if required else "a list of strings", value)
    return [as_text(v, path, f"{where}[{i}]") for i, v in enumerate(value)]


def parse_line(record, path: Path, n: int, base: Path) -> Item:
    """One JSONL record -> Item; errors name the file, the line and the field."""
    where = f"line {n}"
    if not isinstance(record, dict):
        raise fail(path, where, 'an object with "video" or "image" and "captions"', record)
    check_keys(record, KEYS, path, where)
    has_video, has_image = "video" in record, "image" in record
    if has_video == has_image:
        raise fail(path, where, 'exactly one of the fields "video" and "image"', sorted(record))
    kind = "video" if has_video else "image"
    rel = as_text(record[kind], path, f"{where} field {kind!r}")
    if "captions" in record and "caption" in record:
        raise fail(path, where, 'one of the fields "captions" and "caption", not both', sorted(record))
    if "captions" in record:
        captions = _texts(record["captions"], path, f"{where} field 'captions'", required=True)
    elif "caption" in record:
        captions = _texts(record["caption"], path, f"{where} field 'caption'", required=True)
    else:
        raise fail(path, where, 'a "captions" list', sorted(record))
    descriptions: List[str] = []
    kinds: List[str] = []
    if record.get("descriptions") is not None:
        descriptions, kinds = parse_descriptions(record["descriptions"], path, f"{where} field 'descriptions'")
    start = _number(record.get("start"), path, f"{where} field 'start'")
    end = _number(record.get("end"), path, f"{where} field 'end'")
    if kind == "image" and (start is not None or end is not None):
        raise fail(path, where, "no start/end on an image", {"start": start, "end": end})
    check_segment(start, end, path, where)
    item_id = record.get("id")
    if item_id is None:
        rel = os.path.normpath(rel)
        item_id = rel if start is None and end is None else f"{rel}#{start if start is not None else ''}-{end if end is not None else ''}"
    elif isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and str(item_id).strip():
        item_id = str(item_id).strip()
    else:
        raise fail(path, f"{where} field 'id'", "a non-empty string or integer", item_id)
    media = os.path.abspath(base / os.path.expanduser(rel))
    return Item(id=item_id, media=media, kind=kind, captions=captions, descriptions=descriptions, start=start,
                end=end, description_kinds=kinds)


def read_items(path: Path, media_dir=None) -> List[Item]:
    base = Path(media_dir) if media_dir is not None else path.parent
    items: List[Item] = []
    first_line: Dict[str, int] = {}
    media_line: Dict[Tuple[str, Optional[float], Optional[float]], int] = {}
    for n, record in json_lines(path):
        item = parse_line(record, path, n, base)
        key = (item.media, item.start, item.end)
        if key in media_line:
            segment = "" if item.start is None and item.end is None else f" segment {item.start}-{item.end}"
            raise fail(path, f"line {n}", f"each media file{segment} once (also on line {media_line[key]}; "
                       "put all its captions on one line)", item.media)
        media_line[key] = n
        if item.id in first_line:
            raise fail(path, f"line {n} field 'id'", f"a unique id (also on line {first_line[item.id]})", item.id)
        first_line[item.id] = n
        items.append(item)
    if not items:
        raise DataError(f"{path}: expected at least one JSON line with media and captions, found none")
    return items


def read(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None,
         max_frames: int = 12) -> DatasetSpec:
    """Items of an own JSONL dataset (`root` = the file, or a folder with `{split}.jsonl`)."""
    if annotation_file is None and Path(root).is_file():
        annotation_file = root
    path = find_annotation(NAME, split, [f"{split}.jsonl"], annotation_dirs(root, annotations), annotation_file)
    if not isinstance(max_frames, int) or max_frames < 1:
        raise DataError(f"{NAME}: option max_frames={max_frames!r}; expected an integer >= 1")
    items = read_items(path, media_dir)
    multi = any(len(item.captions) > 1 for item in items)
    root_dir = Path(root).parent if Path(root).is_file() else Path(root)
    return finish(NAME, split, items, root_dir, [path], max_frames=max_frames, multi_caption_eval=multi)
