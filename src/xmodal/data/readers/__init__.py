"""Annotation readers, one module per benchmark, behind one entry point: `read_dataset`.

Every reader is `read(root, split, *, annotations=None, annotation_file=None,
media_dir=None, **its own options) -> DatasetSpec`:
`root` is the dataset folder (media under root/videos or root), `annotations` a folder
with the annotation files (default: root, then root/annotations), `annotation_file` one
file that overrides the lookup and `media_dir` where the media files are.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict

from xmodal.data.items import DatasetSpec
from xmodal.data.readers import activitynet, didemo, jsonl, karpathy, lsmdc, msrvtt, msvd
from xmodal.errors import DataError, XModalError

READERS: Dict[str, Callable[..., DatasetSpec]] = {
    "msrvtt": msrvtt.read,
    "msvd": msvd.read,
    "didemo": didemo.read,
    "activitynet": activitynet.read,
    "lsmdc": lsmdc.read,
    "flickr30k": karpathy.read_flickr30k,
    "coco": karpathy.read_coco,
    "jsonl": jsonl.read,
}

ALIASES = {
    "msr-vtt": "msrvtt",
    "msr_vtt": "msrvtt",
    "anet": "activitynet",
    "activitynet_captions": "activitynet",
    "activitynet-captions": "activitynet",
    "f30k": "flickr30k",
    "flickr": "flickr30k",
    "mscoco": "coco",
    "own": "jsonl",
}

# other names users reach for; all mean the media folder
_MEDIA_ALIASES = ("video_dir", "image_dir", "videos", "images")


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in READERS:
        raise XModalError(f"unknown dataset {name!r}; expected one of {', '.join(READERS)} (or a .jsonl file)")
    return key


def read_dataset(name: str, root, split: str, drop_missing: bool = False, **opts) -> DatasetSpec:
    """Read split `split` of dataset `name` under `root`.

    `drop_missing=True` removes items whose media file does not exist (the count stays in
    `missing_media`); by default they are kept and only counted, so annotation files can
    be inspected without the media.
    """
    key = canonical_name(name)
    reader = READERS[key]
    for alias in _MEDIA_ALIASES:
        if alias in opts:
            value = opts.pop(alias)
            if opts.get("media_dir") is not None and value is not None:
                raise XModalError(f"{key}: give the media folder once (media_dir or {alias})")
            opts["media_dir"] = value
    params = inspect.signature(reader).parameters
    accepted = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise XModalError(f"{key}: unknown option(s) {', '.join(unknown)}; this reader takes {', '.join(accepted)}")
    if not os.path.exists(root):
        raise DataError(f"{key}: dataset root {root} does not exist")
    spec = reader(root, split, **opts)
    if drop_missing and spec.missing_media:
        spec.items = [item for item in spec.items if os.path.exists(item.media)]
    return spec


__all__ = ["READERS", "ALIASES", "read_dataset", "canonical_name"]
