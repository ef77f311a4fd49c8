"""LSMDC 2016 movie retrieval (Rohrbach et al.), task-1 annotation files.

Tab-separated, no header, six fields per line:
`CLIP_ID \\t START_ALIGNED \\t END_ALIGNED \\t START_EXTRACTED \\t END_EXTRACTED \\t SENTENCE`,
e.g. `0001_American_Beauty_00.00.51.926-00.00.54.129 \\t 00.00.51.926 \\t ...`.
Files: `LSMDC16_annos_training.csv` (train), `LSMDC16_annos_val.csv` (val),
`LSMDC16_challenge_1000_publictect.csv` (the 1000-clip test set). A clip id may repeat
in the training file; its sentences become the captions of one item. Clips are already
cut from the movies, so items play whole; the times are only validated (format, and
each end after its start). Video files are
`<movie>/<clip_id>.avi` (movie = clip id without its time range) or `<clip_id>.avi`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    MediaFinder,
    annotation_dirs,
    check_split,
    fail,
    find_annotation,
    finish,
    media_dirs,
    read_text,
)

NAME = "lsmdc"
SPLITS = ("train", "val", "test")
FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
_TIME = re.compile(r"^\d+(\.\d+){0,3}$")  # hh.mm.ss.mmm (or plain seconds)


def movie_of(clip_id: str) -> str:
    """'0001_American_Beauty_00.00.51.926-00.00.54.129' -> '0001_American_Beauty'."""
    head, sep, _ = clip_id.rpartition("_")
    return head if sep else clip_id


def seconds(t: str) -> Optional[float]:
    """'00.01.02.410' (hh.mm.ss.mmm) or plain seconds ('62.41') -> seconds; None if ambiguous."""
    parts = t.split(".")
    if len(parts) == 4:
        h, m, s, ms = (int(x) for x in parts)
        return h * 3600 + m * 60 + s + int(ms) / 10 ** len(parts[3])
    return float(t) if len(parts) <= 2 else None


def read_annotations(path: Path) -> Dict[str, List[str]]:
    """clip id -> sentences, in file order (a clip id on several lines: one item, all sentences)."""
    clips: Dict[str, List[str]] = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            raise fail(path, f"line {n}", "6 tab-separated fields (clip id, 4 times, sentence)", f"{len(fields)} fields")
        clip_id, *times, sentence = (f.strip() for f in fields)
        if not clip_id:
            raise fail(path, f"line {n} field 1", "a clip id", fields[0])
        for k, t in enumerate(times, 2):
            if not _TIME.match(t):
                raise fail(path, f"line {n} field {k}", "a time like 00.00.51.926", t)
        for k in (0, 2):  # (aligned start, end), (extracted start, end)
            start, end = seconds(times[k]), seconds(times[k + 1])
            if start is not None and end is not None and not start < end:
                raise fail(path, f"line {n} field {k + 3}", f"an end time after the start {times[k]}", times[k + 1])
        if not sentence:
            raise fail(path, f"line {n} field 6", "a non-empty sentence", fields[5])
        clips.setdefault(clip_id, []).append(sentence)
    return clips


def read(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None) -> DatasetSpec:
    """One item per clip id with all of its sentences."""
    check_split(NAME, split, SPLITS)
    path = find_annotation(NAME, split, [FILES[split]], annotation_dirs(root, annotations), annotation_file)
    base = media_dirs(root, media_dir)
    finder = MediaFinder(base, (".avi", ".mp4", ".mkv", ".webm"))
    items = []
    for clip_id, sentences in read_annotations(path).items():
        dirs = [d / movie_of(clip_id) for d in base] + list(base)
        items.append(Item(id=clip_id, media=finder.find([clip_id], dirs=dirs), kind="video", captions=sentences))
    return finish(NAME, split, items, root, [path], max_frames=12, multi_caption_eval=False)
