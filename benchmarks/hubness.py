"""Hubness of a text->video ranking: how many queries each gallery item wins, from saved similarities.

    xmodal eval ... --save-sims --out EVAL_DIR            # writes EVAL_DIR/sims.npy + sims_ids.json
    python benchmarks/hubness.py EVAL_DIR [EVAL_DIR ...] --out benchmarks/results/hubness.json

A *hub* is a gallery item that ranks near the top for many queries whatever they ask for; it takes
rank 1 from the right item and so lowers R@1 without hurting R@10 much (Radovanovic et al., JMLR
2010). For each folder this reports, over the t2v queries (rows of sims.npy):

- `top1_items`: how many distinct gallery items are ever ranked first (= the number of queries when
  every query gets its own item; small = a few items win most queries);
- `top1_max`: the most queries any one item wins, and `top1_share_top5`: the share of all queries
  won by the 5 biggest winners;
- `skew_N10`: skewness of the 10-occurrence N_10 (how often each item is in a query's top 10), the
  standard hubness measure (0 for a symmetric spread, large and positive with hubs);
- `R@1`: t2v recall@1 recomputed from the matrix (ground truth: the row's `item_id`), as a check;
- `run`: the provenance record of `metrics.json` in the same folder (weights, adapter, data, counts),
  printed as one line per folder; a folder without it is printed as "provenance unknown".

Ties: rank 1 is the first column among equal maxima, N_10 the first 10 of a stable sort; report
which folder and matrix each line comes from. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def ranking(sim: np.ndarray) -> np.ndarray:
    """Each row's columns from highest to lowest score (ties: the first column first)."""
    return np.argsort(-sim, axis=1, kind="stable")


def k_occurrence(order: np.ndarray, k: int) -> np.ndarray:
    """N_k from a `ranking`: for every column, the number of rows that have it among their top k."""
    return np.bincount(order[:, :k].ravel(), minlength=order.shape[1])


def skewness(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    sd = x.std()
    return float(((x - x.mean()) ** 3).mean() / sd ** 3) if sd > 0 else 0.0


def hubness(sim: np.ndarray, truth: List[int]) -> Dict[str, Any]:
    """The statistics above for one (queries x gallery) similarity matrix."""
    order = ranking(sim)
    n1 = k_occurrence(order, 1)
    wins = np.sort(n1)[::-1]
    top1 = order[:, 0]
    return {"queries": int(sim.shape[0]), "gallery": int(sim.shape[1]), "top1_items": int((n1 > 0).sum()),
            "top1_max": int(wins[0]), "top1_share_top5": round(float(wins[:5].sum() / sim.shape[0]), 4),
            "skew_N10": round(skewness(k_occurrence(order, 10)), 3),
            "R@1": round(100.0 * float(np.mean(top1 == np.asarray(truth))), 2)}


def provenance(folder: Path):
    """The `run` record `xmodal eval` wrote beside the matrix (weights, adapter, data, counts), or None."""
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        return None
    try:
        return json.loads(metrics.read_text()).get("run")
    except (OSError, ValueError, AttributeError) as exc:
        raise SystemExit(f"{metrics}: not a metrics.json written by `xmodal eval` ({exc})") from None


def load(folder: Path):
    """sims.npy and the column of each row's ground-truth item, from an `xmodal eval --save-sims` folder."""
    sims_path, ids_path = folder / "sims.npy", folder / "sims_ids.json"
    for p in (sims_path, ids_path):
        if not p.is_file():
            raise SystemExit(f"{p}: not found; write it with `xmodal eval ... --save-sims --out {folder}`")
    sim = np.load(sims_path, allow_pickle=False)
    ids = json.loads(ids_path.read_text())
    column = {item: j for j, item in enumerate(ids["columns"])}
    try:
        truth = [column[row["item_id"]] for row in ids["rows"]]
    except KeyError as exc:
        raise SystemExit(f"{ids_path}: row item {exc} is not among the columns") from None
    if sim.shape != (len(ids["rows"]), len(ids["columns"])):
        raise SystemExit(f"{sims_path}: shape {sim.shape}, expected {(len(ids['rows']), len(ids['columns']))} "
                         f"from {ids_path}")
    return sim, truth


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="`xmodal eval --save-sims` output folders")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    from xmodal.provenance import describe_run

    results = {}
    for f in args.folders:
        sim, truth = load(Path(f))
        results[str(f)] = {**hubness(sim, truth), "run": provenance(Path(f))}
    head = f"{'folder':<40}{'queries':>8}{'gallery':>8}{'top1 items':>11}{'top1 max':>9}{'top5 share':>11}{'skew N10':>9}{'R@1':>6}"
    print(head)
    for f, r in results.items():
        print(f"{f[-40:]:<40}{r['queries']:>8}{r['gallery']:>8}{r['top1_items']:>11}{r['top1_max']:>9}"
              f"{r['top1_share_top5']:>11.2f}{r['skew_N10']:>9.2f}{r['R@1']:>6.1f}")
    for f, r in results.items():  # what each line was measured on
        print(f"{f}: " + (describe_run(r["run"]) if r["run"] else "provenance unknown (no metrics.json beside sims.npy)"))
    if args.out:
        from xmodal.atomic import atomic_write_json

        atomic_write_json(args.out, {"command": "python benchmarks/hubness.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                     "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
