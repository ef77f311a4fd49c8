"""Retrieval metrics from a text x visual similarity matrix: R@1/5/10, R@Sum, MdR, MnR both ways.

Conventions (stated once here, used everywhere in xmodal):

* `sim` is (T, V): T captions (queries of text->visual) by V visual items (videos or
  images), higher = more similar, every entry a finite real number (NaN and +-inf are
  refused: an all -inf matrix would otherwise "retrieve" perfectly). `text_to_visual[t]`
  is the item caption t describes; an item may have many captions (COCO: 5 per image,
  MSVD: ~40 per video).
* Ranks are **1-based**: the ground truth at the top of the list has rank 1, so a
  perfect model has R@1 = 100, MdR = 1, MnR = 1. (MV-Adapter's official evaluation
  prints 0-based ranks; add 1 to its MdR/MnR to compare. CLIP4Clip also adds 1.)
* text->visual (t2v): each caption is one query; its rank is the position of its
  item among all V items. This is exactly CLIP4Clip's multi-sentence t2v evaluation
  (MSVD): every caption is scored on its own.
* visual->text (v2t), two protocols (`v2t_protocol`), identical with one caption per item:
  - "best_caption" (default): each item is one query over all T captions; its rank is
    the position of its **best-ranked** own caption. This is the standard COCO/Flickr
    image->text protocol. It is NOT CLIP4Clip's multi-sentence v2t: only R@1 agrees.
  - "clip4clip_groups": CLIP4Clip's multi-sentence v2t (`tensor_video_to_text_sim`):
    the candidates are caption GROUPS, one per captioned item, each scored by its best
    caption against the query item; the rank is the position of the item's own group
    among the groups.
  Items without any caption (pure gallery distractors) have no v2t rank: `v2t_ranks`
  gives NaN for them and the summary leaves them out (in "clip4clip_groups" they are
  not candidates either).
* Ties between the ground truth and other candidates are resolved by `ties`; the same
  default ("mean") is used by eval, train (best-checkpoint selection) and pretrain:
  - "mean" (default): the expectation under uniformly random tie breaking. With g
    candidates strictly higher, m other candidates tied and k ground truths tied (k > 1
    only in best_caption v2t), the first ground truth sits after X of the m others,
    E[X] = m / (k + 1); R@K is the exact probability P(1 + g + X <= K) averaged over
    queries, MnR the exact expected mean rank, MdR the median of the expected ranks.
    Without ties this equals CLIP4Clip's numbers; a collapsed model (all scores equal)
    gets chance-level recall, never R@1 = 100.
  - "optimistic": rank = 1 + #(candidates scoring strictly higher), i.e. CLIP4Clip's
    `compute_metrics` (first sorted position equal to the GT score). A constant
    similarity matrix scores R@1 = 100 under it.
  - "pessimistic": every other candidate tied with the ground truth comes first.
  Every result counts the queries whose ground truth was tied with another candidate
  (`t2v/tied_queries`, `v2t/tied_queries`): a non-zero count means the tie policy
  changed the numbers.
* R@Sum: `t2v/R@Sum` = t2v R@1 + R@5 + R@10 (likewise `v2t/R@Sum`); `R@Sum` is both
  directions together (the sum of six recalls, as MV-Adapter and others report it).
* Optional dual-softmax re-normalisation at inference (CAMoE/DSL, as used by X-Pool's
  `sims * softmax(sims * 100, axis=0)`): for each direction the query x gallery matrix
  is multiplied by a softmax over the **query** axis, i.e. a prior of how much each
  gallery item prefers this query over the other queries; this pulls down "hub" items
  that are close to every query. For t2v: `S * softmax(temp * S, dim=0)` (over texts);
  for v2t: `S * softmax(temp * S, dim=1)` (over items). `temp` defaults to 100 (CLIP's
  logit scale) for cosine similarities.

Large matrices are processed in row chunks: memory is O(chunk_size * V), never a full
argsort of T x V ("clip4clip_groups" holds one (items x V) matrix of group scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from xmodal.errors import XModalError

ArrayLike = Union[np.ndarray, torch.Tensor]

TIES = ("mean", "optimistic", "pessimistic")
DEFAULT_TIES = "mean"
V2T_PROTOCOLS = ("best_caption", "clip4clip_groups")
DEFAULT_V2T_PROTOCOL = "best_caption"
RECALL_AT = (1, 5, 10)
DIRECTIONS = ("t2v", "v2t")
#: display / alias names of the two directions for image galleries (the JSON keeps t2v/v2t too)
IMAGE_DIRECTIONS = {"t2v": "t2i", "v2t": "i2t"}
METRIC_NAMES = ("R@1", "R@5", "R@10", "MdR", "MnR")
TABLE_COLUMNS = ("R@1", "R@5", "R@10", "R@Sum", "MdR", "MnR")
DEFAULT_CHUNK = 1024


# ------------------------------------------------------------------------ inputs
def _as_sim(sim: ArrayLike, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    if isinstance(sim, np.ndarray):
        if sim.dtype.kind not in "fiu":
            raise XModalError(f"sim: expected a (T, V) matrix of real numbers, got numpy dtype {sim.dtype}")
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
    sim = sim.detach()
    for a, b in _chunks(sim.shape[0], max(1, int(chunk_size))):
        bad = ~torch.isfinite(sim[a:b])
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            value = float(sim[a + r, c])
            raise XModalError(
                f"sim: contains {'NaN' if math.isnan(value) else 'an infinite value'} ({value}) at row {a + r}, "
                f"column {c}; expected finite similarity scores (NaN/inf come from a broken model or bad features)"
            )
    return sim


def _as_index(text_to_visual: ArrayLike | Sequence[int], sim: torch.Tensor) -> torch.Tensor:
    t, v = sim.shape
    if isinstance(text_to_visual, torch.Tensor):
        idx = text_to_visual.detach()
    else:
        arr = np.asarray(text_to_visual)
        if arr.dtype == object or arr.dtype.kind in "USV":
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


def _check_options(ties: str, chunk_size: int, temperature: float, v2t_protocol: str = DEFAULT_V2T_PROTOCOL) -> None:
    if ties not in TIES:
        raise XModalError(f"ties: expected one of {TIES}, got {ties!r}")
    if v2t_protocol not in V2T_PROTOCOLS:
        raise XModalError(f"v2t_protocol: expected one of {V2T_PROTOCOLS}, got {v2t_protocol!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or int(chunk_size) < 1:
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
            return s
        logits = self.temperature * s
        if self.direction == "t2v":  # prior over texts, per item (column)
            return s * torch.exp(logits - self.col_lse.unsqueeze(0))
        return s * torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))  # over items, per text


# ------------------------------------------------------------------------- ranks
Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _t2v_stats(sim: torch.Tensor, gt: torch.Tensor, dual: bool, temperature: float, chunk_size: int) -> Stats:
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


def _v2t_best_caption_stats(sim: torch.Tensor, gt: torch.Tensor, dual: bool, temperature: float,
                            chunk_size: int) -> Stats:
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
    greater = torch.where(has_caption, greater, torch.zeros_like(greater))
    return greater, tied_other, k


def _v2t_group_stats(sim: torch.Tensor, gt: torch.Tensor, dual: bool, temperature: float,
                     chunk_size: int) -> Stats:
    """CLIP4Clip's multi-sentence v2t: per item, its own caption group among all caption groups.

    A group (one per captioned item) scores max over its captions against the query item.
    Returns (#groups strictly higher, #other groups tied, 1 for captioned items / 0 otherwise).
    """
    t, v = sim.shape
    scorer = _Scorer(sim, "v2t", dual, temperature, chunk_size)
    groups = torch.full((v, v), -math.inf, dtype=scorer.dtype, device=sim.device)  # [group i, query item j]
    for a, b in _chunks(t, chunk_size):
        s = scorer.rows(a, b)
        groups.scatter_reduce_(0, gt[a:b].unsqueeze(1).expand_as(s), s, reduce="amax", include_self=True)
    has_caption = torch.zeros(v, dtype=torch.bool, device=sim.device)
    has_caption[gt] = True
    target = groups.diagonal()
    greater = torch.zeros(v, dtype=torch.long, device=sim.device)
    equal = torch.zeros_like(greater)
    for a, b in _chunks(v, chunk_size):
        g = groups[a:b]
        member = has_caption[a:b].unsqueeze(1)
        greater += ((g > target) & member).sum(dim=0)
        equal += ((g == target) & member).sum(dim=0)
    k = has_caption.long()
    zero = torch.zeros_like(greater)
    return torch.where(has_caption, greater, zero), torch.where(has_caption, equal - 1, zero), k


def _v2t_stats(sim, gt, dual, temperature, chunk_size, v2t_protocol: str) -> Stats:
    fn = _v2t_best_caption_stats if v2t_protocol == "best_caption" else _v2t_group_stats
    return fn(sim, gt, dual, temperature, chunk_size)


def _ranks_from_stats(stats: Stats, ties: str) -> torch.Tensor:
    greater, tied, k = (x.to(torch.float64) for x in stats)
    if ties == "optimistic":
        ranks = 1.0 + greater
    elif ties == "pessimistic":
        ranks = 1.0 + greater + tied
    else:
        ranks = 1.0 + greater + tied / (k + 1.0)
    return torch.where(k > 0, ranks, torch.full_like(ranks, math.nan)).cpu()


def _recall_from_stats(stats: Stats, ties: str, k_at: int) -> torch.Tensor:
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


def _prepare(sim, text_to_visual, ties, chunk_size, temperature, v2t_protocol=DEFAULT_V2T_PROTOCOL):
    _check_options(ties, chunk_size, temperature, v2t_protocol)
    s = _as_sim(sim, int(chunk_size))
    return s, _as_index(text_to_visual, s)


def t2v_ranks(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    ties: str = DEFAULT_TIES,
    *,
    dual_softmax: bool = False,
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """1-based rank of each caption's item among all V items, (T,) float64 on CPU (expected rank for "mean")."""
    s, gt = _prepare(sim, text_to_visual, ties, chunk_size, temperature)
    return _ranks_from_stats(_t2v_stats(s, gt, dual_softmax, temperature, int(chunk_size)), ties)


def v2t_ranks(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    ties: str = DEFAULT_TIES,
    *,
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL,
    dual_softmax: bool = False,
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """1-based v2t rank of each item, (V,) float64 on CPU; NaN for items that have no caption.

    "best_caption": rank of the item's best own caption among all T texts;
    "clip4clip_groups": rank of its own caption group among the caption groups.
    """
    s, gt = _prepare(sim, text_to_visual, ties, chunk_size, temperature, v2t_protocol)
    return _ranks_from_stats(_v2t_stats(s, gt, dual_softmax, temperature, int(chunk_size), v2t_protocol), ties)


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


def _summarize_stats(stats: Stats, ties: str, prefix: str) -> Tuple[Dict[str, float], torch.Tensor]:
    ranks = _ranks_from_stats(stats, ties)
    valid = ~torch.isnan(ranks)
    if not bool(valid.any()):
        raise XModalError(f"{prefix}: no query has a ground truth; cannot compute retrieval metrics")
    out = summarize_ranks(ranks, prefix)
    if ties == "mean":
        for k in RECALL_AT:
            out[f"{prefix}/R@{k}"] = 100.0 * float(_recall_from_stats(stats, ties, k)[valid].mean())
    return out, ranks


@dataclass
class RetrievalResult:
    """Everything one evaluation measured: the metrics dict plus what a reader needs to trust it."""

    metrics: Dict[str, float]
    t2v_ranks: torch.Tensor                 # (T,) 1-based (expected under "mean")
    v2t_ranks: torch.Tensor                 # (V,) NaN for items without a caption
    ties_with_ground_truth: Dict[str, int]  # queries whose ground truth tied with another candidate
    num_queries: Dict[str, int]             # t2v: captions, v2t: captioned items
    tie_policy: str = DEFAULT_TIES
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL
    dual_softmax: bool = False
    extra: Dict[str, object] = field(default_factory=dict)


def retrieval_result(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    dual_softmax: bool = False,
    *,
    ties: str = DEFAULT_TIES,
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL,
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> RetrievalResult:
    """Metrics, per-query ranks and tie counts of a (T, V) similarity matrix (one pass each way)."""
    s, gt = _prepare(sim, text_to_visual, ties, chunk_size, temperature, v2t_protocol)
    chunk = int(chunk_size)
    t2v = _t2v_stats(s, gt, dual_softmax, temperature, chunk)
    v2t = _v2t_stats(s, gt, dual_softmax, temperature, chunk, v2t_protocol)
    metrics, ranks = {}, {}
    tied, queries = {}, {}
    for prefix, stats in (("t2v", t2v), ("v2t", v2t)):
        part, ranks[prefix] = _summarize_stats(stats, ties, prefix)
        metrics.update(part)
        answered = stats[2] > 0
        tied[prefix] = int(((stats[1] > 0) & answered).sum())
        queries[prefix] = int(answered.sum())
    for prefix in DIRECTIONS:
        metrics[f"{prefix}/R@Sum"] = sum(metrics[f"{prefix}/R@{k}"] for k in RECALL_AT)
    metrics["R@Sum"] = metrics["t2v/R@Sum"] + metrics["v2t/R@Sum"]
    for prefix in DIRECTIONS:
        metrics[f"{prefix}/tied_queries"] = float(tied[prefix])
    return RetrievalResult(metrics, ranks["t2v"], ranks["v2t"], tied, queries, ties, v2t_protocol, bool(dual_softmax))


def retrieval_metrics(
    sim: ArrayLike,
    text_to_visual: ArrayLike | Sequence[int],
    dual_softmax: bool = False,
    *,
    ties: str = DEFAULT_TIES,
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL,
    temperature: float = 100.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Dict[str, float]:
    """`t2v/R@1 ... t2v/MnR`, `v2t/R@1 ... v2t/MnR`, the R@Sum keys and `*/tied_queries`.

    R@K in percent (0-100), MdR/MnR 1-based. See the module docstring for the
    multi-caption, tie and dual-softmax conventions.
    """
    return retrieval_result(sim, text_to_visual, dual_softmax, ties=ties, v2t_protocol=v2t_protocol,
                            temperature=temperature, chunk_size=chunk_size).metrics


def with_image_names(metrics: Mapping[str, float]) -> Dict[str, float]:
    """Add `t2i/...` and `i2t/...` copies of the `t2v/...`/`v2t/...` keys (image galleries).

    The t2v/v2t keys stay: code and records that read them keep working.
    """
    out = dict(metrics)
    for key, value in metrics.items():
        direction, sep, rest = key.partition("/")
        if sep and direction in IMAGE_DIRECTIONS:
            out[f"{IMAGE_DIRECTIONS[direction]}/{rest}"] = value
    return out


def format_metrics_table(metrics: Mapping[str, float], digits: int = 1, prefix: str = "", *,
                         images: bool = False, title: Optional[str] = None) -> str:
    """Rows t2v / v2t (t2i / i2t with `images=True`), columns R@1 R@5 R@10 [R@Sum] MdR MnR.

    Missing entries print as '-'; the R@Sum column appears when the metrics have it.
    `prefix` selects keys like `test/t2v/R@1` (prefix="test/"). Rows absent altogether
    are left out. `title` is printed as the first line (the run's provenance header).
    """
    width = max(7, digits + 6)
    columns = [c for c in TABLE_COLUMNS if c != "R@Sum" or any(f"{prefix}{d}/R@Sum" in metrics for d in DIRECTIONS)]
    lines = ["".ljust(5) + "".join(name.rjust(width) for name in columns)]
    for direction in DIRECTIONS:
        keys = [f"{prefix}{direction}/{name}" for name in columns]
        if not any(k in metrics for k in keys):
            continue
        cells = []
        for key in keys:
            value = metrics.get(key)
            cells.append("-".rjust(width) if value is None else f"{float(value):.{digits}f}".rjust(width))
        label = IMAGE_DIRECTIONS[direction] if images else direction
        lines.append(label.ljust(5) + "".join(cells))
    if len(lines) == 1:
        raise XModalError(
            f"metrics: no keys like {prefix}t2v/R@1 or {prefix}v2t/R@1 found; got {sorted(metrics)[:6]}"
        )
    if title:
        lines.insert(0, title)
    return "\n".join(lines)


__all__ = [
    "DEFAULT_TIES",
    "RetrievalResult",
    "TIES",
    "V2T_PROTOCOLS",
    "dual_softmax",
    "format_metrics_table",
    "retrieval_metrics",
    "retrieval_result",
    "summarize_ranks",
    "t2v_ranks",
    "v2t_ranks",
    "with_image_names",
]
