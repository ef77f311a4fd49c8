"""Retrieval metrics: hand-computed ranks, tie modes, multi-caption items, chunking, dual softmax."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from xmodal.errors import XModalError
from xmodal.metrics import (
    dual_softmax,
    format_metrics_table,
    retrieval_metrics,
    summarize_ranks,
    t2v_ranks,
    v2t_ranks,
)

KEYS = [f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]


# --------------------------------------------------------------------- references
def brute_t2v(sim: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """1-based position of each text's item in a full descending sort (no ties expected)."""
    ranks = []
    for t in range(sim.shape[0]):
        order = list(np.argsort(-sim[t], kind="stable"))
        ranks.append(order.index(gt[t]) + 1)
    return np.array(ranks, dtype=np.float64)


def brute_v2t(sim: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Best 1-based position among each item's own captions in its column's descending sort (NaN: none)."""
    ranks = []
    for v in range(sim.shape[1]):
        order = np.argsort(-sim[:, v], kind="stable")
        own = set(np.nonzero(gt == v)[0].tolist())
        ranks.append(next((pos + 1 for pos, t in enumerate(order) if t in own), np.nan))
    return np.array(ranks, dtype=np.float64)


def brute_summary(ranks: np.ndarray, prefix: str) -> dict:
    ranks = ranks[~np.isnan(ranks)]
    out = {f"{prefix}/R@{k}": 100.0 * np.mean(ranks <= k) for k in (1, 5, 10)}
    out[f"{prefix}/MdR"] = float(np.median(ranks))
    out[f"{prefix}/MnR"] = float(np.mean(ranks))
    return out


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------ hand-computed
def test_hand_computed_one_caption_per_item():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.3],  # t0 -> v0: nothing higher than 0.9             -> rank 1
            [0.8, 0.5, 0.7],  # t1 -> v1: 0.8 and 0.7 beat 0.5                 -> rank 3
            [0.2, 0.6, 0.4],  # t2 -> v2: 0.6 beats 0.4                        -> rank 2
        ]
    )
    gt = [0, 1, 2]
    # v2t columns: v0 [0.9,0.8,0.2] own t0=0.9 -> 1; v1 [0.1,0.5,0.6] own t1=0.5 -> 2;
    #              v2 [0.3,0.7,0.4] own t2=0.4 -> 2
    assert t2v_ranks(sim, gt).tolist() == [1.0, 3.0, 2.0]
    assert v2t_ranks(sim, gt).tolist() == [1.0, 2.0, 2.0]
    m = retrieval_metrics(sim, gt)
    assert list(m)[:10] == KEYS
    assert set(m) - set(KEYS) == {"t2v/R@Sum", "v2t/R@Sum", "R@Sum", "t2v/tied_queries", "v2t/tied_queries"}
    assert m["t2v/R@Sum"] == pytest.approx(100 / 3 + 200) and m["R@Sum"] == pytest.approx(2 * (100 / 3 + 200))
    assert m["t2v/tied_queries"] == 0 and m["v2t/tied_queries"] == 0
    assert m["t2v/R@1"] == pytest.approx(100 / 3)
    assert m["t2v/R@5"] == 100.0 and m["t2v/R@10"] == 100.0
    assert m["t2v/MdR"] == 2.0 and m["t2v/MnR"] == 2.0
    assert m["v2t/R@1"] == pytest.approx(100 / 3)
    assert m["v2t/MdR"] == 2.0 and m["v2t/MnR"] == pytest.approx(5 / 3)


def test_hand_computed_several_captions_per_item():
    sim = np.array(
        [
            [0.20, 0.55],  # t0 -> v0: 0.55 higher -> rank 2
            [0.70, 0.10],  # t1 -> v0:             -> rank 1
            [0.30, 0.40],  # t2 -> v0: 0.40 higher -> rank 2
            [0.50, 0.60],  # t3 -> v1:             -> rank 1
            [0.80, 0.30],  # t4 -> v1: 0.80 higher -> rank 2
        ]
    )
    gt = np.array([0, 0, 0, 1, 1])
    # v0 column [.2,.7,.3,.5,.8]: best own caption t1 (.7); only t4 (.8) is higher -> rank 2
    # v1 column [.55,.1,.4,.6,.3]: best own caption t3 (.6); nothing higher         -> rank 1
    assert t2v_ranks(sim, gt).tolist() == [2.0, 1.0, 2.0, 1.0, 2.0]
    assert v2t_ranks(sim, gt).tolist() == [2.0, 1.0]
    m = retrieval_metrics(sim, gt)
    assert m["t2v/R@1"] == pytest.approx(40.0)
    assert m["t2v/MdR"] == 2.0 and m["t2v/MnR"] == pytest.approx(1.6)
    assert m["v2t/R@1"] == pytest.approx(50.0)
    assert m["v2t/MdR"] == 1.5 and m["v2t/MnR"] == 1.5


def test_one_caption_per_item_v2t_is_transposed_t2v():
    rng = np.random.default_rng(3)
    sim = rng.standard_normal((40, 40))
    gt = np.arange(40)
    assert torch.equal(v2t_ranks(sim, gt), t2v_ranks(sim.T, gt))


@pytest.mark.parametrize("captions", [1, 5])
def test_perfect_retrieval_is_one_based(captions):
    items = 30
    gt = np.repeat(np.arange(items), captions)
    sim = np.eye(items)[gt]  # each caption scores 1 with its own item, 0 elsewhere
    m = retrieval_metrics(sim, gt, ties="pessimistic")
    for d in ("t2v", "v2t"):
        assert m[f"{d}/R@1"] == 100.0
        assert m[f"{d}/MdR"] == 1.0
        assert m[f"{d}/MnR"] == 1.0


# ------------------------------------------------------------------------- ties
def test_tie_modes_hand_computed():
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.5],  # t0 -> v0: g=0 higher, m=2 tied   opt 1, pess 3, mean 1+2/2 = 2
            [0.9, 0.4, 0.4],  # t1 -> v2: g=1 higher, m=1 tied   opt 2, pess 3, mean 2+1/2 = 2.5
        ]
    )
    gt = [0, 2]
    assert t2v_ranks(sim, gt, "optimistic").tolist() == [1.0, 2.0]
    assert t2v_ranks(sim, gt, "pessimistic").tolist() == [3.0, 3.0]
    assert t2v_ranks(sim, gt, "mean").tolist() == [2.0, 2.5]
    # R@1 under "mean" is the tie-break probability: t0 first with p=1/3, t1 never first
    assert retrieval_metrics(sim, gt, ties="mean")["t2v/R@1"] == pytest.approx(100 / 6)
    assert retrieval_metrics(sim, gt, ties="optimistic")["t2v/R@1"] == 50.0
    assert retrieval_metrics(sim, gt, ties="pessimistic")["t2v/R@1"] == 0.0
    assert retrieval_metrics(sim, gt)["t2v/R@1"] == pytest.approx(100 / 6)  # default: mean, everywhere
    assert retrieval_metrics(sim, gt)["t2v/tied_queries"] == 2


def test_v2t_ties_with_several_own_captions():
    sim = torch.tensor([[0.5, 0.1], [0.5, 0.2], [0.5, 0.9]])
    gt = [0, 0, 1]
    # v0 column all 0.5: own t0,t1 (k=2) tied with t2 (m=1)
    #   opt 1, pess 2, mean 1 + 1/(2+1);  P(first is own) = 2/3
    # v1 column [.1,.2,.9]: own t2 is top -> 1 in every mode
    assert v2t_ranks(sim, gt, "optimistic").tolist() == [1.0, 1.0]
    assert v2t_ranks(sim, gt, "pessimistic").tolist() == [2.0, 1.0]
    assert v2t_ranks(sim, gt, "mean").tolist() == pytest.approx([4 / 3, 1.0])
    assert retrieval_metrics(sim, gt, ties="mean")["v2t/R@1"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def _enumerated_tie_expectation(sim: np.ndarray, gt: np.ndarray, direction: str):
    """Exact expectation over every tie-break order: (mean rank per query, P(rank<=K) per query)."""
    if direction == "v2t":
        queries = [(sim[:, v], set(np.nonzero(gt == v)[0].tolist())) for v in range(sim.shape[1])]
    else:
        queries = [(sim[t], {int(gt[t])}) for t in range(sim.shape[0])]
    ranks, recalls = [], {k: [] for k in (1, 5, 10)}
    for scores, own in queries:
        n = len(scores)
        rs = []
        for priority in itertools.permutations(range(n)):
            order = sorted(range(n), key=lambda c: (-scores[c], priority[c]))
            rs.append(next(pos + 1 for pos, c in enumerate(order) if c in own))
        rs = np.array(rs, dtype=np.float64)
        ranks.append(rs.mean())
        for k in recalls:
            recalls[k].append(np.mean(rs <= k))
    return np.array(ranks), {k: np.array(v) for k, v in recalls.items()}


@pytest.mark.parametrize("direction", ["t2v", "v2t"])
def test_mean_ties_match_exhaustive_tie_breaking(direction):
    rng = np.random.default_rng(7)
    if direction == "t2v":
        sim = rng.integers(0, 3, size=(6, 5)).astype(np.float64)  # 5 items: 120 orders per query
        gt = rng.integers(0, 5, size=6)
    else:
        sim = rng.integers(0, 2, size=(7, 3)).astype(np.float64)  # 7 texts: 5040 orders per item
        gt = np.array([0, 0, 0, 1, 1, 2, 2])
    want_ranks, want_recall = _enumerated_tie_expectation(sim, gt, direction)
    fn = t2v_ranks if direction == "t2v" else v2t_ranks
    got = fn(sim, gt, "mean").numpy()
    np.testing.assert_allclose(got, want_ranks, rtol=0, atol=1e-12)
    m = retrieval_metrics(sim, gt, ties="mean")
    for k, probs in want_recall.items():
        assert m[f"{direction}/R@{k}"] == pytest.approx(100 * probs.mean(), abs=1e-9)
    assert m[f"{direction}/MnR"] == pytest.approx(want_ranks.mean(), abs=1e-12)


# --------------------------------------------------------------- large / chunked
@pytest.fixture(scope="module")
def large_case():
    rng = np.random.default_rng(0)
    items, captions = 400, 5
    gt = rng.permutation(np.repeat(np.arange(items), captions))
    sim = rng.standard_normal((items * captions, items))
    sim[np.arange(len(gt)), gt] += 1.5  # real signal so every recall level is informative
    return sim, gt


def test_large_matrix_matches_brute_force(large_case):
    sim, gt = large_case
    want = brute_summary(brute_t2v(sim, gt), "t2v")
    want.update(brute_summary(brute_v2t(sim, gt), "v2t"))
    assert 5 < want["t2v/R@1"] < 95 and 5 < want["v2t/R@1"] < 100
    got = retrieval_metrics(sim, gt, chunk_size=300)  # chunk does not divide 2000
    assert_metrics_close(got, want)
    # every tie mode agrees when there are no ties; torch input and one big chunk too
    for ties in ("pessimistic", "mean"):
        assert_metrics_close(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(gt), ties=ties), want)


def test_float32_input_matches_brute_force(large_case):
    sim, gt = large_case
    sim32 = sim[:500].astype(np.float32)
    gt32 = gt[:500]
    np.testing.assert_array_equal(t2v_ranks(torch.from_numpy(sim32), gt32, chunk_size=64).numpy(), brute_t2v(sim32, gt32))
    got_v2t = v2t_ranks(sim32, gt32, chunk_size=64).numpy()
    want_v2t = brute_v2t(sim32, gt32)
    assert np.isnan(want_v2t).any()  # 500 captions leave some of the 400 items without one
    np.testing.assert_array_equal(got_v2t, want_v2t)


def test_items_without_captions_are_left_out_of_v2t():
    sim = np.array([[0.9, 0.1, 0.8], [0.2, 0.3, 0.7]])
    gt = [0, 1]  # item 2 is a distractor: it still competes in t2v
    # t2v: t0 -> v0 rank 1; t1 -> v1: 0.7 higher -> rank 2
    # v2t: v0 [.9,.2] own t0 -> 1; v1 [.1,.3] own t1 -> 1; v2 has no caption -> NaN
    assert t2v_ranks(sim, gt).tolist() == [1.0, 2.0]
    ranks = v2t_ranks(sim, gt)
    assert ranks[:2].tolist() == [1.0, 1.0] and math.isnan(ranks[2])
    m = retrieval_metrics(sim, gt)
    assert m["v2t/R@1"] == 100.0 and m["v2t/MnR"] == 1.0 and m["t2v/R@1"] == 50.0


def test_summarize_ranks_median_of_even_count():
    m = summarize_ranks(torch.tensor([1.0, 2.0, 3.0, 10.0]), "t2v")
    assert m == {"t2v/R@1": 25.0, "t2v/R@5": 75.0, "t2v/R@10": 100.0, "t2v/MdR": 2.5, "t2v/MnR": 4.0}
    with pytest.raises(XModalError, match="1-based"):
        summarize_ranks(np.array([0.0, 1.0]), "v2t")


# ------------------------------------------------------------------ dual softmax
def test_dual_softmax_formula():
    rng = np.random.default_rng(1)
    sim = torch.from_numpy(rng.uniform(-1, 1, size=(6, 4)))
    expected0 = sim * torch.softmax(sim * 100, dim=0)
    expected1 = sim * torch.softmax(sim * 20, dim=1)
    torch.testing.assert_close(dual_softmax(sim), expected0)
    torch.testing.assert_close(dual_softmax(sim, temperature=20, dim=1), expected1)


def test_dual_softmax_demotes_a_hub_item():
    sim = torch.tensor(
        [
            [0.60, 0.10, 0.65],  # t0 -> v0, but hub v2 scores higher  -> rank 2
            [0.10, 0.60, 0.65],  # t1 -> v1, hub higher                -> rank 2
            [0.10, 0.10, 0.70],  # t2 -> v2 (the hub itself)           -> rank 1
        ]
    )
    gt = [0, 1, 2]
    plain = retrieval_metrics(sim, gt)
    assert t2v_ranks(sim, gt).tolist() == [2.0, 2.0, 1.0]
    assert plain["t2v/R@1"] == pytest.approx(100 / 3)
    # the hub column's softmax over texts puts ~0.99 on t2 and ~0.007 on t0/t1,
    # so t0 and t1 now find their own item first
    assert t2v_ranks(sim, gt, dual_softmax=True).tolist() == [1.0, 1.0, 1.0]
    assert retrieval_metrics(sim, gt, dual_softmax=True)["t2v/R@1"] == 100.0


def test_chunked_dual_softmax_matches_materialised(large_case):
    sim, gt = large_case
    sim, gt = sim[:600] * 0.1, gt[:600]  # cosine-like scale so temperature 100 is meaningful
    got = retrieval_metrics(sim, gt, dual_softmax=True, chunk_size=128)
    want = brute_summary(brute_t2v(dual_softmax(sim, dim=0).numpy(), gt), "t2v")
    want.update(brute_summary(brute_v2t(dual_softmax(sim, dim=1).numpy(), gt), "v2t"))
    assert_metrics_close(got, want)
    assert got != retrieval_metrics(sim, gt)  # re-scoring does change the ranking here


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "sim, gt, pattern",
    [
        (np.zeros((3, 2)), [0, 1], r"text_to_visual: has 2 entries but sim has 3 rows"),
        (np.zeros((2, 2)), [0, 2], r"index 2 out of range .* 2 visual items"),
        (np.zeros((2, 2)), [-1, 0], r"index -1 out of range"),
        (np.zeros((2, 2)), [0.0, 1.0], r"text_to_visual: expected integer"),
        (np.zeros((2, 2)), [[0, 1]], r"text_to_visual: expected shape \(T,\)"),
        (np.zeros(4), [0, 1, 2, 3], r"sim: expected a 2-D"),
        (np.zeros((0, 3)), [], r"sim: expected at least one text"),
        (np.array([[0.1, np.nan], [0.2, 0.3]]), [0, 1], r"sim: contains NaN"),
    ],
)
def test_bad_input_raises_clear_error(sim, gt, pattern):
    with pytest.raises(XModalError, match=pattern):
        retrieval_metrics(sim, gt)


def test_bad_options_raise():
    sim, gt = np.eye(3), [0, 1, 2]
    with pytest.raises(XModalError, match="ties: expected one of"):
        retrieval_metrics(sim, gt, ties="random")
    with pytest.raises(XModalError, match="chunk_size"):
        retrieval_metrics(sim, gt, chunk_size=0)
    with pytest.raises(XModalError, match="temperature"):
        retrieval_metrics(sim, gt, dual_softmax=True, temperature=-1.0)
    with pytest.raises(XModalError, match="infinite value"):
        retrieval_metrics(np.array([[np.inf, 0.0], [0.0, 1.0]]), [0, 1], dual_softmax=True)
    with pytest.raises(XModalError, match="v2t_protocol: expected one of"):
        retrieval_metrics(sim, gt, v2t_protocol="clip4clip")


# ---------------------------------------------------------------------- table
def test_format_metrics_table():
    m = retrieval_metrics(
        np.array([[0.9, 0.1, 0.3], [0.8, 0.5, 0.7], [0.2, 0.6, 0.4]]), [0, 1, 2]
    )
    lines = format_metrics_table(m).splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10", "R@Sum", "MdR", "MnR"]
    assert lines[1].split() == ["t2v", "33.3", "100.0", "100.0", "233.3", "2.0", "2.0"]
    assert lines[2].split() == ["v2t", "33.3", "100.0", "100.0", "233.3", "2.0", "1.7"]
    titled = format_metrics_table(m, images=True, title="run header").splitlines()
    assert titled[0] == "run header" and titled[2].split()[0] == "t2i" and titled[3].split()[0] == "i2t"
    prefixed = {f"test/{k}": v for k, v in m.items() if k.startswith("t2v/") and "Sum" not in k}
    del prefixed["test/t2v/MnR"]
    lines = format_metrics_table(prefixed, digits=2, prefix="test/").splitlines()
    assert len(lines) == 2 and lines[1].split() == ["t2v", "33.33", "100.00", "100.00", "2.00", "-"]
    with pytest.raises(XModalError, match="no keys like"):
        format_metrics_table({"loss": 1.0})
