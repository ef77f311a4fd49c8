"""Probing whole IVF lists (`GalleryIndex.search(probe=...)`, `xmodal.ivf_lists`)."""

import faiss
import numpy as np
import pytest
import torch

from xmodal.engine.heads import SimilarityHead
from xmodal.errors import XModalError
from xmodal.retrieval_index import GalleryIndex, _Block


def _gallery(n=600, f=6, d=16, seed=0):
    """Clustered frames with a few near-duplicate items, as real galleries have."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g) * 3
    feats = centres[torch.randint(0, 12, (n, f), generator=g)] + torch.randn(n, f, d, generator=g)
    feats[n // 2:n // 2 + 50] = feats[:50] + 0.01 * torch.randn(50, f, d, generator=g)
    mask = torch.ones(n, f, dtype=torch.bool)
    mask[::7, -2:] = False  # padded frames are not vectors of the index
    return feats, mask


def _index(feats, mask, factory="IVF16,Flat"):
    return GalleryIndex(feats, mask, [str(i) for i in range(len(feats))], ["x"] * len(feats),
                        meta={"head": {"pooling": "text_conditioned"}}, faiss_factory=factory, candidate_vectors="frames",
                        faiss_train_size=len(feats) * feats.shape[1])


def test_list_members_are_the_owners_of_each_lists_vectors():
    feats, mask = _gallery()
    index = _index(feats, mask)
    members = index.list_members
    vecs = index.frame_vectors
    _, assign = faiss.extract_index_ivf(index.faiss).quantizer.search(np.ascontiguousarray(vecs[:]), 1)
    for lst in range(members.nlist):
        want = np.unique(vecs.owner[assign[:, 0] == lst])
        got = members.items[members.offsets[lst]:members.offsets[lst + 1]]
        assert got.tolist() == want.tolist()
    for lists in (np.array([3]), np.array([0, 5, 9, -1]), np.arange(members.nlist)):
        union = np.unique(np.concatenate([vecs.owner[assign[:, 0] == lst] for lst in lists if lst >= 0]))
        assert members.members(lists).tolist() == union.tolist()


def test_probing_every_list_is_the_exact_search_and_fewer_lists_find_a_subset(monkeypatch):
    import xmodal.ivf_lists

    monkeypatch.setattr(xmodal.ivf_lists, "FETCH_PER_LIST", 10**6)  # every vector fetched: every list read
    feats, mask = _gallery()
    index = _index(feats, mask)
    head = SimilarityHead("text_conditioned", temperature=5.0)
    text = torch.randn(4, feats.shape[2], generator=torch.Generator().manual_seed(1)) * 3
    exact = index.search(text, k=10, rerank=head, exact=True)
    probed = index.search(text, k=10, rerank=head, probe=index.list_members.nlist)
    for e, p in zip(exact, probed):
        assert [h.row for h in p] == [h.row for h in e]
        assert [h.score for h in p] == pytest.approx([h.score for h in e], abs=1e-5)
    # one list: the hits are the best items among that list's members, with their exact scores
    rows = index.probe_candidates(text[:1], 1)[0]
    assert 0 < len(rows) < len(feats)
    one = index.search(text[:1], k=5, rerank=head, probe=1)[0]
    truth = index.score_all(text[:1], head)[0]
    want = torch.from_numpy(rows)[torch.argsort(truth[torch.from_numpy(rows)], descending=True)[:5]]
    assert [h.row for h in one] == want.tolist()
    assert [h.score for h in one] == pytest.approx(truth[want].tolist(), abs=1e-5)


def test_probe_is_refused_without_ivf_and_out_of_range():
    feats, mask = _gallery(n=120)
    flat = _index(feats, mask, factory="Flat")
    with pytest.raises(XModalError, match="needs an IVF index"):
        flat.search(torch.randn(1, feats.shape[2]), k=3, probe=2)
    ivf = _index(feats, mask)
    with pytest.raises(XModalError, match=r"probe=17: expected 1\.\.16"):
        ivf.search(torch.randn(1, feats.shape[2]), k=3, probe=17)


def test_cached_gram_matrices_change_no_score():
    feats, mask = _gallery(n=200)
    index = _index(feats, mask)
    head = SimilarityHead("text_conditioned", temperature=5.0)
    text = torch.randn(3, feats.shape[2], generator=torch.Generator().manual_seed(2)) * 3
    rows = torch.tensor([5, 17, 3, 150, 42])
    before = index.score_rows(text, rows, head)
    index.prepare(head)
    assert index._gram_cache is not None
    after = index.score_rows(text, rows, head)
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(after, head(text, feats[rows].float(), mask[rows]), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_block_gather_returns_the_rows_frames(dtype):
    """The re-rank copies each item's frames as 8-byte words; it must equal plain indexing, also for
    shapes whose rows are not a whole number of words (then it falls back)."""
    g = torch.Generator().manual_seed(3)
    for f, d in ((4, 16), (3, 5)):
        feats = torch.randn(50, f, d, generator=g).to(dtype)
        index = GalleryIndex(feats, torch.ones(50, f, dtype=torch.bool), [str(i) for i in range(50)], ["x"] * 50)
        rows = torch.tensor([49, 0, 7, 7, 23])
        assert torch.equal(index._gather(rows), feats[rows].float())
        block = _Block(feats, torch.zeros(50, f, f), 8)  # the buffers score_rows reuses block after block
        for some in (rows, rows[:2], torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])):
            assert torch.equal(index._gather(some, block), feats[some].float())


def test_lists_are_chosen_by_their_best_frames_then_their_centroids():
    """The first list read is the one holding the query's best frame, even where another centroid is
    nearer the query; the lists holding fetched frames come first, then the nearest centroids' lists
    in the coarse quantizer's order, up to `probe` lists."""
    feats, mask = _gallery(n=400)
    index = _index(feats, mask)
    ivf = faiss.extract_index_ivf(index.faiss)
    ivf.nprobe = ivf.nlist  # FAISS's own search exact over the stored vectors (IVF Flat)
    members = index.list_members
    vecs = index.frame_vectors
    g = torch.Generator().manual_seed(5)
    differ = 0
    for _ in range(40):
        q = torch.nn.functional.normalize(torch.randn(1, feats.shape[2], generator=g), dim=-1).numpy()
        best = int(np.argmax(vecs[:] @ q[0]))
        _, nearest = ivf.quantizer.search(q, 1)
        chosen = members.choose_lists(index.faiss, q, 1)[0]
        assert chosen[0] == members.list_of[best]
        differ += int(chosen[0] != nearest[0, 0])
        every = members.choose_lists(index.faiss, q, members.nlist, fetch=len(vecs))[0]
        assert sorted(every.tolist()) == list(range(members.nlist))
        top = index.faiss.search(q, 5)[1][0]
        held = set(members.list_of[top].tolist())
        few = members.choose_lists(index.faiss, q, 8, fetch=5)[0]
        assert set(few[:len(held)].tolist()) == held
        _, coarse = ivf.quantizer.search(q, members.nlist)
        rest = [lst for lst in coarse[0].tolist() if lst not in held]
        assert few[len(held):].tolist() == rest[:8 - len(held)]
    assert differ > 0  # the two rules disagree on some queries, so the test can tell them apart


@pytest.mark.parametrize("factory", ["IVF16,Flat", "OPQ4,IVF16,PQ4"])
def test_probe_at_least_nprobe_reads_the_nearest_centroids_lists(factory):
    """FAISS scans only the query's nprobe nearest lists, so with probe >= nprobe the lists read are
    the probe nearest ones (through the OPQ rotation when the index has one), nothing fetched."""
    feats, mask = _gallery(n=400)
    index = _index(feats, mask, factory=factory)
    ivf = faiss.extract_index_ivf(index.faiss)
    ivf.nprobe = 4
    members = index.list_members
    q = torch.nn.functional.normalize(torch.randn(3, feats.shape[2], generator=torch.Generator().manual_seed(6)),
                                      dim=-1).numpy()
    coarse_in = q
    if factory.startswith("OPQ"):
        opq = faiss.downcast_index(index.faiss).chain.at(0)
        coarse_in = faiss.downcast_VectorTransform(opq).apply(q)
        assert not np.allclose(coarse_in, q)
    _, nearest = ivf.quantizer.search(coarse_in, 6)
    assert members.choose_lists(index.faiss, q, 6).tolist() == nearest.tolist()
    # below nprobe the best-frame lists come first, and they lie among the nprobe nearest
    below = members.choose_lists(index.faiss, q, 3)
    for row, near in zip(below, nearest):
        assert set(row.tolist()) <= set(near[:4].tolist())


def test_score_rows_over_several_reused_blocks_equals_the_head(monkeypatch):
    """Blocks of rows share one set of buffers (the last block shorter); every score is still the head's."""
    import xmodal.retrieval_index

    monkeypatch.setattr(xmodal.retrieval_index, "_RERANK_ROWS", 7)
    feats, mask = _gallery(n=200)
    index = _index(feats, mask)
    head = SimilarityHead("text_conditioned", temperature=5.0)
    text = torch.randn(2, feats.shape[2], generator=torch.Generator().manual_seed(7)) * 3
    rows = torch.randperm(200, generator=torch.Generator().manual_seed(8))[:30]
    want = head(text, feats[rows].float(), mask[rows])
    assert torch.allclose(index.score_rows(text, rows, head), want, atol=1e-4)
    index.prepare(head)  # the cached Gram matrices go through the block's buffer too
    assert torch.allclose(index.score_rows(text, rows, head), want, atol=1e-4)
