"""Annotation readers, one module per benchmark, behind one entry point: `read_dataset`.

Every reader is `read(root, split, *, annotations=None, annotation_file=None,
media_dir=None, **its own options) -> DatasetSpec`:
`root` is the dataset folder (media under root/videos or root), `annotations` a folder
with the annotation files (default: root, then root/annotations), `annotation_file` one
file that overrides the lookup and `media_dir` where the media files are.
`read_dataset` adds two options every reader takes: `descriptions` (a sidecar file, see
`readers.descriptions`) and `descriptions_per_kind`. `protocol_defaults(name)` gives a
benchmark's published evaluation settings (frames, words, splits, paragraph mode).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, Optional

from xmodal.data.items import DatasetSpec, missing_paths
from xmodal.data.readers import activitynet, didemo, jsonl, karpathy, lsmdc, msrvtt, msvd
from xmodal.data.readers import descriptions as descriptions_module
from xmodal.data.readers.protocols import PROTOCOLS
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


def protocol_defaults(name: str) -> Dict[str, Any]:
    """The evaluation protocol of benchmark `name` (aliases accepted), as a new dict:

    `num_frames`, `max_words`, `test_split`, `train_split` (split names as the reader
    takes them), `paragraph` (bool), `kind` ("video" | "image"), `captions_per_item`
    (test captions per item, None where it varies), `source` (where the numbers come from).
    The shipped configs/*.yaml use the same values; the CLI uses them unless overridden.
    """
    return dict(PROTOCOLS[canonical_name(name)])


def read_dataset(name: str, root, split: str, drop_missing: bool = False, *, descriptions=None,
                 descriptions_per_kind: Optional[int] = None, **opts) -> DatasetSpec:
    """Read split `split` of dataset `name` under `root`.

    `drop_missing=True` removes items whose media file does not exist (the count stays in
    `missing_media`, the paths in `dropped_media`); by default they are kept and only
    counted, so annotation files can be inspected without the media. Evaluation never
    drops silently: `EvalDataset` / `require_media` turn missing media into an error.
    `descriptions` is a sidecar file of per-item descriptions (`readers.descriptions`);
    `descriptions_per_kind` (int >= 1, None: all) is recorded on the spec for the datasets.
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
        takes = ", ".join(accepted + ["descriptions", "descriptions_per_kind"])
        raise XModalError(f"{key}: unknown option(s) {', '.join(unknown)}; this reader takes {takes}")
    if descriptions_per_kind is not None and (
            isinstance(descriptions_per_kind, bool) or not isinstance(descriptions_per_kind, int)
            or descriptions_per_kind < 1):
        raise XModalError(f"{key}: option descriptions_per_kind={descriptions_per_kind!r}; expected an integer >= 1 "
                          "(or none for all)")
    if not os.path.exists(root):
        raise DataError(f"{key}: dataset root {root} does not exist")
    spec = reader(root, split, **opts)
    if descriptions is not None:
        descriptions_module.attach(spec, descriptions)
    spec.descriptions_per_kind = descriptions_per_kind
    if drop_missing and spec.missing_media:
        absent = set(missing_paths(spec.items))
        spec.dropped = [item for item in spec.items if item.media in absent]
        spec.items = [item for item in spec.items if item.media not in absent]
    return spec


__all__ = ["READERS", "ALIASES", "PROTOCOLS", "read_dataset", "canonical_name", "protocol_defaults"]
