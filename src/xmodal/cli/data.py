"""`xmodal data inspect DATASET --root DIR --split SPLIT [--json]`: read a split's annotations
and report what a run would see (items, captions, missing media, the first item) before
any decoding or training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

from xmodal.errors import XModalError


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect dataset annotations",
                                   description="Dataset tools: read annotation files the way training and evaluation do.")
    parser.set_defaults(func=run, data_parser=parser)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    ins = sub.add_parser(
        "inspect",
        help="count items, captions and missing media of a split",
        description="Read DATASET's SPLIT and print items, captions, missing media and the first item. "
                    "DATASET: msrvtt, msvd, didemo, activitynet, lsmdc, flickr30k, coco, jsonl "
                    "(own data), or the path of a .jsonl file.",
    )
    ins.add_argument("dataset", help="dataset name or a .jsonl file of own data")
    ins.add_argument("--root", help="dataset folder (media under videos/ or the folder itself)")
    ins.add_argument("--split", default="test", help="split to read (default: test)")
    ins.add_argument("--annotations", help="folder with the annotation files (default: ROOT, then ROOT/annotations)")
    ins.add_argument("--annotation-file", help="read this annotation file instead of looking one up")
    ins.add_argument("--media-dir", help="folder with the video/image files (default: ROOT/videos, ROOT)")
    ins.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="reader option, e.g. order=annotation (didemo) or max_captions=0 (coco); repeatable")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ins.set_defaults(func=run, data_parser=parser)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _options(pairs: List[str]) -> Dict[str, Any]:
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise XModalError(f"--option {pair!r}: expected KEY=VALUE")
        opts[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return opts


def inspect_dataset(args) -> Dict[str, Any]:
    """The summary `data inspect` prints, as a dict (the --json output)."""
    from xmodal.data.readers import read_dataset

    name, root = args.dataset, args.root
    opts = _options(args.option)
    if name.lower().endswith(".jsonl") and os.path.isfile(name):
        name, root = "jsonl", root or name
    if root is None:
        raise XModalError("data inspect: --root DIR is required (the dataset folder)")
    for key, value in (("annotations", args.annotations), ("annotation_file", args.annotation_file),
                       ("media_dir", args.media_dir)):
        if value is not None:
            opts[key] = value
    spec = read_dataset(name, root, args.split, **opts)
    first = spec.items[0].to_dict() if spec.items else None
    return {
        "dataset": spec.name,
        "split": spec.split,
        "items": len(spec.items),
        "captions": spec.num_captions,
        "missing_media": spec.missing_media,
        "first_item": first,
        "kind": spec.kind,
        "max_frames": spec.max_frames,
        "multi_caption_eval": spec.multi_caption_eval,
        "paragraph": spec.paragraph,
        "root": spec.root,
        "sources": spec.sources,
        "notes": spec.notes,
    }


def _print_text(info: Dict[str, Any], out) -> None:
    items, caps = info["items"], info["captions"]
    per = caps / items if items else 0.0
    print(f"{info['dataset']} {info['split']}: {items} items, {caps} captions ({per:.1f} per item), "
          f"{info['missing_media']} missing media", file=out)
    print(f"  annotations: {', '.join(info['sources'])}", file=out)
    print(f"  root: {info['root']}", file=out)
    print(f"  kind: {info['kind']}; max frames: {info['max_frames']}; "
          f"multi-caption eval: {'yes' if info['multi_caption_eval'] else 'no'}"
          f"{'; paragraphs' if info['paragraph'] else ''}", file=out)
    if info["notes"]:
        print(f"  notes: {info['notes']}", file=out)
    first = info["first_item"]
    if first is None:
        return
    exists = os.path.exists(first["media"])
    print("first item:", file=out)
    print(f"  id: {first['id']}", file=out)
    print(f"  media: {first['media']}{'' if exists else ' (missing)'}", file=out)
    if first["start"] is not None or first["end"] is not None:
        print(f"  segment: {first['start']} - {first['end']} s", file=out)
    for k, caption in enumerate(first["captions"][:5]):
        print(f"  caption {k}: {caption}", file=out)
    if len(first["captions"]) > 5:
        print(f"  ... {len(first['captions']) - 5} more captions", file=out)
    for k, desc in enumerate(first["descriptions"][:3]):
        print(f"  description {k}: {desc}", file=out)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data_command", None) != "inspect":
        args.data_parser.print_help(sys.stderr)
        return 2
    info = inspect_dataset(args)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        _print_text(info, sys.stdout)
    return 0
