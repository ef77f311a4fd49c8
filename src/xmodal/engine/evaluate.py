"""Retrieval evaluation: encode every caption and every gallery item once, score all pairs.

The gallery is encoded independently of the queries (the dual-encoder property); the
T x V score comes from the pooling head in text chunks of bounded memory. Under DDP each
rank encodes a contiguous shard of the texts and of the gallery and the features are
gathered, so evaluation costs 1/N of the time on N processes.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from xmodal.engine import distributed as dist_utils
from xmodal.engine.heads import SimilarityHead
from xmodal.errors import XModalError

METRIC_KEYS = tuple(f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR"))


def _shard(n: int) -> range:
    """Contiguous slice of range(n) for this rank (rank order = concatenation order)."""
    w, r = dist_utils.world_size(), dist_utils.rank()
    per = (n + w - 1) // w
    return range(min(n, r * per), min(n, (r + 1) * per))


def _comm_device(device: torch.device) -> torch.device:
    backend = dist.get_backend() if dist_utils.world_size() > 1 else None
    return device if backend == "nccl" else torch.device("cpu")


def _gather(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist_utils.world_size() == 1:
        return x
    return dist_utils.gather_uneven(x.to(_comm_device(device))).cpu()


def _pad_frames(feats: torch.Tensor, mask: torch.Tensor, f: int) -> Tuple[torch.Tensor, torch.Tensor]:
    pad = f - feats.shape[1]
    if pad > 0:
        feats = torch.cat([feats, feats.new_zeros(feats.shape[0], pad, feats.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return feats, mask


def encode_eval_set(
    model,
    texts: Sequence[str],
    visuals,
    *,
    collate_fn: Optional[Callable] = None,
    max_words: Optional[int] = None,
    batch_size: int = 16,
    text_batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
    progress: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> text features (T, D), per-frame visual features (V, F, D), frame mask (V, F), on CPU."""
    from xmodal.encoding import encode_loader, encode_texts, model_device

    device = device or model_device(model)
    texts = list(texts)
    t_idx = _shard(len(texts))
    text_feats = encode_texts(model, [texts[i] for i in t_idx], batch_size=text_batch_size, max_words=max_words,
                              device=device, progress=progress)
    v_idx = _shard(len(visuals))
    dim = model.backbone.embed_dim if hasattr(model, "backbone") else model.embed_dim
    feats = torch.zeros(0, 1, dim)
    mask = torch.zeros(0, 1, dtype=torch.bool)
    index = torch.zeros(0, dtype=torch.long)
    if len(v_idx):
        loader = DataLoader(Subset(visuals, list(v_idx)), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=collate_fn)
        feats, mask, index = encode_loader(model, _NonEmpty(loader), device=device, progress=progress,
                                           return_index=True)
    f = feats.shape[1]
    if dist_utils.world_size() > 1:
        ft = torch.tensor([f], device=_comm_device(device))
        dist.all_reduce(ft, op=dist.ReduceOp.MAX)
        f = int(ft.item())
        feats, mask = _pad_frames(feats, mask, f)
        feats, mask, index = _gather(feats, device), _gather(mask, device), _gather(index, device)
    # place rows by item index: items whose media could not be read keep zero features
    # (score 0 with every text) instead of shifting every later item
    n = len(visuals)
    full = torch.zeros(n, f, feats.shape[2])
    full_mask = torch.zeros(n, f, dtype=torch.bool)
    full[index], full_mask[index] = feats, mask
    return _gather(text_feats, device), full, full_mask


class _NonEmpty:
    """A loader view that drops batches `collate` returned as None (all media unreadable)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (b for b in self.loader if b is not None)


def similarity_matrix(head: SimilarityHead, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """(T, V) cosine scores, computed on `device` in memory-capped chunks, returned on CPU."""
    device = device or torch.device("cpu")
    with torch.no_grad():
        return head(text.to(device), frames.to(device), mask.to(device)).cpu()


def evaluate(
    model,
    eval_set,
    head: SimilarityHead,
    *,
    collate_fn: Optional[Callable] = None,
    max_words: Optional[int] = None,
    batch_size: int = 16,
    text_batch_size: int = 256,
    num_workers: int = 0,
    dual_softmax: bool = False,
    device: Optional[torch.device] = None,
    progress: Optional[bool] = None,
) -> Dict[str, float]:
    """Metrics (`t2v/R@1` ... `v2t/MnR`) of `model` on an eval set.

    `eval_set` provides `.texts` (captions, the queries), `.text_to_visual` (T,) and
    `.visuals` (a dataset of visual items; `collate_fn` makes batches with `pixels` and
    `frame_mask`).
    """
    from xmodal.metrics import retrieval_metrics

    texts = list(eval_set.texts)
    gt = torch.as_tensor(eval_set.text_to_visual, dtype=torch.long)
    if len(texts) == 0 or len(eval_set.visuals) == 0:
        raise XModalError("evaluation set is empty: it needs captions and visual items")
    if gt.shape != (len(texts),):
        raise XModalError(f"evaluation set: text_to_visual has shape {tuple(gt.shape)}, expected ({len(texts)},)")
    text, frames, mask = encode_eval_set(
        model, texts, eval_set.visuals, collate_fn=collate_fn, max_words=max_words, batch_size=batch_size,
        text_batch_size=text_batch_size, num_workers=num_workers, device=device, progress=progress)
    sim = similarity_matrix(head, text, frames, mask, device)
    metrics = retrieval_metrics(sim, gt, dual_softmax=dual_softmax)
    return {k: float(metrics[k]) for k in METRIC_KEYS if k in metrics}


def score_of(metrics: Dict[str, float], spec: str) -> float:
    """'t2v/R@1+v2t/R@1' -> the sum of those metrics (rank metrics count negatively)."""
    total = 0.0
    for key in (k.strip() for k in spec.split("+")):
        if key not in metrics:
            raise XModalError(f"train.best_metric: {key!r} is not among the evaluation metrics {sorted(metrics)}")
        value = float(metrics[key])
        total += -value if key.endswith(("MdR", "MnR")) else value
    return total
