"""Candidates from whole IVF lists: every item that owns a vector in the lists holding the query's
best-matching vectors, or in those of its nearest centroids.

Why not FAISS's own top-K: over a frame index FAISS ranks items by their (PQ-approximated) best
frame, while the text-conditioned head scores the cosine of a softmax-weighted sum of frames. On a
gallery of near-duplicates the exact top-10 sits inside a crowd of items whose best frames are
almost equal, and a top-K by best frame cuts through that crowd (benchmarks/candidate_proxies.py:
even scanned exactly, the best frame needs K = 5000 of 100k videos for recall@10 0.99). Reading
whole lists instead puts no per-vector cut in the first stage: an item is missed only when none of
its vectors falls in a list read, and every item found is scored exactly by the re-rank. FAISS's
own search only chooses which lists to read; the work per query is set by `probe` (lists) rather
than by K.

Which lists: first those holding the query's best-matching vectors (where its best frames are), then,
up to `probe`, the lists of its nearest centroids. The first rule alone cannot read more lists than
the fetched vectors fall in, and on the 1M benchmark gallery it stopped at recall@10 0.978 however
large `probe` was (benchmarks/search_speed.py, the record of `2447455`); the coarse quantizer's order
carries it on (see the README's "Search at scale" table for what each `probe` reaches).
"""

from __future__ import annotations

from typing import List, Optional

import faiss
import numpy as np

from xmodal.errors import XModalError

#: vectors fetched from FAISS per list to be read, when choosing lists by their best members
FETCH_PER_LIST = 40


def check_probe(index: faiss.Index, probe: int) -> int:
    """`probe` if the index is IVF and has that many lists, else a one-line error."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise XModalError(f"probing lists needs an IVF index (e.g. --faiss IVF4096,PQ64); this one is "
                          f"{type(index).__name__.replace('Index', '') or 'not IVF'}")
    return _in_range(probe, int(ivf.nlist))


def _coarse_input(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """`x` as the IVF's coarse quantizer sees it (through an OPQ/PCA pre-transform, if any)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for step in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(step)).apply(np.ascontiguousarray(x))
    return x


def _in_range(probe: int, nlist: int) -> int:
    if isinstance(probe, bool) or not 1 <= int(probe) <= nlist:
        raise XModalError(f"probe={probe}: expected 1..{nlist} (the index has {nlist} IVF lists)")
    return int(probe)


class ListMembers:
    """Item rows per IVF list (CSR: `items[offsets[l]:offsets[l + 1]]`, sorted, no repeats), read
    once from the index's inverted lists; `owner[v]` maps a stored vector to its item (None: the
    vectors are the items)."""

    def __init__(self, index: faiss.Index, owner: Optional[np.ndarray] = None):
        check_probe(index, 1)
        ivf = faiss.extract_index_ivf(index)
        self.nlist = int(ivf.nlist)
        invlists = ivf.invlists
        parts: List[np.ndarray] = []
        offsets = np.zeros(self.nlist + 1, dtype=np.int64)
        #: the list of every stored vector (what `choose_lists` maps FAISS hits through)
        self.list_of = np.full(int(index.ntotal), -1, dtype=np.int32)
        for lst in range(self.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                ids = faiss.rev_swig_ptr(ptr, size).copy()
                invlists.release_ids(lst, ptr)
                self.list_of[ids] = lst
                parts.append(np.unique(owner[ids] if owner is not None else ids))
            offsets[lst + 1] = offsets[lst] + (len(parts[-1]) if size else 0)
        items = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self.items = items.astype(np.int32 if items.size == 0 or items.max() < 2**31 else np.int64)
        self.offsets = offsets
        #: rows of the items (one past the largest member)
        self.n_items = int(items.max()) + 1 if items.size else 0

    def choose_lists(self, index: faiss.Index, unit_queries: np.ndarray, probe: int,
                     fetch: Optional[int] = None) -> np.ndarray:
        """(Q, probe) ids of the lists to read in full for each (L2-normalised) query, -1 padded.

        First the lists holding the query's best-matching vectors: FAISS's top `fetch` vectors
        (default `FETCH_PER_LIST * probe`, searched at the index's own nprobe), their lists in order
        of first appearance. Text and frames sit apart in the joint space, so a text query's nearest
        centroid says little about where its single best frames are; these lists come first. Then,
        until there are `probe` lists, the lists of the query's nearest centroids in the coarse
        quantizer's order: the best-frame rule alone reads no list without a fetched vector, and
        items whose pooled score is high without one outstanding frame live there.
        """
        probe = _in_range(probe, self.nlist)
        x = np.ascontiguousarray(unit_queries, dtype=np.float32)
        ivf = faiss.extract_index_ivf(index)
        _, nearest = ivf.quantizer.search(_coarse_input(index, x), probe)
        out = np.full((len(x), probe), -1, dtype=np.int64)
        if probe >= ivf.nprobe:
            # FAISS scans only the query's `nprobe` nearest lists, so every fetched vector's list is
            # among the `probe` nearest: the answer is those lists, without fetching anything
            out[:, :nearest.shape[1]] = nearest
            return out
        fetch = FETCH_PER_LIST * probe if fetch is None else int(fetch)
        _, ids = index.search(x, max(1, min(fetch, int(index.ntotal))))
        for q in range(len(x)):
            order = np.concatenate([self.list_of[ids[q][ids[q] >= 0]], nearest[q][nearest[q] >= 0]])
            _, first = np.unique(order, return_index=True)
            chosen = order[np.sort(first)][:probe]
            out[q, :len(chosen)] = chosen
        return out

    def members(self, lists: np.ndarray) -> np.ndarray:
        """Sorted item rows owning a vector in any of `lists` (int64), marked in a bitmap of the
        items rather than sorted from the lists' concatenated members (hundreds of thousands at 1M items)."""
        lists = lists[lists >= 0]
        mark = np.zeros(self.n_items, dtype=bool)
        for lst in lists:
            mark[self.items[self.offsets[lst]:self.offsets[lst + 1]]] = True
        return np.flatnonzero(mark)
