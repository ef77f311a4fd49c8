"""`xmodal eval`: retrieval metrics of a backbone, zero-shot or with an adapter.

    xmodal eval --config FILE [key=value ...] [--adapter DIR]
    xmodal eval --dataset NAME --root DIR [--split SPLIT] --backbone NAME --pretrained P
                [--adapter DIR [--force]] [--pooling mean|text_conditioned] [--dual-softmax]
                [--ties mean|optimistic|pessimistic] [--v2t-protocol best_caption|clip4clip_groups]
                [--allow-missing] [--frame-cache DIR] [--save-sims] [--save-embeddings DIR] [--out DIR]

Prints one line saying what was measured (weights and their hash, adapter, head, frames/words
and where they came from, gallery, tie policy, device), the t2v / v2t table (t2i / i2t for
images) and writes `metrics.json` into `--out`: the metric keys (`t2v/R@1` ... `v2t/MnR`,
R@Sum, tied-query counts; image galleries also `t2i/...`, `i2t/...`) and a `run` object with
the same provenance (see xmodal.provenance).

Settings precedence: an explicit flag (or a key of the --config file / its overrides) >
what the adapter recorded at training time > the dataset's protocol default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

PRETRAINED_FORMS = ("an OpenCLIP tag (e.g. openai, laion2b_s34b_b79k), a checkpoint file or Hugging Face CLIPModel "
                    "folder, `xmodal` (the packaged xmodal-tiny weights) or `random` (random initialisation, for "
                    "tests only: every printed table says so)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate retrieval (zero-shot or with an adapter)",
        description="Encode every caption and gallery item once, score all pairs with the pooling head, "
                    "print R@1/5/10, R@Sum, MdR and MnR both ways and write metrics.json with its provenance.")
    add_model_data_args(p)
    p.add_argument("--dual-softmax", action="store_true", help="dual-softmax re-scoring at inference")
    p.add_argument("--ties", default=None, choices=["mean", "optimistic", "pessimistic"],
                   help="tie policy for reporting (default mean: expected rank under random tie-breaking, "
                        "CLIP4Clip's numbers whenever nothing is tied; optimistic = CLIP4Clip's compute_metrics)")
    p.add_argument("--v2t-protocol", default=None, choices=["best_caption", "clip4clip_groups"],
                   help="multi-caption v2t: best_caption (default, COCO/Flickr i2t: rank of the best own caption "
                        "among all captions) or clip4clip_groups (CLIP4Clip's multi-sentence v2t: rank of the own "
                        "caption group among groups scored by their best caption)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate the readable subset when media files are missing or unreadable "
                        "(the result is marked partial); default: an error listing them")
    p.add_argument("--force", action="store_true",
                   help="load an adapter trained on other backbone weights anyway (loud warning, recorded)")
    p.add_argument("--save-sims", action="store_true",
                   help="also write sims.npy (texts x gallery scores), sims_ids.json (row/column order) "
                        "and ranks.json (per-query ranks) into --out")
    p.add_argument("--save-embeddings", default=None, metavar="DIR",
                   help="also write the text and visual embeddings of this evaluation into DIR in the layout of "
                        "`xmodal embed` (clip-retrieval; `xmodal index --from-embeddings DIR` reads it)")
    p.add_argument("--out", default=None, help="directory for metrics.json (default: eval/<dataset>_<split>)")
    p.set_defaults(func=run)


def add_model_data_args(p: argparse.ArgumentParser) -> None:
    """Dataset, backbone, adapter and head options shared by `eval` and `index`."""
    p.add_argument("--config", default=None, help="YAML run config (data/model/head/eval sections are used)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--dataset", default=None, help="benchmark reader: msrvtt, msvd, didemo, activitynet, lsmdc, "
                                                   "coco, flickr30k, jsonl")
    p.add_argument("--root", default=None, help="dataset root (or the .jsonl file)")
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: the config's eval_split, else the dataset's protocol test split)")
    p.add_argument("--backbone", default=None,
                   help="architecture, e.g. ViT-B-32 or xmodal-tiny (default with --adapter: the adapter's)")
    p.add_argument("--pretrained", default=None,
                   help=f"backbone weights (required): {PRETRAINED_FORMS}; xmodal-tiny defaults to `xmodal`, "
                        f"an adapter to the weights it recorded")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="extra folder searched first for an OpenCLIP tag's weights file, before the Hugging Face "
                        "cache and ~/.cache/clip (model.cache_dir); see docs/DATA.md")
    p.add_argument("--adapter", default=None, help="adapter checkpoint directory (e.g. RUN/best)")
    p.add_argument("--pooling", choices=["mean", "text_conditioned"], default=None,
                   help="similarity head (default: the adapter's, else text_conditioned)")
    p.add_argument("--temperature", type=float, default=None, help="tau of text-conditioned pooling")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per clip (default: the adapter's, else the dataset protocol's)")
    p.add_argument("--max-words", type=int, default=None,
                   help="token budget (default: the adapter's, else the dataset protocol's)")
    p.add_argument("--frame-cache", default=None, metavar="DIR",
                   help="read frames from a cache written by `xmodal extract-frames` (data.frame_cache)")
    p.add_argument("--batch-size", type=int, default=None, help="visual items per encoding batch")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=None,
                   help="initialisation seed of a backbone with --pretrained random (default: train.seed)")


#: command-line flag -> (config section, key); a flag left unset keeps the config's value
_FLAG_TO_CONFIG = {
    "dataset": ("data", "dataset"), "root": ("data", "root"), "split": ("data", "eval_split"),
    "num_frames": ("data", "num_frames"), "max_words": ("data", "max_words"),
    "num_workers": ("data", "num_workers"), "frame_cache": ("data", "frame_cache"),
    "backbone": ("model", "backbone"), "pretrained": ("model", "pretrained"), "cache_dir": ("model", "cache_dir"),
    "pooling": ("head", "pooling"),
    "temperature": ("head", "temperature"), "batch_size": ("eval", "batch_size"),
    "device": ("train", "device"), "seed": ("train", "seed"),
}


@dataclass
class Settings:
    """What the command line resolved to, beyond the RunConfig: where each setting came from."""

    source: Dict[str, str] = field(default_factory=dict)      # "data.num_frames" -> flag|config|adapter|protocol|...
    adapter_meta: Optional[Dict[str, Any]] = None
    weights_source: Optional[str] = None                       # how model.pretrained was chosen


def _explicit_keys(args: argparse.Namespace) -> Dict[str, str]:
    """'section.key' -> 'flag' or 'config' for every setting the user gave."""
    from xmodal.engine.config import load_yaml, parse_override

    keys: Dict[str, str] = {}
    if args.config:
        for section, values in load_yaml(args.config).items():
            if isinstance(values, dict):  # a key written as null (dump_config's unset values) is not a choice
                keys.update({f"{section}.{k}": "config" for k, v in values.items() if v is not None})
        for item in args.overrides or []:
            key, value = parse_override(item)
            if value is not None:
                keys[key] = "config"
    for flag, (section, key) in _FLAG_TO_CONFIG.items():
        if getattr(args, flag, None) is not None:
            keys[f"{section}.{key}"] = "flag"
    return keys


def require_weights(cfg, given: Dict[str, str], config_file: Optional[str], flag: bool = True) -> str:
    """Refuse a backbone without weights; xmodal-tiny defaults to its packaged ones. -> how they were chosen.

    Shared by eval, index and train: random weights must be asked for (`random`), never implied.
    """
    from xmodal.errors import XModalError

    if cfg.model.pretrained not in (None, ""):
        return given.get("model.pretrained", "config")
    if cfg.model.backbone == "xmodal-tiny":
        cfg.model.pretrained = "xmodal"
        return "packaged default of xmodal-tiny"
    how = "give --pretrained P" if flag else "set model.pretrained (or the override model.pretrained=P)"
    if config_file:
        how += f" or model.pretrained in {config_file}" if flag else f" in {config_file}"
    raise XModalError(
        f"backbone {cfg.model.backbone} has no weights: {how}, where P is {PRETRAINED_FORMS}. "
        f"Without weights a backbone scores near chance, so xmodal does not pick random weights for you")


def resolve_settings(args: argparse.Namespace):
    """-> (RunConfig, Settings): config file + flags + adapter training record + protocol defaults."""
    from xmodal.engine.config import load_config, validate
    from xmodal.errors import XModalError

    if args.config is None:
        need = ["dataset", "root"] + ([] if args.adapter else ["backbone"])
        missing = [f"--{k}" for k in need if getattr(args, k) is None]
        if missing:
            raise XModalError(f"give --config FILE, or all of --dataset, --root and --backbone (missing {missing})")
        if args.overrides:
            raise XModalError(f"key=value overrides {args.overrides} need --config")
    given = _explicit_keys(args)
    cfg = load_config(args.config, args.overrides) if args.config else load_config(None)
    for flag, (section, key) in _FLAG_TO_CONFIG.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if getattr(args, "dual_softmax", False):
        cfg.eval.dual_softmax = True
    settings = Settings(source=dict(given))

    training: Dict[str, Any] = {}
    if args.adapter:
        from xmodal.methods.checkpoint import read_adapter_config

        meta = read_adapter_config(args.adapter)
        settings.adapter_meta = meta
        training = meta.get("training") or {}
        if "model.backbone" not in given and meta.get("backbone", {}).get("name"):
            cfg.model.backbone = meta["backbone"]["name"]
            settings.source["model.backbone"] = "adapter"
        recorded = {
            "model.pretrained": training.get("pretrained"),
            "data.num_frames": training.get("num_frames"), "data.max_words": training.get("max_words"),
            "head.pooling": (training.get("head") or {}).get("pooling"),
            "head.temperature": (training.get("head") or {}).get("temperature"),
            "head.normalize": (training.get("head") or {}).get("normalize"),
        }
        for dotted, value in recorded.items():
            if value is not None and dotted not in given:
                section, key = dotted.split(".")
                setattr(getattr(cfg, section), key, value)
                settings.source[dotted] = "adapter"

    protocol = _protocol(cfg.data.dataset)
    if protocol:
        for dotted, value in (("data.num_frames", protocol.get("num_frames")),
                              ("data.max_words", protocol.get("max_words")),
                              ("data.eval_split", protocol.get("test_split"))):
            if value is not None and dotted not in settings.source:
                section, key = dotted.split(".")
                setattr(getattr(cfg, section), key, value)
                settings.source[dotted] = "protocol"
    for dotted in ("data.num_frames", "data.max_words", "data.eval_split", "head.pooling", "head.temperature"):
        settings.source.setdefault(dotted, "default")
    settings.weights_source = require_weights(cfg, settings.source, args.config)
    validate(cfg, args.config or "command line")
    return cfg, settings


def _protocol(dataset: str) -> Optional[Dict[str, Any]]:
    try:
        from xmodal.data.readers import protocol_defaults
    except ImportError:
        return None
    try:
        return protocol_defaults(dataset)
    except Exception:  # an unknown dataset name fails later with the reader's own message
        return None


def _config(args: argparse.Namespace):
    """The resolved RunConfig (shared with `xmodal index`)."""
    return resolve_settings(args)[0]


def create_backbone_for(cfg, device=None):
    """The configured backbone (`pretrained="random"`: an explicit random initialisation)."""
    from xmodal.backbones.factory import create_backbone

    return create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                           device=device or "cpu", seed=cfg.train.seed)


def build_eval_set(cfg, model, allow_missing: bool = False):
    """The evaluation split: missing media raise (count + first paths) unless `allow_missing`."""
    from xmodal.data import EvalDataset, read_dataset
    from xmodal.engine.train import visual_loader

    d = cfg.data
    spec = read_dataset(d.dataset, d.root, d.eval_split, drop_missing=False, **d.options)
    items = spec.items[:d.max_eval_items] if d.max_eval_items else spec.items
    where = f"{d.dataset} {d.eval_split} (root {d.root})"
    return EvalDataset(items, None, visual_loader(cfg, model), d.num_frames, strict=d.strict_media,
                       allow_missing=allow_missing, where=where)


def run(args: argparse.Namespace) -> int:
    from xmodal.atomic import atomic_write_json
    from xmodal.data import collate
    from xmodal.engine import distributed as dist_utils
    from xmodal.engine.evaluate import evaluate_full
    from xmodal.engine.train import head_from_config
    from xmodal.methods import AdaptedModel
    from xmodal.methods.checkpoint import load_adapter
    from xmodal.metrics import DEFAULT_TIES, DEFAULT_V2T_PROTOCOL, format_metrics_table
    from xmodal.provenance import (
        describe_run, frame_cache_record, head_record, method_record, precision_of, run_record, weights_record,
    )

    cfg, settings = resolve_settings(args)
    info = dist_utils.init_distributed(cfg.train.device)
    try:
        backbone = create_backbone_for(cfg, info.device)
        weights = weights_record(backbone, cfg.model.pretrained, cfg.model.cache_dir)
        model = AdaptedModel(backbone)
        warning = None
        if args.adapter:
            method = load_adapter(model, args.adapter, weights=weights, force=args.force)
            warning = getattr(method, "weights_warning", None)
        eval_set = build_eval_set(cfg, model, allow_missing=args.allow_missing)
        ties = args.ties or DEFAULT_TIES
        protocol = args.v2t_protocol or DEFAULT_V2T_PROTOCOL
        head = model.use_head(head_from_config(cfg.head))  # binds a trained head saved with the adapter
        capture = _FeatureCapture(head) if args.save_embeddings else None
        record = _embeddings_record(Path(args.save_embeddings), cfg, args.adapter, model, eval_set) \
            if args.save_embeddings and info.is_main else None  # refuse a folder of another run before encoding
        result = evaluate_full(model, eval_set, capture or head, collate_fn=collate,
                               max_words=cfg.data.max_words, batch_size=cfg.eval.batch_size,
                               text_batch_size=cfg.eval.text_batch_size, num_workers=cfg.data.num_workers,
                               dual_softmax=cfg.eval.dual_softmax, ties=ties, v2t_protocol=protocol,
                               allow_missing=args.allow_missing, device=info.device)
        if not info.is_main:
            return 0
        training = (settings.adapter_meta or {}).get("training")
        run_info = run_record(
            backbone=cfg.model.backbone, weights=weights, adapter=args.adapter, method=method_record(model),
            head=head_record(cfg.head), num_frames=cfg.data.num_frames, max_words=cfg.data.max_words,
            dataset=cfg.data.dataset, split=cfg.data.eval_split, evaluation=result,
            tie_policy=ties, frame_cache=frame_cache_record(cfg.data.frame_cache), device=str(info.device),
            precision=precision_of(info.device), weights_source=settings.weights_source,
            settings_source={k: settings.source[k] for k in sorted(settings.source)
                             if k.split(".")[0] in ("data", "model", "head")},
            adapter_training=training if args.adapter else None,
            adapter_weights_mismatch=warning)
        if args.adapter and not training:
            print("note: this adapter has no training record (saved by an older xmodal): its backbone weights, "
                  "head, frames and words could not be checked or reused")
        print(format_metrics_table(result.metrics, images=result.images, title=describe_run(run_info)))
        out = Path(args.out) if args.out else Path("eval") / f"{cfg.data.dataset}_{cfg.data.eval_split}"
        if args.save_sims:
            _save_sims(out, result, eval_set)
        if args.save_embeddings:
            _save_embeddings(Path(args.save_embeddings), record, eval_set, result, capture)
            print(f"wrote embeddings of {result.num_gallery} items to {args.save_embeddings} (layout of xmodal embed)")
        atomic_write_json(out / "metrics.json", {**result.metrics, "run": run_info})
        print(f"wrote {out / 'metrics.json'}" + (" (+ sims.npy, sims_ids.json, ranks.json)" if args.save_sims else ""))
    finally:
        dist_utils.cleanup()
    return 0


def _nan_to_none(values) -> list:
    return [None if v != v else float(v) for v in values.tolist()]


def _save_sims(out: Path, result, eval_set) -> None:
    """sims.npy (T' x V' float32), sims_ids.json (what each row/column is), ranks.json (per-query ranks)."""
    import numpy as np

    from xmodal.atomic import atomic_file, atomic_write_json

    texts = list(eval_set.texts)
    items = getattr(eval_set, "items", None)
    item_ids = [items[i].id if items is not None else str(i) for i in result.item_index.tolist()]
    rows = result.text_index.tolist()
    with atomic_file(out / "sims.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, result.sim.float().numpy())
    atomic_write_json(out / "sims_ids.json", {
        "layout": "sims.npy[row, column]: row = a caption (t2v query), column = a gallery item",
        "rows": [{"text": texts[t], "text_index": t, "item_id": item_ids[int(c)]}
                 for t, c in zip(rows, result.text_to_visual.tolist())],
        "columns": item_ids,
    })
    r = result.retrieval
    atomic_write_json(out / "ranks.json", {
        "tie_policy": r.tie_policy, "v2t_protocol": r.v2t_protocol, "dual_softmax": r.dual_softmax,
        "note": "1-based; under the mean tie policy the expected rank; null: an item without captions",
        "t2v": _nan_to_none(r.t2v_ranks), "v2t": _nan_to_none(r.v2t_ranks),
    })


class _FeatureCapture:
    """The similarity head, keeping the features it scores: `--save-embeddings` writes the very
    features the metrics were computed from, without encoding the split a second time."""

    def __init__(self, head):
        self.head = head
        self.features = None  # (text (T', D), frames (V', F, D), mask (V', F)) on CPU

    def __call__(self, text, frames, mask=None, *args, **kwargs):
        self.features = (text.detach().cpu(), frames.detach().cpu(), None if mask is None else mask.detach().cpu())
        return self.head(text, frames, mask, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.head, name)


def _embeddings_record(out: Path, cfg, adapter, model, eval_set) -> dict:
    """The `xmodal embed` provenance record of this evaluation; an error if `out` holds another run's."""
    from xmodal.embeddings import check_output, provenance
    from xmodal.engine.evaluate import gallery_kind

    kind = "image" if gallery_kind(eval_set) == "image" else "video"
    requested = int(getattr(eval_set, "num_items_requested", None) or len(eval_set.items))
    record = provenance(cfg, adapter, kind, model.backbone.embed_dim, requested, 1)
    check_output(out, record)
    return record


def _save_embeddings(out: Path, record: dict, eval_set, result, capture: _FeatureCapture) -> None:
    """One partition of `xmodal embed` output from the evaluated features (reuses its writer):
    visual rows = the readable gallery items in split order, text rows = each item's first caption."""
    import torch

    from xmodal.embeddings import EncodedGallery, write_partition
    from xmodal.errors import XModalError

    if capture is None or capture.features is None:
        raise XModalError("--save-embeddings: the evaluation produced no features to write")
    text, frames, mask = capture.features
    items = [eval_set.items[i] for i in result.item_index.tolist()]
    first_row = {}
    for row, column in enumerate(result.text_to_visual.tolist()):
        first_row.setdefault(column, row)
    absent = [items[c].id for c in range(len(items)) if c not in first_row]
    if absent:
        raise XModalError(f"--save-embeddings: items without a caption cannot get a text embedding: {absent[:5]}")
    if mask is None:
        mask = torch.ones(frames.shape[:2], dtype=torch.bool)
    enc = EncodedGallery(items, frames.float(), mask.bool())
    text_rows = text[[first_row[c] for c in range(len(items))]]
    if record["num_items"] != result.num_items_requested or record["dim"] != int(frames.shape[-1]):
        raise XModalError(f"--save-embeddings: evaluated {result.num_items_requested} items of dim "
                          f"{int(frames.shape[-1])}, the record says {record['num_items']} of dim {record['dim']}")
    dropped = [{"id": None, "media": m, "reason": "file not found"} for m in result.missing_media] + \
              [{"id": None, "media": m, "reason": "could not be decoded"} for m in result.unreadable_media]
    write_partition(out, 0, record, enc, text_rows, range(0, record["num_items"]), dropped)
