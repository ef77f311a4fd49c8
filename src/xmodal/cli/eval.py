"""`xmodal eval`: retrieval metrics of a backbone, zero-shot or with an adapter.

    xmodal eval --config FILE [key=value ...] [--adapter DIR]
    xmodal eval --dataset NAME --root DIR --split SPLIT --backbone NAME [--pretrained P]
                [--adapter DIR] [--pooling mean|text_conditioned] [--dual-softmax] [--out DIR]

Prints a t2v / v2t table and writes `metrics.json` (t2v/R@1, t2v/R@5, t2v/R@10, t2v/MdR,
t2v/MnR and the same under v2t/) into `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate retrieval (zero-shot or with an adapter)",
        description="Encode every caption and gallery item once, score all pairs with the pooling head, "
                    "print R@1/5/10, MdR and MnR both ways and write metrics.json.")
    add_model_data_args(p)
    p.add_argument("--dual-softmax", action="store_true", help="dual-softmax re-scoring at inference")
    p.add_argument("--out", default=None, help="directory for metrics.json (default: eval/<dataset>_<split>)")
    p.set_defaults(func=run)


def add_model_data_args(p: argparse.ArgumentParser) -> None:
    """Dataset, backbone, adapter and head options shared by `eval` and `index`."""
    p.add_argument("--config", default=None, help="YAML run config (data/model/head/eval sections are used)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--dataset", default=None, help="benchmark reader: msrvtt, msvd, didemo, activitynet, lsmdc, "
                                                   "coco, flickr30k, jsonl")
    p.add_argument("--root", default=None, help="dataset root (or the .jsonl file)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's eval_split, or test)")
    p.add_argument("--backbone", default=None, help="architecture, e.g. ViT-B-32 or xmodal-tiny")
    p.add_argument("--pretrained", default=None, help="OpenCLIP tag or local weights (see README)")
    p.add_argument("--adapter", default=None, help="adapter checkpoint directory (e.g. RUN/best)")
    p.add_argument("--pooling", choices=["mean", "text_conditioned"], default=None)
    p.add_argument("--temperature", type=float, default=None, help="tau of text-conditioned pooling")
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--max-words", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="visual items per encoding batch")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=None,
                   help="initialisation seed of a backbone without pretrained weights (default: train.seed)")


#: command-line flag -> (config section, key); a flag left unset keeps the config's value
_FLAG_TO_CONFIG = {
    "dataset": ("data", "dataset"), "root": ("data", "root"), "split": ("data", "eval_split"),
    "num_frames": ("data", "num_frames"), "max_words": ("data", "max_words"),
    "num_workers": ("data", "num_workers"), "backbone": ("model", "backbone"),
    "pretrained": ("model", "pretrained"), "pooling": ("head", "pooling"),
    "temperature": ("head", "temperature"), "batch_size": ("eval", "batch_size"),
    "device": ("train", "device"), "seed": ("train", "seed"),
}


def _config(args: argparse.Namespace):
    from xmodal.engine.config import load_config
    from xmodal.errors import XModalError

    if args.config is None:
        missing = [f"--{k}" for k in ("dataset", "root", "backbone") if getattr(args, k) is None]
        if missing:
            raise XModalError(f"give --config FILE, or all of --dataset, --root and --backbone (missing {missing})")
        if args.overrides:
            raise XModalError(f"key=value overrides {args.overrides} need --config")
    cfg = load_config(args.config, args.overrides) if args.config else load_config(None)
    for flag, (section, key) in _FLAG_TO_CONFIG.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if getattr(args, "dual_softmax", False):
        cfg.eval.dual_softmax = True
    from xmodal.engine.config import validate

    validate(cfg, args.config or "command line")
    return cfg


def run(args: argparse.Namespace) -> int:
    from xmodal.backbones.factory import create_backbone
    from xmodal.engine import distributed as dist_utils
    from xmodal.engine.config import write_text_atomic
    from xmodal.engine.evaluate import evaluate
    from xmodal.engine.train import build_data, head_from_config
    from xmodal.methods import AdaptedModel
    from xmodal.metrics import format_metrics_table

    cfg = _config(args)
    info = dist_utils.init_distributed(cfg.train.device)
    try:
        backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                                   device=info.device, seed=cfg.train.seed)
        model = AdaptedModel(backbone)
        if args.adapter:
            model.load_adapter(args.adapter)
        data = build_data(cfg, model, need_train=False)
        metrics = evaluate(model, data.eval, head_from_config(cfg.head), collate_fn=data.collate,
                           max_words=cfg.data.max_words, batch_size=cfg.eval.batch_size,
                           text_batch_size=cfg.eval.text_batch_size, num_workers=cfg.data.num_workers,
                           dual_softmax=cfg.eval.dual_softmax, device=info.device)
        if info.is_main:
            what = f"adapter {args.adapter}" if args.adapter else "zero-shot"
            print(f"{cfg.data.dataset} {cfg.data.eval_split}: {len(data.eval.texts)} texts, "
                  f"{len(data.eval.visuals)} items, {cfg.model.backbone} {what}, {cfg.head.pooling} pooling"
                  f"{', dual softmax' if cfg.eval.dual_softmax else ''}")
            print(format_metrics_table(metrics))
            out = Path(args.out) if args.out else Path("eval") / f"{cfg.data.dataset}_{cfg.data.eval_split}"
            write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            print(f"wrote {out / 'metrics.json'}")
    finally:
        dist_utils.cleanup()
    return 0
