"""`xmodal synth images|videos|shifted-images`: write a generated dataset folder."""

from __future__ import annotations

import argparse
import shlex

DEFAULTS = {  # kind -> (n, split-test)
    "images": (20000, 1000),
    "videos": (900, 200),
    "shifted-images": (1200, 200),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="generate the embedded image/video-text world",
        description="Write a seeded synthetic dataset (PNG/MP4 files + train.jsonl/test.jsonl) to --out.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    helps = {
        "images": "pretraining image-caption corpus (1-3 objects, attribute captions)",
        "videos": "video-text set (target look and wording) with ordered events; main test + order subset",
        "shifted-images": "image-text set with new backgrounds and phrasings, several captions per image",
    }
    for kind, (n, n_test) in DEFAULTS.items():
        p = kinds.add_parser(kind, help=helps[kind], description=helps[kind])
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--n", type=int, default=n, help=f"total number of items, train + test (default {n})")
        p.add_argument("--split-test", type=int, default=n_test, dest="split_test",
                       help=f"how many of them go to test.jsonl (default {n_test})")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--image-size", type=int, default=64)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if kind == "videos":
            p.add_argument("--split-order", type=int, default=100, dest="split_order",
                           help="of --n, how many go to test_order.jsonl: groups of --group-size clips that "
                                "differ only in event order (default 100)")
            p.add_argument("--events", type=int, default=2, help="events per clip, 1-3 (default 2)")
            p.add_argument("--fps", type=float, default=4.0)
            p.add_argument("--seconds-per-event", type=float, default=4.0)
            p.add_argument("--group-size", type=int, default=4,
                           help="clips per hard-negative group (base, swapped, reversed, both)")
            p.add_argument("--captions-train", type=int, default=3)
            p.add_argument("--captions-test", type=int, default=1)
            p.add_argument("--codec", default="auto", help="libx264, mpeg4 or auto")
            p.add_argument("--workers", type=int, default=None,
                           help="processes filming and encoding clips (default: one per CPU, at most 8); "
                                "the files are the same bytes for any number")
        else:
            p.add_argument("--captions", type=int, default=2 if kind == "images" else 5,
                           help="captions per image")
        p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The full command that reproduces this run (every option explicit)."""
    parts = ["xmodal", "synth", args.kind, "--out", str(args.out), "--n", str(args.n),
             "--split-test", str(args.split_test), "--seed", str(args.seed), "--image-size", str(args.image_size)]
    if args.kind == "videos":
        parts += ["--split-order", str(args.split_order), "--events", str(args.events), "--fps", f"{args.fps:g}", "--seconds-per-event",
                  f"{args.seconds_per_event:g}", "--group-size", str(args.group_size), "--captions-train",
                  str(args.captions_train), "--captions-test", str(args.captions_test), "--codec", args.codec]
    else:
        parts += ["--captions", str(args.captions)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from xmodal.synth import world

    common = dict(n=args.n, n_test=args.split_test, seed=args.seed, image_size=args.image_size,
                  progress=not args.no_progress, command=command_line(args))
    if args.kind == "videos":
        summary = world.write_video_set(
            args.out, fps=args.fps, seconds_per_event=args.seconds_per_event, events=args.events,
            group_size=args.group_size, captions_train=args.captions_train, captions_test=args.captions_test,
            codec=args.codec, n_order=args.split_order, workers=args.workers, **common)
    elif args.kind == "images":
        summary = world.write_image_corpus(args.out, captions_per_image=args.captions, **common)
    else:
        summary = world.write_shifted_images(args.out, captions_per_image=args.captions, **common)
    counts = summary["counts"]
    order = f", {counts['test_order']} order-subset" if counts.get("test_order") else ""
    print(f"wrote {args.kind} to {args.out}: {counts['train']} train, {counts['test']} test{order} items "
          f"in {summary['seconds']:.1f} s")
    return 0
