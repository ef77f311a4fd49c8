"""`xmodal extract-frames`: decode a dataset split once into a frame cache.

Items come from an annotation reader (`DATASET --root DIR --split SPLIT`) or from a manifest
(`--manifest FILE`): a .jsonl with one object per line or a .json list, each with an id
(`id`, `video_id`, `image_id` or `coco_id`) and a media path (`media`, `file`, `video`,
`image` or `path`), optionally `kind`, `start`, `end`. Relative media paths resolve against
--root when given, else against the manifest's folder or the nearest ancestor folder in which
the first one exists (the shared data manifests name files from the data root).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from xmodal.errors import XModalError

_ID_KEYS = ("id", "video_id", "image_id", "coco_id")
_MEDIA_KEYS = ("media", "file", "video", "image", "path")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract-frames",
        help="decode a dataset split once into a frame cache",
        description="Decode every item of a split at --fps (CLIP4Clip's 1 frame per second), shrink frames so "
        "the shorter side is --size, and store them under --out with an index.json; load_clip reads them back "
        "through FrameCache. The default (npy) cache is lossless: evaluating from it equals decoding, provided "
        "--size is the model's input size (224 for ViT-B/*, 64 for xmodal-tiny, 32 for xmodal-test). "
        "Resumable: items already cached from an unchanged source are skipped. Exits with status 1 when any "
        "item failed (each failure is printed once), unless --skip-missing.",
    )
    p.add_argument("dataset", nargs="?", metavar="DATASET",
                   help="benchmark name (msrvtt, msvd, didemo, activitynet, lsmdc, coco, flickr30k, jsonl)")
    p.add_argument("--root", metavar="DIR", help="dataset folder (media and annotations)")
    p.add_argument("--split", default="test", metavar="SPLIT", help="split to extract (default: test)")
    p.add_argument("--annotations", metavar="DIR", help="folder with the annotation files (reader default)")
    p.add_argument("--media-dir", metavar="DIR", help="folder with the media files (reader default)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out items whose media file does not exist, and exit 0 even if some items failed "
                        "(default: missing files are failures, and any failure makes the exit status 1)")
    p.add_argument("--manifest", metavar="FILE", help="read items from a .jsonl/.json manifest instead of DATASET")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="cache directory to create or resume")
    p.add_argument("--num-frames", type=int, default=0, metavar="N",
                   help="keep N uniformly sampled frames per clip (default 0: every frame of the fps grid)")
    p.add_argument("--fps", type=float, default=1.0, help="sampling rate in frames per second (default 1)")
    p.add_argument("--format", dest="fmt", choices=("npy", "jpeg"), default="npy",
                   help="one uint8 .npy per clip, lossless (default), or JPEG files per frame (smaller, LOSSY: "
                        "metrics change slightly; see docs/DATA.md, 'Frame cache')")
    p.add_argument("--size", type=int, default=224,
                   help="shrink frames so the shorter side is this many pixels; use the model's input size "
                        "(0: keep the original size; default 224)")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="decoding processes (default 1)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of skipping it")
    p.add_argument("--bench-clips", type=int, default=8, metavar="M",
                   help="clips timed for the cache-vs-decode read comparison at the end (default 8; 0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _resolve_base(manifest: Path, first: Optional[str], root: Optional[str]) -> Path:
    if root:
        return Path(root)
    candidates = [manifest.parent, *manifest.parent.parents]
    if first and not os.path.isabs(first):
        for folder in candidates[:4]:
            if (folder / first).exists():
                return folder
    return manifest.parent


def read_manifest(path: str, root: Optional[str] = None) -> List[Dict[str, Any]]:
    """Item dicts (id, media, kind, start, end) from a .jsonl or .json manifest."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise XModalError(f"--manifest {file}: cannot read ({exc})") from None
    records: List[Any]
    try:
        if file.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except ValueError as exc:
        raise XModalError(f"--manifest {file}: not valid JSON ({exc})") from None
    if isinstance(records, dict):
        records = records.get("items", records.get("videos"))
    if not isinstance(records, list):
        raise XModalError(f"--manifest {file}: expected a list of objects (or JSON lines)")

    items = []
    base = None
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise XModalError(f"--manifest {file}: record {n} is not an object")
        item_id = next((rec[k] for k in _ID_KEYS if rec.get(k) is not None), None)
        media = next((rec[k] for k in _MEDIA_KEYS if isinstance(rec.get(k), str)), None)
        if media is None:
            raise XModalError(f"--manifest {file}: record {n} has no media path (one of {', '.join(_MEDIA_KEYS)})")
        if item_id is None:
            item_id = Path(media).stem
        if base is None:
            base = _resolve_base(file, media, root)
        full = media if os.path.isabs(media) else str((base / media).resolve())
        items.append({"id": str(item_id), "media": full, "kind": rec.get("kind"),
                      "start": rec.get("start"), "end": rec.get("end")})
    return items


def _items_from_dataset(args) -> List[Any]:
    if not args.root:
        raise XModalError("extract-frames: --root DIR is required with DATASET")
    from xmodal.data.readers import read_dataset

    opts = {}
    if args.annotations:
        opts["annotations"] = args.annotations
    if args.media_dir:
        opts["media_dir"] = args.media_dir
    spec = read_dataset(args.dataset, args.root, args.split, drop_missing=args.skip_missing, **opts)
    if args.skip_missing and getattr(spec, "missing_media", 0):
        print(f"{spec.missing_media} items left out: media file does not exist")
    items = list(getattr(spec, "items", spec))
    if not items:
        raise XModalError(f"extract-frames: {args.dataset} split {args.split!r} under {args.root}: "
                          f"no items with media found")
    return items


def run(args) -> int:
    from xmodal.data.frame_cache import SUMMARY_NAME, extract_frames

    if args.manifest and args.dataset:
        raise XModalError("extract-frames: give DATASET or --manifest, not both")
    if args.manifest:
        items = read_manifest(args.manifest, args.root)
        if args.skip_missing:
            kept = [item for item in items if os.path.exists(item["media"])]
            if len(kept) < len(items):
                print(f"{len(items) - len(kept)} items left out: media file does not exist")
            items = kept
        if not items:
            raise XModalError(f"--manifest {args.manifest}: no items with media found")
    elif args.dataset:
        items = _items_from_dataset(args)
    else:
        raise XModalError("extract-frames: give DATASET (with --root/--split) or --manifest FILE")
    if args.workers < 1:
        raise XModalError(f"--workers: expected at least 1, got {args.workers}")

    summary = extract_frames(
        items, args.out, num_frames=args.num_frames, fps=args.fps, fmt=args.fmt, size=args.size,
        workers=args.workers, strict=args.strict, progress=not args.no_progress,
        bench_clips=args.bench_clips, echo=print,
    )
    for media, reason in summary["failures"].items():
        print(f"failed: {media}: {reason}", file=sys.stderr)
    print(f"summary written to {Path(args.out) / SUMMARY_NAME}")
    if summary["failed"] and not args.skip_missing:
        print(f"extract-frames: {summary['failed']} item(s) failed (listed above); the cache lacks them",
              file=sys.stderr)
        return 1
    return 0
