"""`xmodal index`: encode a gallery once and store it for text queries (`xmodal search`).

    xmodal index --dataset jsonl --root DIR --split test --backbone xmodal-tiny --pretrained xmodal \\
                 [--adapter RUN/best] --out INDEX_DIR

Stores per-frame features (safetensors), a FAISS index over mean-pooled features and, in
`gallery.json`, what `search` needs to rebuild the same model (backbone, weights, adapter,
pooling head, word budget).
"""

from __future__ import annotations

import argparse

from xmodal.cli.eval import _config, add_model_data_args


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="encode a gallery once into a searchable index",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(p)
    p.add_argument("--out", required=True, help="index directory to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmodal.backbones.factory import create_backbone
    from xmodal.engine.evaluate import encode_eval_set
    from xmodal.engine.train import build_data
    from xmodal.methods import AdaptedModel
    from xmodal.retrieval_index import GalleryIndex, index_meta

    cfg = _config(args)
    model = AdaptedModel(create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                                         seed=cfg.train.seed))
    if args.adapter:
        model.load_adapter(args.adapter)
    data = build_data(cfg, model, need_train=False)
    _, frames, mask = encode_eval_set(model, [], data.eval.visuals, collate_fn=data.collate,
                                      batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers)
    meta = index_meta(cfg, args.adapter)
    items = data.eval.items
    out = GalleryIndex(frames, mask, [it.id for it in items], [it.media for it in items], meta).save(args.out)
    print(f"indexed {len(items)} items ({frames.shape[1]} frames each, dim {frames.shape[2]}) -> {out}")
    return 0
