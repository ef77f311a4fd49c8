"""Retrieval evaluation: encode every caption and every gallery item once, score all pairs.

The gallery is encoded independently of the queries (the dual-encoder property); the
T x V score comes from the pooling head in text chunks of bounded memory. Under DDP each
rank encodes a contiguous shard of the texts and of the gallery and the features are
gathered, so evaluation costs 1/N of the time on N processes.

An item whose media cannot be read never enters the gallery or a metric: by default that is
an error naming the count and the first paths; with `allow_missing=True` the evaluation
runs on the readable subset (the item and its captions leave both directions) and the
result says it is partial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from xmodal.engine import distributed as dist_utils
from xmodal.engine.heads import SimilarityHead
from xmodal.errors import DataError, XModalError
from xmodal.metrics import DEFAULT_TIES, DEFAULT_V2T_PROTOCOL, RetrievalResult

METRIC_KEYS = tuple(f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR"))
#: keys evaluate() returns beside METRIC_KEYS (see xmodal.metrics)
EXTRA_KEYS = ("t2v/R@Sum", "v2t/R@Sum", "R@Sum", "t2v/tied_queries", "v2t/tied_queries")
SHOWN_PATHS = 5


def missing_media_error(kind: str, paths: Sequence[str], total: int, hint: str = "") -> XModalError:
    """One-line error: how many gallery items are missing/unreadable, and the first paths."""
    from xmodal import errors

    cls = getattr(errors, "MissingMediaError", DataError)
    first = ", ".join(str(p) for p in list(paths)[:SHOWN_PATHS])
    more = f" and {len(paths) - SHOWN_PATHS} more" if len(paths) > SHOWN_PATHS else ""
    return cls(f"{len(paths)} of {total} gallery items have {kind} media ({first}{more}); they would leave "
               f"the gallery and change every number: fix them, or pass --allow-missing to evaluate the readable "
               f"subset (the result is then marked partial){hint}")


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


def _media_paths(visuals, indices: Sequence[int]) -> List[str]:
    items = getattr(visuals, "items", None)
    return [str(items[i].media) if items is not None else f"item {i}" for i in indices]


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
    allow_missing: bool = False,
    return_kept: bool = False,
):
    """-> text features (T, D), per-frame visual features (V', F, D), frame mask (V', F), on CPU.

    Rows follow item order and hold only items whose media could be read. An unreadable item
    raises (count + first paths) unless `allow_missing`; then V' < V and `return_kept=True`
    appends the (V',) indices of the items that are there.
    """
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
        from xmodal.encoding import loader_options

        loader = _NonEmpty(DataLoader(Subset(visuals, list(v_idx)), batch_size=batch_size, shuffle=False,
                                      num_workers=num_workers, collate_fn=collate_fn,
                                      **loader_options(device, num_workers)))  # pinned + prefetch on CUDA
        try:
            feats, mask, index = encode_loader(model, loader, device=device, progress=progress, return_index=True)
        except XModalError:
            if loader.yielded:
                raise  # a real error; "no batches" only means every item of this shard was unreadable
    f = feats.shape[1]
    if dist_utils.world_size() > 1:
        ft = torch.tensor([f], device=_comm_device(device))
        dist.all_reduce(ft, op=dist.ReduceOp.MAX)
        f = int(ft.item())
        feats, mask = _pad_frames(feats, mask, f)
        feats, mask, index = _gather(feats, device), _gather(mask, device), _gather(index, device)
    n = len(visuals)
    order = torch.argsort(index)
    feats, mask, index = feats[order], mask[order], index[order]
    if index.numel() < n:
        present = set(index.tolist())
        failed = [i for i in range(n) if i not in present]
        if not allow_missing or index.numel() == 0:
            hint = "" if index.numel() else "; no item of the gallery could be read"
            raise missing_media_error("unreadable", _media_paths(visuals, failed), n, hint)
    text_feats = _gather(text_feats, device)
    if return_kept:
        return text_feats, feats, mask, index
    return text_feats, feats, mask


class _NonEmpty:
    """A loader view that drops batches `collate` returned as None (all media unreadable)."""

    def __init__(self, loader):
        self.loader = loader
        self.yielded = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if batch is not None:
                self.yielded += 1
                yield batch


def similarity_matrix(head: SimilarityHead, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """(T, V) cosine scores, computed on `device` in memory-capped chunks, returned on CPU."""
    device = device or torch.device("cpu")
    with torch.no_grad():
        return head(text.to(device), frames.to(device), mask.to(device)).cpu()


@dataclass
class EvalResult:
    """One evaluation: metrics, the scores behind them and what was (not) in the gallery."""

    metrics: Dict[str, float]
    retrieval: RetrievalResult
    sim: torch.Tensor                 # (T', V') scores of the evaluated captions x gallery items
    text_to_visual: torch.Tensor      # (T',) column of each evaluated caption's item
    text_index: torch.Tensor          # (T',) index of each evaluated caption in eval_set.texts
    item_index: torch.Tensor          # (V',) index of each gallery column in the eval set's items
    num_items_requested: int          # items of the split before anything was left out
    missing_media: List[str] = field(default_factory=list)     # files absent when the split was read
    unreadable_media: List[str] = field(default_factory=list)  # files present but undecodable
    gallery_kind: str = "video"       # video | image | mixed

    @property
    def partial(self) -> bool:
        return bool(self.missing_media or self.unreadable_media)

    @property
    def num_gallery(self) -> int:
        return int(self.sim.shape[1])

    @property
    def images(self) -> bool:
        return self.gallery_kind == "image"


def gallery_kind(eval_set) -> str:
    kinds = {getattr(it, "kind", "video") for it in getattr(eval_set, "items", [])}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "video")


def evaluate_full(
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
    ties: str = DEFAULT_TIES,
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL,
    allow_missing: bool = False,
    device: Optional[torch.device] = None,
    progress: Optional[bool] = None,
) -> EvalResult:
    """Encode, score and rank `eval_set` -> EvalResult (metrics, sims, ranks, gallery record).

    `eval_set` provides `.texts` (captions, the queries), `.text_to_visual` (T,) and
    `.visuals` (a dataset of visual items; `collate_fn` makes batches with `pixels` and
    `frame_mask`); optionally `.items`, `.missing_media` and `.num_items_requested`.
    """
    from xmodal.metrics import retrieval_result, with_image_names

    texts = list(eval_set.texts)
    gt = torch.as_tensor(eval_set.text_to_visual, dtype=torch.long)
    if len(texts) == 0 or len(eval_set.visuals) == 0:
        raise XModalError("evaluation set is empty: it needs captions and visual items")
    if gt.shape != (len(texts),):
        raise XModalError(f"evaluation set: text_to_visual has shape {tuple(gt.shape)}, expected ({len(texts)},)")
    n_items = len(eval_set.visuals)
    text, frames, mask, kept = encode_eval_set(
        model, texts, eval_set.visuals, collate_fn=collate_fn, max_words=max_words, batch_size=batch_size,
        text_batch_size=text_batch_size, num_workers=num_workers, device=device, progress=progress,
        allow_missing=allow_missing, return_kept=True)
    present = set(kept.tolist())
    unreadable = [i for i in range(n_items) if i not in present]
    column = torch.full((n_items,), -1, dtype=torch.long)
    column[kept] = torch.arange(kept.numel())
    text_index = torch.nonzero(column[gt] >= 0).squeeze(1)
    if text_index.numel() == 0:
        raise XModalError("evaluation set: no caption of a readable item is left to evaluate")
    text, gt_kept = text[text_index], column[gt[text_index]]
    sim = similarity_matrix(head, text, frames, mask, device)
    result = retrieval_result(sim, gt_kept, dual_softmax, ties=ties, v2t_protocol=v2t_protocol)
    kind = gallery_kind(eval_set)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    if kind == "image":
        metrics = with_image_names(metrics)
    missing = [str(p) for p in (getattr(eval_set, "missing_media", None) or [])]
    requested = int(getattr(eval_set, "num_items_requested", None) or (n_items + len(missing)))
    return EvalResult(metrics, result, sim, gt_kept, text_index, kept, requested, missing,
                      _media_paths(eval_set.visuals, unreadable), kind)


def evaluate(model, eval_set, head: SimilarityHead, **kwargs) -> Dict[str, float]:
    """Metrics of `model` on an eval set: METRIC_KEYS (`t2v/R@1` ... `v2t/MnR`) plus EXTRA_KEYS.

    Image galleries also get `t2i/...`/`i2t/...` copies. Keyword arguments as `evaluate_full`;
    ties default to "mean" (the project-wide policy: a collapsed model never scores well).
    """
    return evaluate_full(model, eval_set, head, **kwargs).metrics


def score_of(metrics: Dict[str, float], spec: str) -> float:
    """'t2v/R@1+v2t/R@1' -> the sum of those metrics (rank metrics count negatively)."""
    total = 0.0
    for key in (k.strip() for k in spec.split("+")):
        if key not in metrics:
            raise XModalError(f"train.best_metric: {key!r} is not among the evaluation metrics {sorted(metrics)}")
        value = float(metrics[key])
        total += -value if key.endswith(("MdR", "MnR")) else value
    return total
