"""`xmodal search INDEX "query" ...`: top-k gallery items for text queries.

Rebuilds the model recorded in the index (backbone, weights, adapter), encodes the queries,
takes FAISS candidates over mean-pooled features and re-ranks them with the index's pooling
head (text-conditioned pooling needs the query, so it runs on the candidates only).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="query an index built by `xmodal index` with text",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="index directory")
    p.add_argument("queries", nargs="+", help="text queries")
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument("--candidates", type=int, default=100, help="FAISS candidates re-ranked per query")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmodal.backbones.factory import create_backbone
    from xmodal.encoding import encode_texts
    from xmodal.engine.heads import SimilarityHead
    from xmodal.errors import XModalError
    from xmodal.methods import AdaptedModel
    from xmodal.retrieval_index import GalleryIndex

    if args.top_k < 1:
        raise XModalError(f"--top-k={args.top_k}: expected >= 1")
    index = GalleryIndex.load(args.index)
    meta = index.meta
    missing = [k for k in ("backbone", "head") if k not in meta]
    if missing:
        raise XModalError(f"{args.index}/gallery.json: missing {missing}; rebuild it with `xmodal index`")
    model = AdaptedModel(create_backbone(meta["backbone"], meta.get("pretrained"), seed=meta.get("seed")))
    if meta.get("adapter"):
        model.load_adapter(meta["adapter"])
    head = SimilarityHead(**meta["head"])
    text = encode_texts(model, args.queries, max_words=meta.get("max_words"), progress=False)
    results = index.search(text, k=args.top_k, rerank=head, candidates=args.candidates)
    if args.json:
        print(json.dumps([{"query": q, "hits": [h.__dict__ for h in hits]} for q, hits in zip(args.queries, results)],
                         indent=2))
        return 0
    for q, hits in zip(args.queries, results):
        print(f'query: "{q}"')
        for h in hits:
            print(f"  {h.rank}. {h.id}  score {h.score:.3f}  {h.media}")
    return 0
