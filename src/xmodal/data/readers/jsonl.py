"""Own data: one JSON object per line.

    {"video": "clips/a.mp4", "captions": ["a dog runs", "..."], "start": 3.0, "end": 9.5}
    {"image": "/data/img/b.jpg", "captions": ["a red car"], "descriptions": ["..."], "id": "b"}

Exactly one of `video` / `image`; `captions` is a non-empty list (a single `caption`
string is accepted too); `descriptions`, `id`, `start`, `end` (seconds, videos only) are
optional. Relative media paths are resolved against the JSONL file's directory (or
`media_dir`). The default id is the media path as written, plus the segment if one is
given. `root` is the JSONL file itself, or a directory holding `{split}.jsonl`.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Dict, List, Optional

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import annotation_dirs, as_text, fail, find_annotation, finish
from xmodal.errors import DataError

NAME = "jsonl"


def _number(value, path, where) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
        raise fail(path, where, "a number of seconds >= 0", value)
    return float(value)


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
    has_video, has_image = "video" in record, "image" in record
    if has_video == has_image:
        raise fail(path, where, 'exactly one of the fields "video" and "image"', sorted(record))
    kind = "video" if has_video else "image"
    rel = as_text(record[kind], path, f"{where} field {kind!r}")
    if "captions" in record:
        captions = _texts(record["captions"], path, f"{where} field 'captions'", required=True)
    elif "caption" in record:
        captions = _texts(record["caption"], path, f"{where} field 'caption'", required=True)
    else:
        raise fail(path, where, 'a "captions" list', sorted(record))
    descriptions = _texts(record.get("descriptions"), path, f"{where} field 'descriptions'", required=False)
    start = _number(record.get("start"), path, f"{where} field 'start'")
    end = _number(record.get("end"), path, f"{where} field 'end'")
    if kind == "image" and (start is not None or end is not None):
        raise fail(path, where, "no start/end on an image", {"start": start, "end": end})
    if start is not None and end is not None and end <= start:
        raise fail(path, f"{where} field 'end'", f"a time after start={start:g}", end)
    item_id = record.get("id")
    if item_id is None:
        item_id = rel if start is None and end is None else f"{rel}#{start if start is not None else ''}-{end if end is not None else ''}"
    elif isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and str(item_id).strip():
        item_id = str(item_id).strip()
    else:
        raise fail(path, f"{where} field 'id'", "a non-empty string or integer", item_id)
    media = os.path.abspath(base / os.path.expanduser(rel))
    return Item(id=item_id, media=media, kind=kind, captions=captions, descriptions=descriptions, start=start, end=end)


def read_items(path: Path, media_dir=None) -> List[Item]:
    base = Path(media_dir) if media_dir is not None else path.parent
    items: List[Item] = []
    first_line: Dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        item = parse_line(record, path, n, base)
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
