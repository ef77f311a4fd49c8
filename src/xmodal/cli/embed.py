"""`xmodal embed`: encode a split into clip-retrieval-layout embedding shards.

    xmodal embed --dataset jsonl --root DIR --split test --backbone xmodal-tiny --pretrained xmodal \\
                 [--adapter RUN/best] --out EMB_DIR
    torchrun --nproc_per_node N -m xmodal embed ... --out EMB_DIR      # rank r writes partition r
    xmodal embed ... --shard r/N --out EMB_DIR                         # same, one machine per shard

Writes video_emb/ (img_emb/ for images), text_emb/, metadata/ (parquet), frame_emb/ +
frame_mask/ (per-frame features for text-conditioned re-ranking), shards/ and a provenance
record embeddings.json (weights sha256, adapter, frames, split). The partitions together
equal a single-process run exactly; `xmodal index --from-embeddings EMB_DIR` builds an index.
Missing or unreadable media are an error unless --allow-missing (then listed per shard).
"""

from __future__ import annotations

import argparse
import os

from xmodal.cli.eval import _config, add_model_data_args


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="write clip-retrieval-layout embeddings (sharded over ranks)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(p)
    p.add_argument("--out", required=True, help="embedding folder (shared by all partitions)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="write partition i of N without torch.distributed (e.g. one machine per shard)")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip items with missing/unreadable media (recorded in shards/shard_*.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xmodal.backbones.factory import create_backbone
    from xmodal.data import read_dataset
    from xmodal.embeddings import (
        MissingMediaError, check_media_files, check_output, encode_gallery, missing_media_message, parse_shard,
        provenance, shard_rows, write_partition,
    )
    from xmodal.encoding import encode_texts
    from xmodal.engine import distributed as dist_utils
    from xmodal.engine.train import visual_loader
    from xmodal.errors import XModalError
    from xmodal.methods import AdaptedModel

    cfg = _config(args)
    if args.shard and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise XModalError("--shard is for runs without torchrun; under torchrun each rank takes its own partition")
    info = dist_utils.init_distributed(cfg.train.device)
    try:
        rank, world = parse_shard(args.shard) if args.shard else (info.rank, info.world_size)
        d = cfg.data
        spec = read_dataset(d.dataset, d.root, d.eval_split, drop_missing=False, **d.options)
        items = spec.items[: d.max_eval_items] if d.max_eval_items else spec.items
        if not items:
            raise XModalError(f"{d.dataset} split {d.eval_split!r} under {d.root!r}: no items")
        kind = "image" if all(it.kind == "image" for it in items) else "video"
        model = AdaptedModel(create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                                             device=info.device, seed=cfg.train.seed))
        if args.adapter:
            model.load_adapter(args.adapter)
        out = Path(args.out)
        record = provenance(cfg, args.adapter, kind, model.backbone.embed_dim, len(items), world)
        check_output(out, record)
        rows = shard_rows(len(items), rank, world, cfg.eval.batch_size)
        mine = [items[i] for i in rows]
        what = f"{d.dataset} split {d.eval_split!r} under {d.root}"
        missing = set(check_media_files(mine))
        dropped = [{"id": mine[i].id, "media": mine[i].media, "reason": "file not found"} for i in sorted(missing)]
        _agree(dist_utils, what, dropped, len(items), args.allow_missing, missing_media_message, MissingMediaError)
        enc = encode_gallery(model, [it for i, it in enumerate(mine) if i not in missing], visual_loader(cfg, model),
                             d.num_frames, batch_size=cfg.eval.batch_size, num_workers=d.num_workers,
                             device=info.device)
        _agree(dist_utils, what, enc.dropped, len(items), args.allow_missing, missing_media_message,
               MissingMediaError)
        # text batches follow the visual ones, so partitions cut on batch boundaries reproduce them exactly
        text = encode_texts(model, [it.captions[0] if it.captions else "" for it in enc.items],
                            batch_size=cfg.eval.batch_size, max_words=d.max_words, device=info.device,
                            progress=False)
        write_partition(out, rank, record, enc, text, rows, dropped + enc.dropped)
        dist_utils.barrier()
        print(f"partition {rank}/{world}: {len(enc.items)} of {len(rows)} items "
              f"(items {rows.start}-{rows.stop - 1}) -> {out}")
    finally:
        dist_utils.cleanup()
    return 0


def _agree(dist_utils, what, dropped, total, allow_missing, message, error) -> None:
    """Every rank raises the same error (all ranks' count, first paths) or none does."""
    everyone = [x for part in dist_utils.all_gather_object([(d["media"], d["reason"]) for d in dropped])
                for x in part]
    if everyone and not allow_missing:
        raise error(message(what, everyone, total))
