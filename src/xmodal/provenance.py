"""What a number was measured on: the `run` record of every metrics.json and its one-line header.

A retrieval number means little without the weights (by hash), the adapter (by hash), the
method, the pooling head, the frame/word budgets and where they came from, the split and
how much of it was evaluated, the tie policy and how many queries it touched, the frame
cache, the device and the precision. `run_record` collects them into one JSON object;
`describe_run` prints the same as the line above every printed table. `training_record` is
the subset an adapter stores in its `adapter_config.json` so that evaluating it later can
reuse (and check) how it was trained.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from xmodal import __version__

RANDOM = "random"
EMBEDDED = "xmodal"
_HASHES: Dict[tuple, str] = {}


# --------------------------------------------------------------------------- hashes
def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime for the process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _weights_file(path: Path) -> Optional[Path]:
    """The file holding the weights of a checkpoint file or a Hugging Face CLIPModel folder."""
    if path.is_file():
        return path
    names = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    for name in names:
        if (path / name).is_file():
            return path / name
    return None


def weights_record(backbone, pretrained: Optional[str] = None, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """{"pretrained", "weights_path", "weights_sha256", "activation", "format"} of a built backbone.

    Uses `backbone.weights_info` (set by `create_backbone`) and fills what it lacks by resolving
    `pretrained` again (no weights are read twice: only the file is hashed, once per process).
    """
    info = dict(getattr(backbone, "weights_info", None) or {})
    tag = info.get("pretrained", pretrained)
    if tag in (None, ""):
        tag = RANDOM
    info["pretrained"] = str(tag)
    if info["pretrained"] != RANDOM and not info.get("weights_sha256"):
        path = info.get("weights_path")
        if not path:
            from xmodal.backbones.weights import resolve_pretrained

            path = resolve_pretrained(backbone.name, info["pretrained"], cache_dir=cache_dir).path
        file = _weights_file(Path(path))
        info["weights_path"] = str(path)
        info["weights_sha256"] = file_sha256(file) if file is not None else None
    info.setdefault("weights_path", None)
    info.setdefault("weights_sha256", None)
    info.setdefault("activation", _activation(backbone))
    info.setdefault("format", None)
    if info["weights_path"] is not None:
        info["weights_path"] = str(info["weights_path"])
    return info


def _activation(backbone) -> Optional[str]:
    """'quick_gelu' or 'gelu' as the built towers use it (None when it cannot be told)."""
    try:
        import torch.nn as nn

        for module in backbone.clip.modules():
            name = type(module).__name__.lower()
            if name == "quickgelu":
                return "quick_gelu"
            if isinstance(module, nn.GELU):
                return "gelu"
    except AttributeError:
        return None
    return None


def adapter_record(directory: Optional[str | os.PathLike]) -> Dict[str, Any]:
    """{"adapter": path or None, "adapter_sha256": hash of its weights file or None}."""
    if not directory:
        return {"adapter": None, "adapter_sha256": None}
    from xmodal.methods.checkpoint import WEIGHTS_NAME

    weights = Path(directory) / WEIGHTS_NAME
    return {"adapter": str(Path(directory).resolve()),
            "adapter_sha256": file_sha256(weights) if weights.is_file() else None}


def frame_cache_record(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """{"path", "format", ...} of the frame cache the gallery was read from, or None."""
    if not path:
        return None
    try:
        from xmodal.data.frame_cache import FrameCache

        cache = FrameCache(path)
        describe = getattr(cache, "describe", None)
        if describe is not None:
            return dict(describe())
        formats = sorted({str(e.get("format")) for e in cache.items.values()})
        return {"path": str(Path(path).resolve()), "format": formats[0] if len(formats) == 1 else formats}
    except Exception as exc:  # the record must not hide the evaluation's own error
        return {"path": str(path), "format": None, "error": str(exc)}


# ---------------------------------------------------------------------- records
def head_record(head_cfg) -> Dict[str, Any]:
    return {"pooling": head_cfg.pooling, "temperature": float(head_cfg.temperature),
            "normalize": bool(getattr(head_cfg, "normalize", False))}


def training_record(cfg, weights: Mapping[str, Any]) -> Dict[str, Any]:
    """What an adapter remembers of its training (stored under "training" in adapter_config.json)."""
    return {
        "pretrained": weights.get("pretrained"),
        "weights_sha256": weights.get("weights_sha256"),
        "activation": weights.get("activation"),
        "head": head_record(cfg.head),
        "num_frames": int(cfg.data.num_frames),
        "max_words": int(cfg.data.max_words),
        "dataset": cfg.data.dataset,
        "train_split": cfg.data.train_split,
        "eval_split": cfg.data.eval_split,
    }


def method_record(model, adapter_meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """{"name", "config"} of the active method (zero-shot: name "zero_shot", empty config)."""
    method = getattr(model, "method", None)
    if method is None:
        return {"name": "zero_shot", "config": {}}
    config = method.config.to_dict() if hasattr(method.config, "to_dict") else dict(vars(method.config))
    config = {k: v for k, v in config.items() if k != "method"}
    return {"name": method.name, "config": config}


def precision_of(device, precision: Optional[str] = None) -> str:
    """How evaluation ran: the training precision if given, else the encoder's (bf16 autocast on CUDA)."""
    if precision:
        return precision
    return "bf16-autocast" if str(device).startswith("cuda") else "fp32"


def run_record(
    *,
    backbone: str,
    weights: Mapping[str, Any],
    adapter: Optional[str | os.PathLike] = None,
    method: Mapping[str, Any],
    head: Mapping[str, Any],
    num_frames: int,
    max_words: int,
    dataset: str,
    split: str,
    evaluation=None,
    num_queries: Optional[Mapping[str, int]] = None,
    num_gallery: Optional[int] = None,
    missing_media: int = 0,
    unreadable_media: int = 0,
    tie_policy: str,
    v2t_protocol: str = "best_caption",
    ties_with_ground_truth: Optional[Mapping[str, int]] = None,
    dual_softmax: bool = False,
    frame_cache: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    precision: str = "fp32",
    settings_source: Optional[Mapping[str, str]] = None,
    weights_source: Optional[str] = None,
    **extra: Any,
) -> Dict[str, Any]:
    """The `run` object of a metrics.json. `evaluation` (an EvalResult) fills the gallery fields."""
    if evaluation is not None:
        r = evaluation.retrieval
        num_queries = dict(r.num_queries)
        ties_with_ground_truth = dict(r.ties_with_ground_truth)
        num_gallery = evaluation.num_gallery
        missing_media = len(evaluation.missing_media)
        unreadable_media = len(evaluation.unreadable_media)
        tie_policy, v2t_protocol, dual_softmax = r.tie_policy, r.v2t_protocol, r.dual_softmax
    record = {
        "xmodal_version": __version__,
        "backbone": backbone,
        "pretrained": weights.get("pretrained"),
        "weights_source": weights_source,
        "weights_path": weights.get("weights_path"),
        "weights_sha256": weights.get("weights_sha256"),
        "activation": weights.get("activation"),
        **adapter_record(adapter),
        "method": dict(method),
        "head": dict(head),
        "num_frames": int(num_frames),
        "max_words": int(max_words),
        "settings_source": dict(settings_source or {}),
        "dataset": dataset,
        "split": split,
        "gallery_kind": getattr(evaluation, "gallery_kind", None),
        "num_queries": dict(num_queries or {}),
        "num_gallery": num_gallery,
        "num_items_requested": getattr(evaluation, "num_items_requested", None),
        "missing_media": int(missing_media),
        "unreadable_media": int(unreadable_media),
        "partial": bool(missing_media or unreadable_media),
        "tie_policy": tie_policy,
        "v2t_protocol": v2t_protocol,
        "ties_with_ground_truth": dict(ties_with_ground_truth or {}),
        "dual_softmax": bool(dual_softmax),
        "frame_cache": dict(frame_cache) if frame_cache else None,
        "device": str(device),
        "precision": precision,
    }
    record.update(extra)
    return record


def train_run_record(cfg, model, eval_set, metrics: Mapping[str, float], device, precision: str) -> Dict[str, Any]:
    """The `run` object of a training run's metrics.json (and best/metrics.json)."""
    from xmodal.engine.evaluate import gallery_kind
    from xmodal.metrics import DEFAULT_TIES

    gt = [int(i) for i in eval_set.text_to_visual]
    missing = getattr(eval_set, "missing_media", None) or []
    return run_record(
        backbone=cfg.model.backbone, weights=weights_record(model.backbone, cfg.model.pretrained, cfg.model.cache_dir),
        method=method_record(model), head=head_record(cfg.head), num_frames=cfg.data.num_frames,
        max_words=cfg.data.max_words, dataset=cfg.data.dataset, split=cfg.data.eval_split,
        num_queries={"t2v": len(gt), "v2t": len(set(gt))}, num_gallery=len(eval_set.visuals),
        missing_media=len(missing), tie_policy=DEFAULT_TIES,
        ties_with_ground_truth={d: int(metrics.get(f"{d}/tied_queries", 0)) for d in ("t2v", "v2t")},
        dual_softmax=cfg.eval.dual_softmax, frame_cache=frame_cache_record(cfg.data.frame_cache),
        device=str(device), precision=precision, gallery_kind=gallery_kind(eval_set),
        num_items_requested=getattr(eval_set, "num_items_requested", None),
        train_split=cfg.data.train_split)


def _short(sha: Optional[str]) -> str:
    return sha[:12] if sha else "no hash"


def describe_run(run: Mapping[str, Any]) -> str:
    """One line with what the table below was measured on (the `run` record, abridged)."""
    pretrained = run.get("pretrained")
    if pretrained == RANDOM:
        weights = "RANDOM WEIGHTS (--pretrained random; numbers are not a model's)"
    else:
        origin = f", {run['weights_source']}" if run.get("weights_source") else ""
        weights = f"weights {pretrained}{origin} sha256 {_short(run.get('weights_sha256'))}"
    adapter = "zero-shot"
    if run.get("adapter"):
        adapter = f"adapter {run['adapter']} ({run['method']['name']}, sha256 {_short(run.get('adapter_sha256'))})"
    elif run.get("method", {}).get("name") not in (None, "zero_shot"):
        adapter = f"method {run['method']['name']}"
    head = run.get("head", {})
    pooling = f"{head.get('pooling')} pooling" + (f" t={head['temperature']:g}"
                                                  if head.get("pooling") == "text_conditioned" else "")
    images = run.get("gallery_kind") == "image"
    what = "images" if images else ("items" if run.get("gallery_kind") == "mixed" else "videos")
    q = run.get("num_queries", {})
    gallery = f"{run.get('dataset')} {run.get('split')}: {q.get('t2v', '?')} texts x {run.get('num_gallery')} {what}"
    if run.get("partial"):
        left = run.get("missing_media", 0) + run.get("unreadable_media", 0)
        gallery += f" (PARTIAL: {left} of {run.get('num_items_requested') or '?'} items missing/unreadable, left out)"
    ties = run.get("ties_with_ground_truth", {})
    names = ("t2i", "i2t") if images else ("t2v", "v2t")
    tie = (f"ties {run.get('tie_policy')} ({ties.get('t2v', 0)} {names[0]} / {ties.get('v2t', 0)} {names[1]} "
           f"queries tied with the ground truth)")
    v2t = "" if run.get("v2t_protocol") in (None, "best_caption") else f", {names[1]} {run['v2t_protocol']}"
    frames = f"{run.get('num_frames')} frames, {run.get('max_words')} words"
    cache = f", frame cache {run['frame_cache'].get('format')}" if run.get("frame_cache") else ""
    dual = ", dual softmax" if run.get("dual_softmax") else ""
    return (f"xmodal {run.get('xmodal_version')} | {run.get('backbone')} {weights} | {adapter} | {pooling}{dual} | "
            f"{frames} | {gallery} | {tie}{v2t} | {run.get('device')} {run.get('precision')}{cache}")


__all__ = [
    "adapter_record", "describe_run", "file_sha256", "frame_cache_record", "head_record", "method_record",
    "precision_of", "run_record", "train_run_record", "training_record", "weights_record",
]
