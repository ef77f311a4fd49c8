"""`xmodal methods`: every registered method with its trainable / total parameter counts.

Counts come from `AdaptedModel.parameter_report()` with each method's default config (or,
with `--preset NAME`, the method's preset of that name where it has one) on a randomly
initialised backbone (no weights needed). The backbone is built once; methods are added,
measured and deleted in turn on the same `AdaptedModel`.

Two percentages: xmodal's (trainable / (backbone + the method's tensors)) and the papers'
(trainable / the backbone without the adapter; MSTA's paper also leaves out the text
token-embedding table), so a row can be held against a paper's table. The `paper` column is
the budget the preset reproduces (methods/presets.py), "-" where there is none.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence

from xmodal.errors import XModalError

#: registered but not a method of its own (it lists methods): left out of the default listing
NOT_LISTED = ("compose",)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "methods",
        help="list parameter-efficient methods with their parameter counts",
        description="List every registered method with trainable parameters, total parameters and the "
        "trainable percentage (xmodal's and the papers' denominator), measured with the method's default "
        "config (or a preset) on a randomly initialised backbone.",
    )
    p.add_argument("--backbone", default="ViT-B-32", metavar="NAME",
                   help="architecture to measure on (default: ViT-B-32; e.g. ViT-B-16, ViT-L-14, xmodal-tiny)")
    p.add_argument("--method", action="append", dest="methods", metavar="NAME",
                   help="only this method (repeatable); default: all registered methods")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="measure each method's preset of this name (e.g. 'paper': the budgets the papers list); "
                        "methods without it use their defaults")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    p.set_defaults(func=run)


def method_rows(backbone, names: Optional[Sequence[str]] = None, preset: Optional[str] = None) -> List[Dict]:
    """One row per method: method, preset, trainable, total, percent, percent_paper, paper_denominator,
    paper_count (and error if it cannot be built)."""
    from xmodal.methods import AdaptedModel, list_methods, make_config
    from xmodal.methods.presets import presets_of

    registered = list_methods()
    names = list(names) if names else [n for n in registered if n not in NOT_LISTED]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise XModalError(f"--method: unknown method(s) {unknown}; registered: {registered}")
    model = AdaptedModel(backbone)
    rows = []
    for name in names:
        chosen = presets_of(name).get(preset) if preset else None
        base = {"method": name, "preset": chosen.name if chosen else None,
                "paper_count": chosen.paper_count if chosen else None}
        try:
            model.add_method(make_config(name, preset=chosen.name if chosen else None), adapter_name=name,
                             activate=True)
        except Exception as exc:  # one broken method must not hide the others' counts
            msg = str(exc) if isinstance(exc, XModalError) else f"{type(exc).__name__}: {exc}"
            rows.append({**base, "trainable": None, "total": None, "percent": None, "percent_paper": None,
                         "error": msg})
            if name in model.methods:
                model.delete_method(name)
            continue
        report = model.parameter_report()
        model.delete_method(name)
        rows.append({**base, **{k: report[k] for k in ("trainable", "total", "percent", "percent_paper",
                                                       "paper_denominator")}})
    return rows


HEADER = ("method", "preset", "trainable", "paper", "total", "% trainable", "% paper")


def format_table(rows: List[Dict], backbone_name: str = "", preset: Optional[str] = None) -> str:
    """Method names left-aligned, counts right-aligned with thousands separators."""
    body = []
    for r in rows:
        paper = f"{r['paper_count']:,}" if r.get("paper_count") else "-"
        if r.get("error"):
            body.append((r["method"], r.get("preset") or "-", "-", paper, "-", "-", "-", f"  error: {r['error']}"))
        else:
            pct = _percent(r["percent_paper"]) + ("*" if r.get("paper_denominator") != "backbone" else "")
            body.append((r["method"], r.get("preset") or "-", f"{r['trainable']:,}", paper, f"{r['total']:,}",
                         _percent(r["percent"]), pct, ""))
    n = len(HEADER)
    widths = [max([len(HEADER[i])] + [len(b[i]) for b in body]) for i in range(n)]

    def fmt(cols) -> str:
        cells = [cols[0].ljust(widths[0]), cols[1].ljust(widths[1])] + [cols[i].rjust(widths[i]) for i in range(2, n)]
        return ("  ".join(cells) + (cols[n] if len(cols) > n else "")).rstrip()

    lines = []
    if backbone_name:
        what = f"preset {preset!r} where a method has it, else its default config" if preset else \
            "default config of each method"
        lines.append(f"backbone: {backbone_name} (random init, {what})")
    lines.append(fmt(HEADER))
    lines.append(fmt(tuple("-" * w for w in widths)))
    lines.extend(fmt(b) for b in body)
    lines.append("% trainable: of backbone + method; % paper: of the backbone without the adapter, as the papers "
                 "print it (* also without the text token-embedding table, as MSTA's paper); paper: the budget "
                 "the preset reproduces")
    return "\n".join(lines)


def _percent(p: float) -> str:
    return f"{p:.2f}%" if p >= 1 or p == 0 else f"{p:.4f}%"


def run(args: argparse.Namespace) -> int:
    from xmodal.backbones.factory import create_backbone

    backbone = create_backbone(args.backbone, seed=0)
    rows = method_rows(backbone, args.methods, getattr(args, "preset", None))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, args.backbone, getattr(args, "preset", None)))
    return 1 if any(r.get("error") for r in rows) else 0
