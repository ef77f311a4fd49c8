"""`xmodal search INDEX "query" ...`: top-k gallery items for text queries.

Rebuilds the model recorded in the index (backbone, weights, adapter), encodes the queries,
takes candidates from the FAISS index and re-ranks them with the index's pooling head
(text-conditioned pooling needs the query, so it runs on the candidates only): FAISS's top
`--candidates`, or on IVF indices every item in `--probe` lists (those holding the query's
best frames, then those of its nearest centroids; the index's recorded probe by default). `--exact` scores every item with
the head instead. Empty queries are refused. An index
built with `--allow-missing` is partial: a note on stderr says how many items it lacks.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="query an index built by `xmodal index` with text",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="index directory")
    p.add_argument("queries", nargs="+", help="text queries")
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument("--candidates", type=int, default=None,
                   help="FAISS candidates re-ranked per query (default 100, or the index's recorded --probe)")
    p.add_argument("--probe", type=int, default=None, metavar="LISTS",
                   help="IVF indices: re-rank every item in LISTS lists (those holding the query's best frames, "
                        "then those of its nearest centroids)")
    p.add_argument("--exact", action="store_true",
                   help="score every item with the pooling head (no FAISS candidate stage)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmodal.errors import XModalError
    from xmodal.retrieval_index import GalleryIndex, Searcher, check_queries

    if args.top_k < 1:
        raise XModalError(f"--top-k={args.top_k}: expected >= 1")
    if args.candidates is not None and args.candidates < 1:
        raise XModalError(f"--candidates={args.candidates}: expected >= 1")
    if sum([args.candidates is not None, args.probe is not None, args.exact]) > 1:
        raise XModalError("give at most one of --candidates, --probe and --exact")
    queries = check_queries(args.queries)
    index = GalleryIndex.load(args.index)
    if index.partial:
        dropped = index.meta.get("dropped") or []
        print(f"note: {args.index} is partial: {len(dropped)} item(s) of the split were left out for missing or "
              f"unreadable media (listed under 'dropped' in gallery.json)", file=sys.stderr)
    probe = index.probe_for(args.probe, args.candidates, args.exact)
    results = Searcher(index).search(queries, k=args.top_k, candidates=args.candidates or 100, exact=args.exact,
                                     probe=probe)
    if args.json:
        print(json.dumps([{"query": q, "hits": [h.__dict__ for h in hits]} for q, hits in zip(queries, results)],
                         indent=2))
        return 0
    for q, hits in zip(queries, results):
        print(f'query: "{q}"')
        for h in hits:
            print(f"  {h.rank}. {h.id}  score {h.score:.3f}  {h.media}")
    return 0
