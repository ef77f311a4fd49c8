"""ActivityNet Captions (Krishna et al., 2017) as paragraph-to-video retrieval.

`train.json`, `val_1.json`, `val_2.json`: `{"v_<youtube id>": {"duration", "timestamps":
[[s, e], ...], "sentences": [...]}}`. Each video's sentences form one paragraph; `val_1`
is the test set of the retrieval protocol (4917 videos), `test` is an alias for it.
`order="annotation"` (default) joins sentences in file order as CLIP4Clip does;
`order="time"` sorts them by start time first. Video files are `v_<id>.mp4` or `<id>.mp4`
(any common extension); the protocol samples up to 64 frames over the whole video.
Timestamps must be finite seconds >= 0; a few published ones have start > end (train.json:
2) or end more than 1 s past the duration. Items play the whole video, so these only matter
for `order="time"`: they are counted in a warning and in `notes`.
`v_x` and `x` both listed are one video: an error naming both keys.
"""

from __future__ import annotations

import logging
import numbers
from typing import Dict, List

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    MediaFinder,
    annotation_dirs,
    as_seconds,
    as_text,
    check_split,
    fail,
    find_annotation,
    finish,
    load_json,
    media_dirs,
)
from xmodal.errors import DataError

NAME = "activitynet"
SPLITS = ("train", "val_1", "val_2", "test", "val")
FILES = {"train": "train.json", "val_1": "val_1.json", "val_2": "val_2.json", "test": "val_1.json", "val": "val_1.json"}
ORDERS = ("annotation", "time")

log = logging.getLogger(__name__)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def read(root, split: str = "val_1", *, annotations=None, annotation_file=None, media_dir=None,
         order: str = "annotation") -> DatasetSpec:
    """One item per video whose single caption is the paragraph of all its sentences."""
    check_split(NAME, split, SPLITS)
    if order not in ORDERS:
        raise DataError(f"{NAME}: option order={order!r}; expected one of {', '.join(ORDERS)}")
    path = find_annotation(NAME, split, [FILES[split]], annotation_dirs(root, annotations), annotation_file)
    data = load_json(path)
    if not isinstance(data, dict):
        raise fail(path, "top level", "an object of video id -> {duration, timestamps, sentences}", type(data).__name__)
    finder = MediaFinder(media_dirs(root, media_dir))
    items: List[Item] = []
    bare_ids: Dict[str, str] = {}
    odd: List[str] = []  # published files have a few; they only affect order="time"
    for vid, entry in data.items():
        where = f"key {vid!r}"
        if not isinstance(entry, dict):
            raise fail(path, where, "an object with duration, timestamps and sentences", entry)
        sentences = entry.get("sentences")
        stamps = entry.get("timestamps")
        if not isinstance(sentences, list) or not sentences:
            raise fail(path, f"{where}.sentences", "a non-empty list of strings", sentences)
        if not isinstance(stamps, list) or len(stamps) != len(sentences):
            raise fail(path, f"{where}.timestamps", f"a list of {len(sentences)} [start, end] pairs (one per sentence)", stamps)
        for i, t in enumerate(stamps):
            if not (isinstance(t, list) and len(t) == 2):
                raise fail(path, f"{where}.timestamps[{i}]", "[start, end] in seconds", t)
            start, end = (as_seconds(x, path, f"{where}.timestamps[{i}]") for x in t)
            duration = entry.get("duration")
            if start > end or (_is_number(duration) and end > duration + 1.0):
                odd.append(f"{where}.timestamps[{i}]")
        if "duration" in entry:
            as_seconds(entry["duration"], path, f"{where}.duration")
        texts = [as_text(s, path, f"{where}.sentences[{i}]") for i, s in enumerate(sentences)]
        if order == "time":
            texts = [t for _, _, t in sorted(zip((s[0] for s in stamps), range(len(texts)), texts))]
        bare = vid[2:] if vid.startswith("v_") else vid
        if bare in bare_ids:
            raise fail(path, where, f"one entry per video (key {bare_ids[bare]!r} is the same video)", vid)
        bare_ids[bare] = vid
        stems = [vid, bare] if bare != vid else [vid, f"v_{vid}"]
        items.append(Item(id=vid, media=finder.find(stems), kind="video", captions=[" ".join(texts)]))
    notes = f"paragraphs in {order} order; val_1 is the retrieval test set"
    if odd:
        log.warning("%s: %d sentence timestamps have start > end or end past the duration (first: %s); "
                    "items play the whole video, only order='time' uses them", path, len(odd), odd[0])
        notes += f"; {len(odd)} odd sentence timestamps (start > end or end > duration)"
    return finish(NAME, split, items, root, [path], max_frames=64, paragraph=True, notes=notes)
