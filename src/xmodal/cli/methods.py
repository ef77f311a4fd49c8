"""`xmodal methods`: every registered method with its trainable / total parameter counts.

Counts come from `AdaptedModel.parameter_counts()` with each method's default config on a
randomly initialised backbone (no weights needed). The backbone is built once; methods are
added, measured and deleted in turn on the same `AdaptedModel`.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence

from xmodal.errors import XModalError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "methods",
        help="list parameter-efficient methods with their parameter counts",
        description="List every registered method with trainable parameters, total parameters and the "
        "trainable percentage, measured with the method's default config on a randomly initialised backbone.",
    )
    p.add_argument("--backbone", default="ViT-B-32", metavar="NAME",
                   help="architecture to measure on (default: ViT-B-32; e.g. ViT-B-16, ViT-L-14, xmodal-tiny)")
    p.add_argument("--method", action="append", dest="methods", metavar="NAME",
                   help="only this method (repeatable); default: all registered methods")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    p.set_defaults(func=run)


def method_rows(backbone, names: Optional[Sequence[str]] = None) -> List[Dict]:
    """One row per method: method, trainable, total, percent (and error if it cannot be built)."""
    from xmodal.methods import AdaptedModel, list_methods, make_config

    registered = list_methods()
    names = list(names) if names else registered
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise XModalError(f"--method: unknown method(s) {unknown}; registered: {registered}")
    model = AdaptedModel(backbone)
    rows = []
    for name in names:
        try:
            model.add_method(make_config(name), adapter_name=name, activate=True)
        except Exception as exc:  # one broken method must not hide the others' counts
            msg = str(exc) if isinstance(exc, XModalError) else f"{type(exc).__name__}: {exc}"
            rows.append({"method": name, "trainable": None, "total": None, "percent": None, "error": msg})
            if name in model.methods:
                model.delete_method(name)
            continue
        trainable, total = model.parameter_counts()
        model.delete_method(name)
        rows.append({
            "method": name,
            "trainable": trainable,
            "total": total,
            "percent": 100.0 * trainable / total if total else 0.0,
        })
    return rows


def format_table(rows: List[Dict], backbone_name: str = "") -> str:
    """Method names left-aligned, counts right-aligned with thousands separators."""
    header = ("method", "trainable", "total", "% trainable")
    body = []
    for r in rows:
        if r.get("error"):
            body.append((r["method"], "-", "-", "-", f"  error: {r['error']}"))
        else:
            body.append((r["method"], f"{r['trainable']:,}", f"{r['total']:,}", _percent(r["percent"]), ""))
    widths = [max([len(header[i])] + [len(b[i]) for b in body]) for i in range(4)]

    def fmt(cols) -> str:
        cells = [cols[0].ljust(widths[0])] + [cols[i].rjust(widths[i]) for i in (1, 2, 3)]
        return ("  ".join(cells) + (cols[4] if len(cols) > 4 else "")).rstrip()

    lines = [f"backbone: {backbone_name} (random init, default config of each method)"] if backbone_name else []
    lines.append(fmt(header))
    lines.append(fmt(tuple("-" * w for w in widths)))
    lines.extend(fmt(b) for b in body)
    return "\n".join(lines)


def _percent(p: float) -> str:
    return f"{p:.2f}%" if p >= 1 or p == 0 else f"{p:.4f}%"


def run(args: argparse.Namespace) -> int:
    from xmodal.backbones.factory import create_backbone

    backbone = create_backbone(args.backbone, seed=0)
    rows = method_rows(backbone, args.methods)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, args.backbone))
    return 1 if any(r.get("error") for r in rows) else 0
