"""Retrieval metrics from a text x visual similarity matrix: R@1/5/10, MdR, MnR both ways.

Conventions (stated once here, used everywhere in xmodal):

* `sim` is (T, V): T captions (queries of text->visual) by V visual items (videos or
  images), higher = more similar. `text_to_visual[t]` is the item caption t describes;
  an item may have many captions (COCO: 5 per image, MSVD: ~40 per video).
* Ranks are **1-based**: the ground truth at the top of the list has rank 1, so a
  perfect model has R@1 = 100, MdR = 1, MnR = 1. (MV-Adapter's official evaluation
  prints 0-based ranks; add 1 to its MdR/MnR to compare. CLIP4Clip also adds 1.)
* text->visual (t2v): each caption is one query; its rank is the position of its
  item among all V items. This is exactly CLIP4Clip's multi-sentence t2v evaluation
  (MSVD): every caption is scored on its own.
* visual->text (v2t): each item is one query over all T captions; its rank is the
  position of its **best-ranked** own caption (the COCO/Flickr i2t convention, and
  CLIP4Clip's multi-sentence v2t). With one caption per item this is the plain
  transpose of t2v. Items without any caption (pure gallery distractors) have no v2t
  rank: `v2t_ranks` gives NaN for them and the summary leaves them out.
* Ties between the ground truth and other candidates are resolved by `ties`:
  - "optimistic" (default): rank = 1 + #(candidates scoring strictly higher). This is
    CLIP4Clip's `compute_metrics` (first sorted position equal to the GT score). A
    constant similarity matrix scores R@1 = 100 under it: use "pessimistic" for sanity
    checks of degenerate models.
  - "pessimistic": every other candidate tied with the ground truth comes first.
  - "mean": the expectation under uniformly random tie breaking. With g strictly
    higher, m other candidates tied and k ground truths tied (k > 1 only in v2t), the
    first ground truth sits after X of the m others, E[X] = m / (k + 1); R@K is the
    exact probability P(1 + g + X <= K) averaged over queries, MnR the exact expected
    mean rank, MdR the median of the expected ranks.
* Optional dual-softmax re-normalisation at inference (CAMoE/DSL, as used by X-Pool's
  `sims * softmax(sims * 100, axis=0)`): for each direction the query x gallery matrix
  is multiplied by a softmax over the **query** axis, i.e. a prior of how much each
  gallery item prefers this query over the other queries; this pulls down "hub" items
  that are close to every query. For t2v: `S * softmax(temp * S, dim=0)` (over texts);
  for v2t: `S * softmax(temp * S, dim=1)` (over items). `temp` defaults to 100 (CLIP's
  logit scale) for cosine similarities.

Large matrices are processed in row chunks: memory is O(chunk_size * V), never a full
argsort of T x V.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from xmodal.errors import XModalError

ArrayLike = Union[np.ndarray, torch.Tensor]

TIES = ("optimistic", "pessimistic", "mean")
RECALL_AT = (1, 5, 10)
DIRECTIONS = ("t2v", "v2t")
METRIC_NAMES = ("R@1", "R@5", "R@10", "MdR", "MnR")
DEFAULT_CHUNK = 1024


# ------------------------------------------------------------------------ inputs
def _as_sim(sim: ArrayLike) -> torch.Tensor:
    if isinstance(sim, np.ndarray):
        sim = torch.from_numpy(sim)
    elif not isinstance(sim, torch.Tensor):
        try:
            sim = torch.as_tensor(np.asarray(sim, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise XModalError(f"sim: expected a (T, V) numeric matrix, got {type(sim).__name__} ({exc})") from None
    if sim.dim() != 2:
        raise XModalError(f"sim: expected a 2-D (texts x visual items) matrix, got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise XModalError(f"sim: expected at least one text and one visual item, got shape {tuple(sim.shape)}")
    if sim.dtype == torch.bool or sim.is_complex():
        raise XModalError(f"sim: expected real similarity scores, got dtype {sim.dtype}")
    if not sim.is_floating_point():
        sim = sim.to(torch.float64)
    return sim.detach()


def _as_index(text_to_visual: ArrayLike | Sequence[int], sim: torch.Tensor) -> torch.Tensor:
    t, v = sim.shape
    if isinstance(text_to_visual, torch.Tensor):
        idx = text_to_visual.detach()
    else:
        arr = np.asarray(text_to_visual)
        if arr.dtype == object:
            raise XModalError("text_to_visual: expected a 1-D sequence of integer item indices")
        idx = torch.from_numpy(arr) if arr.size else torch.zeros(0, dtype=torch.long)
    if idx.dim() != 1:
        raise XModalError(f"text_to_visual: expected shape (T,) = ({t},), got {tuple(idx.shape)}")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise XModalError(f"text_to_visual: expected integer item indices, got dtype {idx.dtype}")
    if idx.numel() != t:
        raise XModalError(
            f"text_to_visual: has {idx.numel()} entries but sim has {t} rows (texts); "
            f"expected one ground-truth item index per text"
        )
    idx = idx.to(device=sim.device, dtype=torch.long)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= v:
        bad = lo if lo < 0 else hi
        raise XModalError(
            f"text_to_visual: index {bad} out of range for sim with {v} visual items (columns); "
            f"expected 0 <= index < {v}"
        )
    return idx


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise XModalError(f"temperature: expected a positive finite number, got {temperature!r}")


def _check_options(ties: str, chunk_size: int, temperature: float) -> None:
    if ties not in TIES:
        raise XModalError(f"ties: expected one of {TIES}, got {ties!r}")
    if not isinstance(chunk_size, (int, np.integer)) or int(chunk_size) < 1:
        raise XModalError(f"chunk_size: expected a positive number of rows, got {chunk_size!r}")
    _check_temperature(temperature)


def _work_dtype(sim: torch.Tensor) -> torch.dtype:
    return torch.float64 if sim.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


# ------------------------------------------------------------------ dual softmax
def dual_softmax(sim: ArrayLike, temperature: float = 100.0, dim: int = 0) -> torch.Tensor:
    """`sim * softmax(temperature * sim, dim)`, materialised (CAMoE/DSL inference prior).

    dim=0 (softmax over texts) is the t2v re-scoring, dim=1 (over items) the v2t one;
    `retrieval_metrics(..., dual_softmax=True)` applies both, chunked.
    """
    s = _as_sim(sim)
    _check_temperature(temperature)
    if dim not in (0, 1, -1, -2):
        raise XModalError(f"dim: expected 0 (over texts) or 1 (over visual items), got {dim}")
    s = s.to(_work_dtype(s))
    logits = temperature * s
    return s * torch.exp(logits - torch.logsumexp(logits, dim=dim, keepdim=True))


def _column_logsumexp(sim: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
    """logsumexp over texts (dim 0) of temperature * sim, one row chunk at a time."""
    dtype = _work_dtype(sim)
    total = torch.full((sim.shape[1],), -math.inf, dtype=dtype, device=sim.device)
    for a, b in _chunks(sim.shape[0], chunk_size):
        part = torch.logsumexp(temperature * sim[a:b].to(dtype), dim=0)
        total = torch.logaddexp(total, part)
    return total


class _Scorer:
    """Rows a:b of the (possibly dual-softmax re-scored) matrix for one direction."""

    def __init__(self, sim: torch.Tensor, direction: str, dual: bool, temperature: float, chunk_size: int):
        self.sim, self.direction, self.dual, self.temperature = sim, direction, dual, temperature
        self.dtype = _work_dtype(sim)
        self.col_lse = None
        if dual and direction == "t2v":
            self.col_lse = _column_logsumexp(sim, temperature, chunk_size)

    def rows(self, a: int, b: int) -> torch.Tensor:
        s = self.sim[a:b].to(self.dtype)
        if not self.dual:
            if torch.isnan(s).any():
                raise XModalError(f"sim: contains NaN in rows {a}..{b - 1}; expected similarity scores")
            return s
        if not torch.isfinite(s).all():
            raise XModalError(
                f"sim: contains NaN or infinite values in rows {a}..{b - 1}; dual softmax needs finite scores"
            )
        logits = self.temperature * s
        if self.direction == "t2v":  # prior over texts, per item (column)
            return s * torch.exp(logits - self.col_lse.unsqueeze(0))
        return s * torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))  # over items, per text


# ------------------------------------------------------------------------- ranks
def _t2v_stats(
    sim: torch.Tensor, gt: torch.Tensor, dual: bool, temperature: float, chunk_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per text: (#items strictly higher, #other items tied, #ground truths tied = 1)."""
    scorer = _Scorer(sim, "t2v", dual, temperature, chunk_size)
    greater = torch.empty(sim.shape[0], dtype=torch.long, device=sim.device)
    tied = torch.empty_like(greater)
    for a, b in _chunks(sim.shape[0], chunk_size):
        s = scorer.rows(a, b)
        target = s.gather(1, gt[a:b].unsqueeze(1))
        greater[a:b] = (s > target).sum(dim=1)
        tied[a:b] = (s == target).sum(dim=1) - 1
    return greater, tied, torch.ones_like(greater)


def _v2t_stats(
    sim: torch.Tensor, gt: torch.Tensor, dual: bool, temperature: float, chunk_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per item, for its best own caption: (#texts strictly higher, #other texts tied, #own captions tied).

    Items without captions get k = 0 (no rank).
    """
    t, v = sim.shape
    scorer = _Scorer(sim, "v2t", dual, temperature, chunk_size)
    own = torch.empty(t, dtype=scorer.dtype, device=sim.device)
    for a, b in _chunks(t, chunk_size):
        own[a:b] = scorer.rows(a, b).gather(1, gt[a:b].unsqueeze(1)).squeeze(1)
    best = torch.full((v,), -math.inf, dtype=scorer.dtype, device=sim.device)
    best = best.scatter_reduce(0, gt, own, reduce="amax", include_self=False)
    has_caption = torch.zeros(v, dtype=torch.bool, device=sim.device)
    has_caption[gt] = True
    k = torch.zeros(v, dtype=torch.long, device=sim.device).scatter_add_(0, gt, (own == best[gt]).long())
    greater = torch.zeros(v, dtype=torch.long, device=sim.device)
    equal = torch.zeros_like(greater)
    for a, b in _chunks(t, chunk_size):
        s = scorer.rows(a, b)
        greater += (s > best).sum(dim=0)
        equal += (s == best).sum(dim=0)
    tied_other = torch.where(has_caption, equal - k, torch.zeros_like(equal))
    return greater, tied_other, k


def _ranks_from_stats(stats, ties: str) -> torch.Tensor:
    greater, tied, k = (x.to(torch.float64) for x in stats)
    if ties == "optimistic":
        ranks = 1.0 + greater
    elif ties == "pessimistic":
        ranks = 1.0 + greater + tied
    else:
        ranks = 1.0 + greater + tied / (k + 1.0)
    return torch.where(k > 0, ranks, torch.full_like(ranks, math.nan)).cpu()


def _recall_from_stats(stats, ties: str, k_at: int) -> torch.Tensor:
    """P(rank <= k_at) per query (0/1 except for ties="mean")."""
    greater, tied, k = (x.to(torch.float64).cpu() for x in stats)
    if ties != "mean":
        return (_ranks_from_stats(stats, ties) <= k_at).to(torch.float64)
    # rank = 1 + g + X, P(X >= j) = prod_{i<j} (m - i) / (m + k - i)
    need = k_at - greater  # rank <= K  <=>  X <= K - 1 - g  <=>  not X >= K - g
    tail = torch.ones_like(greater)
    for i in range(k_at):
        active = need > i
        factor = ((tied - i).clamp_min(0) / (tied + k - i).clamp_min(1)).clamp(0, 1)
        tail = torch.where(active, tail * factor, tail)
    prob = torch.where(need > 0, 1.0 - tail, torch.zeros_like(tail))
    return prob


def t2v_ranks(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    ties: str = "optimistic",
    *,
    dual_softmax: bool = False,
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """1-based rank of each caption's item among all V items, (T,) float64 on CPU."""
    _check_options(ties, chunk_size, temperature)
    s = _as_sim(sim)
    gt = _as_index(text_to_visual, s)
    return _ranks_from_stats(_t2v_stats(s, gt, dual_softmax, temperature, int(chunk_size)), ties)


def v2t_ranks(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    ties: str = "optimistic",
    *,
    dual_softmax: bool = False,
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """1-based rank of each item's best own caption among all T texts, (V,) float64 on CPU.

    NaN for items that have no caption.
    """
    _check_options(ties, chunk_size, temperature)
    s = _as_sim(sim)
    gt = _as_index(text_to_visual, s)
    return _ranks_from_stats(_v2t_stats(s, gt, dual_softmax, temperature, int(chunk_size)), ties)


# ----------------------------------------------------------------------- summary
def summarize_ranks(ranks: ArrayLike, prefix: str = "t2v") -> Dict[str, float]:
    """R@1/5/10 (percent), MdR, MnR of 1-based ranks; NaN entries (no ground truth) are skipped.

    Recall here thresholds the given ranks; `retrieval_metrics(ties="mean")` instead uses
    the exact tie-breaking probability.
    """
    r = ranks.detach().cpu().double() if isinstance(ranks, torch.Tensor) else torch.as_tensor(
        np.asarray(ranks, dtype=np.float64)
    )
    r = r[~torch.isnan(r)]
    if r.numel() == 0:
        raise XModalError(f"{prefix}: no query has a ground truth; cannot compute retrieval metrics")
    if (r < 1).any():
        raise XModalError(f"{prefix}: ranks must be 1-based (>= 1), got minimum {float(r.min())}")
    out = {f"{prefix}/R@{k}": 100.0 * float((r <= k).double().mean()) for k in RECALL_AT}
    out[f"{prefix}/MdR"] = float(np.median(r.numpy()))
    out[f"{prefix}/MnR"] = float(r.mean())
    return out


def _summarize_stats(stats, ties: str, prefix: str) -> Dict[str, float]:
    ranks = _ranks_from_stats(stats, ties)
    valid = ~torch.isnan(ranks)
    if not bool(valid.any()):
        raise XModalError(f"{prefix}: no query has a ground truth; cannot compute retrieval metrics")
    out = summarize_ranks(ranks, prefix)
    if ties == "mean":
        for k in RECALL_AT:
            out[f"{prefix}/R@{k}"] = 100.0 * float(_recall_from_stats(stats, ties, k)[valid].mean())
    return out


def retrieval_metrics(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    dual_softmax: bool = False,
    *,
    ties: str = "optimistic",
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Dict[str, float]:
    """`t2v/R@1 ... t2v/MnR` and `v2t/R@1 ... v2t/MnR` from a (T, V) similarity matrix.

    R@K in percent (0-100), MdR/MnR 1-based. See the module docstring for the
    multi-caption, tie and dual-softmax conventions.
    """
    _check_options(ties, chunk_size, temperature)
    s = _as_sim(sim)
    gt = _as_index(text_to_visual, s)
    chunk = int(chunk_size)
    out = _summarize_stats(_t2v_stats(s, gt, dual_softmax, temperature, chunk), ties, "t2v")
    out.update(_summarize_stats(_v2t_stats(s, gt, dual_softmax, temperature, chunk), ties, "v2t"))
    return out


def format_metrics_table(metrics: Mapping[str, float], digits: int = 1, prefix: str = "") -> str:
    """Rows t2v / v2t, columns R@1 R@5 R@10 MdR MnR; missing entries print as '-'.

    `prefix` selects keys like `test/t2v/R@1` (prefix="test/"). Rows absent altogether
    are left out.
    """
    width = max(7, digits + 6)
    lines = ["".ljust(5) + "".join(name.rjust(width) for name in METRIC_NAMES)]
    for direction in DIRECTIONS:
        keys = [f"{prefix}{direction}/{name}" for name in METRIC_NAMES]
        if not any(k in metrics for k in keys):
            continue
        cells = []
        for key in keys:
            value = metrics.get(key)
            cells.append("-".rjust(width) if value is None else f"{float(value):.{digits}f}".rjust(width))
        lines.append(direction.ljust(5) + "".join(cells))
    if len(lines) == 1:
        raise XModalError(
            f"metrics: no keys like {prefix}t2v/R@1 or {prefix}v2t/R@1 found; got {sorted(metrics)[:6]}"
        )
    return "\n".join(lines)


__all__ = [
    "TIES",
    "dual_softmax",
    "format_metrics_table",
    "retrieval_metrics",
    "summarize_ranks",
    "t2v_ranks",
    "v2t_ranks",
]
