"""Curves of a run directory: training loss per update and R@1 per evaluated epoch.

Reads `metrics.csv` (written by `xmodal train`) and draws PNGs with matplotlib's Agg
backend, so it works on machines without a display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from xmodal.errors import XModalError


def _floats(rows: List[Dict[str, str]], key: str):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v not in (None, ""):
            xs.append(int(float(r["step"])))
            ys.append(float(v))
    return xs, ys


def _save(fig, path: Path) -> None:
    """Render to a temporary file in the same folder, then rename (atomic, umask permissions)."""
    from xmodal.atomic import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def _finish(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label a curve plot over updates, write it atomically, free the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("update")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # updates are whole numbers
    lo, hi = ax.get_xlim()
    if hi - lo < 2:  # one evaluation: widen so the locator has integers to tick
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None) -> List[Path]:
    """Write `loss.png` (loss vs update, with per-epoch means) and `recall.png` (t2v/v2t R@1
    vs update at each evaluation) into `out_dir` (default: the run directory)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from xmodal.engine.train import read_metrics_csv

    run_dir = Path(run_dir)
    rows = read_metrics_csv(run_dir / "metrics.csv")
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not steps and not epochs:
        raise XModalError(f"{run_dir / 'metrics.csv'}: no step or epoch rows to plot")
    from xmodal.atomic import ensure_dir

    out = ensure_dir(Path(out_dir) if out_dir else run_dir)
    written = []

    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        x, y = _floats(steps, "loss")
        ax.plot(x, y, lw=1, alpha=0.6, label="loss per update")
        per_epoch: Dict[int, List[float]] = {}
        last_step: Dict[int, int] = {}
        for r in steps:
            if r.get("loss"):
                e = int(r["epoch"])
                per_epoch.setdefault(e, []).append(float(r["loss"]))
                last_step[e] = int(r["step"])
        if per_epoch:
            ax.plot([last_step[e] for e in sorted(per_epoch)],
                    [sum(v) / len(v) for _, v in sorted(per_epoch.items())], "o-", label="epoch mean")
        written.append(_finish(fig, ax, "symmetric InfoNCE loss", f"training loss: {run_dir.name}", out / "loss.png"))

    if epochs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("t2v/R@1", "text-to-visual R@1"), ("v2t/R@1", "visual-to-text R@1")):
            x, y = _floats(epochs, key)
            if x:
                ax.plot(x, y, "o-", label=label)
        written.append(_finish(fig, ax, "R@1 (%)", f"retrieval R@1: {run_dir.name}", out / "recall.png"))
    return written
