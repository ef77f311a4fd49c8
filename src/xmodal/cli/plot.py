"""`xmodal plot RUN_DIR`: loss and R@1 curves of a training run as PNG files."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw loss and R@1 curves of a run directory",
                              description="Read RUN_DIR/metrics.csv and write loss.png and recall.png.")
    p.add_argument("run_dir", help="directory written by `xmodal train`")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmodal.engine.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
