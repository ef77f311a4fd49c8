"""Tie policy and multi-caption v2t protocols, each against an independent brute force.

* "mean" (the project-wide default) = the expectation over random tie-breaks: checked by
  Monte Carlo over many random tie-breaks, and equal to CLIP4Clip's numbers without ties;
* a collapsed model (all scores equal) gets chance, never R@1 = 100, and loses best-checkpoint
  selection; eval, train and pretrain share the policy;
* "clip4clip_groups" re-implements CLIP4Clip's multi-sentence v2t (pad groups with -inf, max
  over each group's captions, `compute_metrics`), which differs from best_caption beyond R@1;
* NaN, +-inf and non-numeric input are refused.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from xmodal.engine.evaluate import score_of
from xmodal.errors import XModalError
from xmodal.metrics import DEFAULT_TIES, retrieval_metrics, retrieval_result, t2v_ranks, v2t_ranks


# ----------------------------------------------------------- independent references
def clip4clip_compute_metrics(x: np.ndarray) -> dict:
    """CLIP4Clip's metrics.compute_metrics: row i's ground truth is column i (first equal position)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    ind = np.where(sx - d == 0)[1]
    return {"R1": 100 * np.mean(ind == 0), "R5": 100 * np.mean(ind < 5), "R10": 100 * np.mean(ind < 10),
            "MR": np.median(ind) + 1, "MeanR": np.mean(ind) + 1}


def clip4clip_multi_sentence(sim: np.ndarray, gt: np.ndarray) -> tuple:
    """CLIP4Clip's eval_epoch with multi_sentence_: (t2v metrics, v2t metrics).

    Captions are grouped per item (in item order), each group padded with -inf rows to the
    longest; t2v ranks every caption (`tensor_text_to_video_metrics`), v2t takes the max over
    each group's captions (`tensor_video_to_text_sim`) and ranks the groups.
    """
    items = int(gt.max()) + 1
    groups = [sim[gt == v] for v in range(items)]
    longest = max(len(g) for g in groups)
    padded = np.stack([np.concatenate([g, np.full((longest - len(g), sim.shape[1]), -np.inf)]) for g in groups])
    # t2v: for each (group, caption) row, the rank of the group's own item; padded rows are dropped
    ranks = []
    for v, g in enumerate(padded):
        for row in g[: len(groups[v])]:
            ranks.append(int(np.sum(row > row[v])))
    ranks = np.array(ranks)
    t2v = {"R1": 100 * np.mean(ranks == 0), "R5": 100 * np.mean(ranks < 5), "R10": 100 * np.mean(ranks < 10),
           "MR": np.median(ranks) + 1, "MeanR": np.mean(ranks) + 1}
    video_to_text = padded.max(axis=1).T  # (V items, V groups)
    return t2v, clip4clip_compute_metrics(video_to_text)


def as_ours(m: dict, prefix: str) -> dict:
    return {f"{prefix}/R@1": m["R1"], f"{prefix}/R@5": m["R5"], f"{prefix}/R@10": m["R10"],
            f"{prefix}/MdR": m["MR"], f"{prefix}/MnR": m["MeanR"]}


def random_tie_breaks(sim: np.ndarray, gt: np.ndarray, draws: int, rng) -> dict:
    """Monte Carlo: rank under `draws` uniformly random tie-break orders -> mean R@K, MnR per direction."""
    out = {}
    t, v = sim.shape
    for direction in ("t2v", "v2t"):
        recalls = {k: [] for k in (1, 5, 10)}
        mean_ranks = []
        for _ in range(draws):
            noise = rng.random(sim.shape) * 1e-3  # scores are integers: noise only orders equal ones
            s = sim + noise
            if direction == "t2v":
                r = 1 + (s > s[np.arange(t), gt][:, None]).sum(axis=1)
            else:
                r = []
                for item in range(v):
                    best = s[gt == item, item].max()
                    r.append(1 + np.sum(s[:, item] > best))
                r = np.array(r)
            for k in recalls:
                recalls[k].append(np.mean(r <= k))
            mean_ranks.append(r.mean())
        for k, vals in recalls.items():
            out[f"{direction}/R@{k}"] = 100 * np.mean(vals)
        out[f"{direction}/MnR"] = np.mean(mean_ranks)
    return out


# ------------------------------------------------------------------ collapse / default
def test_collapsed_model_scores_chance_not_perfect():
    n = 10
    const = np.full((n, n), 0.3)
    m = retrieval_metrics(const, np.arange(n))
    assert DEFAULT_TIES == "mean"
    for d in ("t2v", "v2t"):
        assert m[f"{d}/R@1"] == pytest.approx(100 / n)
        assert m[f"{d}/R@5"] == pytest.approx(50.0)
        assert m[f"{d}/MdR"] == pytest.approx((n + 1) / 2) and m[f"{d}/MnR"] == pytest.approx((n + 1) / 2)
        assert m[f"{d}/tied_queries"] == n
    # the old default rewarded collapse with a perfect score
    assert retrieval_metrics(const, np.arange(n), ties="optimistic")["t2v/R@1"] == 100.0


def test_best_checkpoint_selection_prefers_a_weak_real_model_over_collapse():
    rng = np.random.default_rng(0)
    n = 20
    weak = rng.standard_normal((n, n))
    weak[np.arange(n), np.arange(n)] += 1.0  # some signal, far from perfect
    collapsed = np.zeros((n, n))
    spec = "t2v/R@1+v2t/R@1"  # train.best_metric's default
    real = score_of(retrieval_metrics(weak, np.arange(n)), spec)
    assert score_of(retrieval_metrics(collapsed, np.arange(n)), spec) == pytest.approx(10.0)  # 2 x 100/20
    assert real > 10.0
    assert score_of(retrieval_metrics(collapsed, np.arange(n), ties="optimistic"), spec) == 200.0 > real


def test_pretrain_uses_the_same_tie_policy():
    from xmodal.pretrain import retrieval_metrics as pretrain_metrics

    sim = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 1.0, 1.0]])
    gt = torch.tensor([0, 1, 2])
    assert pretrain_metrics(sim, gt) == retrieval_metrics(sim, gt)
    assert pretrain_metrics(torch.ones(4, 4), torch.arange(4))["t2v/R@1"] == pytest.approx(25.0)


# ----------------------------------------------------------------- brute forces
def test_mean_without_ties_equals_clip4clip():
    rng = np.random.default_rng(1)
    n = 60
    sim = rng.standard_normal((n, n))
    sim[np.arange(n), np.arange(n)] += 1.0
    got = retrieval_metrics(sim, np.arange(n))
    assert got["t2v/tied_queries"] == 0 and got["v2t/tied_queries"] == 0
    want = as_ours(clip4clip_compute_metrics(sim), "t2v")
    want.update(as_ours(clip4clip_compute_metrics(sim.T), "v2t"))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_mean_matches_random_tie_breaking_monte_carlo():
    rng = np.random.default_rng(2)
    items = 12
    gt = np.repeat(np.arange(items), 2)
    sim = rng.integers(0, 4, size=(len(gt), items)).astype(np.float64)  # heavy ties
    got = retrieval_metrics(sim, gt)
    assert got["t2v/tied_queries"] > len(gt) // 2 and got["v2t/tied_queries"] > 0
    want = random_tie_breaks(sim, gt, draws=3000, rng=rng)
    for key, value in want.items():
        tol = 1.0 if "R@" in key else 0.05  # Monte Carlo error (percent / rank)
        assert got[key] == pytest.approx(value, abs=tol), key
    # and it is neither extreme
    opt, pess = (retrieval_metrics(sim, gt, ties=t) for t in ("optimistic", "pessimistic"))
    assert pess["t2v/R@1"] < got["t2v/R@1"] < opt["t2v/R@1"]


@pytest.mark.parametrize("seed", range(4))
def test_clip4clip_groups_matches_clip4clip_code(seed):
    rng = np.random.default_rng(seed)
    items = 15
    counts = rng.integers(1, 6, size=items)
    gt = np.repeat(np.arange(items), counts)
    sim = rng.standard_normal((len(gt), items))
    sim[np.arange(len(gt)), gt] += 1.2
    t2v, v2t = clip4clip_multi_sentence(sim, gt)
    want = {**as_ours(t2v, "t2v"), **as_ours(v2t, "v2t")}
    for ties in ("mean", "optimistic"):  # no ties in random floats: the policies agree
        got = retrieval_metrics(sim, gt, v2t_protocol="clip4clip_groups", ties=ties)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (ties, key)


def test_best_caption_and_clip4clip_groups_agree_only_on_r1():
    rng = np.random.default_rng(5)
    differ = 0
    for _ in range(20):
        items = 12
        gt = np.repeat(np.arange(items), 5)
        sim = rng.standard_normal((len(gt), items))
        sim[np.arange(len(gt)), gt] += 0.5
        best = retrieval_metrics(sim, gt)
        groups = retrieval_metrics(sim, gt, v2t_protocol="clip4clip_groups")
        assert best["v2t/R@1"] == pytest.approx(groups["v2t/R@1"])
        assert best["t2v/MnR"] == groups["t2v/MnR"]  # t2v is the same protocol
        assert groups["v2t/MnR"] <= best["v2t/MnR"]  # a group outranks only if a caption does
        differ += best["v2t/MnR"] != pytest.approx(groups["v2t/MnR"])
    assert differ >= 10
    # one caption per item: both protocols are the transpose of t2v
    sim = rng.standard_normal((9, 9))
    assert torch.equal(v2t_ranks(sim, np.arange(9), v2t_protocol="clip4clip_groups"), t2v_ranks(sim.T, np.arange(9)))


def test_clip4clip_groups_mean_ties_match_exhaustive_tie_breaking():
    rng = np.random.default_rng(11)
    gt = np.array([0, 0, 1, 1, 1, 2, 3, 4])
    sim = rng.integers(0, 2, size=(len(gt), 6)).astype(np.float64)  # item 5: a distractor without captions
    got = v2t_ranks(sim, gt, v2t_protocol="clip4clip_groups").numpy()
    groups = np.stack([sim[gt == g].max(axis=0) for g in range(5)])  # (groups, items)
    for item in range(6):
        if item == 5:
            assert np.isnan(got[item])
            continue
        scores = groups[:, item]
        ranks = []
        for priority in itertools.permutations(range(5)):
            order = sorted(range(5), key=lambda g: (-scores[g], priority[g]))
            ranks.append(order.index(item) + 1)
        assert got[item] == pytest.approx(np.mean(ranks), abs=1e-12), item


def test_tie_counts_and_result_fields():
    sim = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.3], [0.4, 0.4, 0.4]])
    gt = [0, 1, 2]
    r = retrieval_result(sim, gt)
    # t2v: t0 ties v1, t2 ties both others; v2t: v0 column [.5,.2,.4] no tie, v1 [.5,.9,.4] no tie,
    # v2 [.1,.3,.4] no tie
    assert r.ties_with_ground_truth == {"t2v": 2, "v2t": 0}
    assert r.num_queries == {"t2v": 3, "v2t": 3}
    assert r.tie_policy == "mean" and r.v2t_protocol == "best_caption"
    assert r.t2v_ranks.tolist() == pytest.approx([1.5, 1.0, 2.0])


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "sim, pattern",
    [
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), r"infinite value \(inf\) at row 0, column 0"),
        (np.full((3, 3), -np.inf), r"infinite value \(-inf\)"),
        (np.array([[0.1, 0.2], [0.3, -np.inf]]), r"row 1, column 1"),
        (np.array([["a", "b"], ["c", "d"]]), r"real numbers, got numpy dtype <U1"),
        (np.array([[0.1, None], [0.2, 0.3]], dtype=object), r"numpy dtype object"),
        ([[0.1, "x"], [0.2, 0.3]], r"expected a \(T, V\) numeric matrix"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"contains NaN"),
    ],
)
def test_non_finite_or_non_numeric_input_is_refused(sim, pattern):
    with pytest.raises(XModalError, match=pattern):
        retrieval_metrics(sim, [0, 1] if len(sim) == 2 else [0, 1, 2])
