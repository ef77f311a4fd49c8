"""`xmodal index`: encode a gallery once and store it for text queries (`xmodal search`).

    xmodal index --dataset jsonl --root DIR --split test --backbone xmodal-tiny --pretrained xmodal \\
                 [--adapter RUN/best] [--allow-missing] [--faiss Flat|HNSW32|IVF4096,PQ32] --out INDEX_DIR
    xmodal index --from-embeddings EMB_DIR [--faiss ...] --out INDEX_DIR

Stores per-frame features (safetensors), a FAISS index over mean-pooled features and, in
`gallery.json`, what `search` needs to rebuild the same model (backbone, weights, adapter,
pooling head, word budget). The folder is written beside INDEX_DIR and swapped in whole.

Items whose media are missing or cannot be decoded are an error listing their count and
first paths; `--allow-missing` indexes the readable ones and records the index as partial
(with the dropped items). `--from-embeddings` builds the index from `xmodal embed` output
(clip-retrieval layout, any number of partitions). The FAISS factory string defaults to
Flat under 100 000 items; IVF/PQ indices are trained on a seeded sample. With a
text-conditioned head on videos FAISS indexes every frame (an item scores its best frame):
the mean-pooled vector predicts that head's ranking poorly (benchmarks/search_speed.py).
"""

from __future__ import annotations

import argparse

from xmodal.cli.eval import _config, add_model_data_args


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="encode a gallery once into a searchable index",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(p)
    p.add_argument("--out", required=True, help="index directory to write (replaced whole if it exists)")
    p.add_argument("--allow-missing", action="store_true",
                   help="index the readable items when some media are missing/unreadable (index marked partial)")
    p.add_argument("--from-embeddings", default=None, metavar="DIR",
                   help="build from `xmodal embed` output instead of encoding (model and data come from DIR)")
    p.add_argument("--faiss", default=None, metavar="FACTORY",
                   help="FAISS index factory string: Flat, HNSW32, IVF1024,Flat, IVF4096,PQ32, ... "
                        "(default: Flat under 100000 items, else HNSW32 over mean vectors, IVF1024,PQ64 over frames, "
                        "IVF4096,PQ64 over the frames of 500000 items or more)")
    p.add_argument("--candidate-vectors", choices=["mean", "frames"], default=None,
                   help="what FAISS indexes: one mean-pooled vector per item, or every frame (an item scores its "
                        "best frame; default for text-conditioned pooling on videos, whose re-rank it predicts "
                        "far better, see benchmarks/search_speed.py)")
    p.add_argument("--faiss-train-size", type=int, default=None,
                   help="vectors sampled to train IVF/PQ (default: 40 per centroid, at least 10000)")
    p.add_argument("--faiss-params", default=None, help="FAISS search parameters stored with the index, "
                                                        "e.g. nprobe=32 or efSearch=128")
    p.add_argument("--probe", type=int, default=None, metavar="LISTS",
                   help="IVF indices: search re-ranks every item in LISTS lists (those holding the query's best "
                        "frames, then those of its nearest centroids) instead of FAISS's top-K (stored with the index; "
                        "default: 1/24 of the lists for IVF over frames, see benchmarks/search_speed.py)")
    p.set_defaults(func=run)


#: options that `--from-embeddings` takes from the embeddings' provenance instead
_MODEL_DATA_FLAGS = ("config", "dataset", "root", "split", "backbone", "pretrained", "adapter", "pooling",
                     "temperature", "num_frames", "max_words")


def run(args: argparse.Namespace) -> int:
    from xmodal.errors import XModalError

    if args.from_embeddings:
        given = [f"--{f.replace('_', '-')}" for f in _MODEL_DATA_FLAGS if getattr(args, f, None) is not None]
        if given or args.overrides:
            raise XModalError(f"--from-embeddings takes the model and data from {args.from_embeddings}/embeddings.json; "
                              f"drop {given or args.overrides}")
        index = _from_embeddings(args)
    else:
        index = _encode(args)
    out = index.save(args.out)
    n_frames, dim = index.frame_features.shape[1:]
    print(f"indexed {len(index)} items ({n_frames} frames each, dim {dim}, FAISS {index.meta['faiss']['factory']}) "
          f"-> {out}")
    if index.partial:
        print(f"note: partial index: {len(index.meta['dropped'])} item(s) left out for missing or unreadable media "
              f"(listed under 'dropped' in {out}/gallery.json)")
    return 0


def _faiss_kwargs(args) -> dict:
    return {"faiss_factory": args.faiss, "faiss_train_size": args.faiss_train_size, "faiss_params": args.faiss_params,
            "candidate_vectors": args.candidate_vectors, "faiss_probe": args.probe}


def _encode(args):
    from xmodal.backbones.factory import create_backbone
    from xmodal.embeddings import encode_gallery, raise_if_dropped, read_gallery, weights_provenance
    from xmodal.engine.distributed import resolve_device
    from xmodal.methods import AdaptedModel
    from xmodal.retrieval_index import GalleryIndex, check_factory, index_meta

    cfg = _config(args)
    device = resolve_device(cfg.train.device)
    model = AdaptedModel(create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                                         device=device, seed=cfg.train.seed))
    if args.adapter:
        model.load_adapter(args.adapter)
    items, dropped, load = read_gallery(cfg, model, args.allow_missing)
    total = len(items) + len(dropped)
    if args.faiss:  # refuse a factory that cannot work before the (long) encoding
        frames = 1 if args.candidate_vectors == "mean" or cfg.head.pooling != "text_conditioned" else cfg.data.num_frames
        empty = check_factory(args.faiss, model.backbone.embed_dim, len(items) * max(1, frames))
        if args.probe is not None:
            from xmodal.ivf_lists import check_probe

            check_probe(empty, args.probe)
    enc = encode_gallery(model, items, load, cfg.data.num_frames, batch_size=cfg.eval.batch_size,
                         num_workers=cfg.data.num_workers, device=device)
    what = f"{cfg.data.dataset} split {cfg.data.eval_split!r} under {cfg.data.root}"
    raise_if_dropped(what, enc.dropped, total, args.allow_missing)
    dropped = dropped + enc.dropped
    meta = index_meta(cfg, args.adapter)
    meta["weights_sha256"] = weights_provenance(cfg.model.backbone, cfg.model.pretrained,
                                                cfg.model.cache_dir)["weights_sha256"]
    meta.update(partial=bool(dropped), dropped=dropped, num_split_items=total)
    if any(it.start is not None or it.end is not None for it in enc.items):
        meta["segments"] = [[it.start, it.end] for it in enc.items]
    return GalleryIndex(enc.frames, enc.mask, [it.id for it in enc.items], [it.media for it in enc.items], meta,
                        captions=[list(it.captions) for it in enc.items], seed=cfg.train.seed, **_faiss_kwargs(args))


def _from_embeddings(args):
    from pathlib import Path

    from xmodal.embeddings import read_embeddings
    from xmodal.retrieval_index import GalleryIndex

    emb = read_embeddings(args.from_embeddings)
    p = emb.provenance
    meta = {k: p.get(k) for k in ("backbone", "pretrained", "seed", "adapter", "head", "max_words", "dataset",
                                  "split", "num_frames", "fps", "weights_sha256")}
    meta.update(partial=emb.partial, dropped=emb.dropped, num_split_items=len(emb.ids) + len(emb.dropped),
                source_embeddings={"path": str(Path(args.from_embeddings).resolve()),
                                   "provenance_id": p.get("provenance_id")})
    return GalleryIndex(emb.frames, emb.mask, emb.ids, emb.media, meta, captions=emb.captions,
                        seed=p.get("seed") or 0, **_faiss_kwargs(args))
