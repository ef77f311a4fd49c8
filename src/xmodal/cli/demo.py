"""`xmodal demo`: the main job end to end on the embedded default (what `make demo` runs).

Generate the downstream video-text world (filmed in a look and captioned in words that
`xmodal-tiny` never saw in pretraining), evaluate the project's small CLIP zero-shot,
train a Cross-Modal Adapter, evaluate again, print the before/after table (the main test
set, then the order subset: groups of clips that differ only in event order), save the
adapter, index the test gallery and answer one text query with the top-5 videos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the main job end to end on the embedded default",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_run", help="output directory (data, run, index, summary)")
    p.add_argument("--videos", type=int, default=2100,
                   help="clips to generate (train + test + order subset); the default leaves 1800 for training, "
                        "9 per main-set test clip, as MSR-VTT's 9k/1k split")
    p.add_argument("--test", type=int, default=200, help="of which held out as the main test set")
    p.add_argument("--order", type=int, default=100,
                   help="of which held out as the order subset (groups of 4 differing only in event order; 0: none)")
    p.add_argument("--captions-test", type=int, default=1,
                   help="captions per held-out clip; each is a text-to-video query (training clips have 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated world")
    p.add_argument("--query", default=None, help="text query for the gallery (default: a test caption)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a key of {DEMO_CONFIG.name} (e.g. train.epochs=1)")
    p.set_defaults(func=run)


def _generate(data_dir: Path, n: int, n_test: int, n_order: int, seed: int, captions_test: int = 1) -> None:
    from xmodal.synth.world import GENERATOR_VERSIONS, write_video_set

    marker = data_dir / "synth.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        counts = meta.get("counts", {})
        if meta.get("seed") == seed and meta.get("generator_version") == GENERATOR_VERSIONS["videos"] \
                and counts.get("test") == n_test and counts.get("test_order", 0) == n_order \
                and sum(counts.values()) == n and meta.get("captions_test", 1) == captions_test:
            print(f"[1/6] video-text world already at {data_dir} ({n} clips), reusing it")
            return
    print(f"[1/6] generating the video-text world: {n} clips ({n_test} test, {n_order} order subset) -> {data_dir}")
    write_video_set(data_dir, n=n, n_test=n_test, n_order=n_order, seed=seed, captions_test=captions_test,
                    command=f"xmodal synth videos --out {data_dir} --n {n} --split-test {n_test} "
                            f"--split-order {n_order} --captions-test {captions_test} --seed {seed}")


def training_settings(cfg) -> dict:
    """What the demo trained with (demo.yaml plus --set, the seed aside), written into its summary so
    that a record of several demos (benchmarks/demo_seeds.py) copies it instead of re-deriving it."""
    return {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "num_frames": cfg.data.num_frames, "pooling": cfg.head.pooling}


def _machine() -> str:
    """Where the numbers came from (the printed digits can depend on the CPU's vector units)."""
    import os
    import platform

    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}")


def _row(name: str, trainable: int, metrics: dict) -> dict:
    return {"setting": name, "trainable": trainable, **{k: metrics[k] for k in metrics if "/" in k}}


def format_before_after(rows, sections=None) -> str:
    """The before/after table; `sections` = [(title, rows), ...] prints several sets under one header."""
    cols = ["R@1", "R@5", "R@10", "MdR", "MnR"]
    head = f"{'setting':<24}{'trainable':>11} | " + " ".join(f"{'t2v ' + c:>8}" for c in cols) + " | " \
        + " ".join(f"{'v2t ' + c:>8}" for c in cols)
    lines = [head, "-" * len(head)]
    for title, section in sections if sections is not None else [(None, rows)]:
        if title:
            lines.append(title)
        for r in section:
            t2v = " ".join(f"{r[f't2v/{c}']:>8.1f}" for c in cols)
            v2t = " ".join(f"{r[f'v2t/{c}']:>8.1f}" for c in cols)
            lines.append(f"{r['setting']:<24}{r['trainable']:>11,} | {t2v} | {v2t}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from xmodal.backbones.factory import create_backbone
    from xmodal.atomic import atomic_write_text
    from xmodal.engine.config import load_config
    from xmodal.engine.evaluate import encode_eval_set, evaluate
    from xmodal.engine.train import build_data, fit, head_from_config
    from xmodal.methods import AdaptedModel
    from xmodal.retrieval_index import GalleryIndex, index_meta

    t0 = time.time()
    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "run"
    cfg = load_config(DEMO_CONFIG, [f"data.root={data_dir}", f"output_dir={run_dir}", *args.overrides])
    from xmodal.cli.eval import require_weights

    require_weights(cfg, {}, f"{DEMO_CONFIG.name} (--set)", flag=False)  # random weights only when asked for
    if args.captions_test < 1:
        from xmodal.errors import XModalError

        raise XModalError(f"--captions-test={args.captions_test}: expected >= 1")
    _generate(data_dir, args.videos, args.test, args.order, args.seed, args.captions_test)

    print(f"[2/6] zero-shot evaluation of {cfg.model.backbone} (pretrained={cfg.model.pretrained!r})")
    backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, seed=cfg.train.seed)
    zero_shot_model = AdaptedModel(backbone)
    data = build_data(cfg, zero_shot_model, need_train=False)
    head = head_from_config(cfg.head)
    eval_kw = dict(collate_fn=data.collate, max_words=cfg.data.max_words, batch_size=cfg.eval.batch_size,
                   num_workers=cfg.data.num_workers)
    zero_shot = evaluate(zero_shot_model, data.eval, head, **eval_kw)
    order_set = None
    if args.order:
        cfg_order = load_config(DEMO_CONFIG, [f"data.root={data_dir}", f"output_dir={run_dir}", *args.overrides,
                                              "data.eval_split=test_order"])
        order_set = build_data(cfg_order, zero_shot_model, need_train=False).eval
        zero_shot_order = evaluate(zero_shot_model, order_set, head, **eval_kw)

    print(f"[3/6] training a {cfg.method['name']} adapter ({cfg.train.epochs} epochs)")
    result = fit(cfg, run_dir)
    model = AdaptedModel(create_backbone(cfg.model.backbone, cfg.model.pretrained, seed=cfg.train.seed))
    model.load_adapter(run_dir / "best")
    trainable = model.parameter_counts()[0]

    print("[4/6] evaluating the adapted model (best epoch's adapter, reloaded from disk)")
    adapted = evaluate(model, data.eval, head, **eval_kw)
    name = f"+ {cfg.method['name']}"
    sections = [(f"main test set: {len(data.eval.texts)} captions x {len(data.eval.visuals)} videos "
                 f"(chance R@1 {100 / len(data.eval.visuals):.2f}%)",
                 [_row("zero-shot", 0, zero_shot), _row(name, trainable, adapted)])]
    adapted_order = None
    if order_set is not None:
        adapted_order = evaluate(model, order_set, head, **eval_kw)
        sections.append((f"order subset: {len(order_set.texts)} captions x {len(order_set.visuals)} videos in "
                         f"groups that differ only in event order (chance R@1 {100 / len(order_set.visuals):.2f}%)",
                         [_row("zero-shot", 0, zero_shot_order), _row(name, trainable, adapted_order)]))
    table = format_before_after(None, sections)
    from xmodal.encoding import model_device
    from xmodal.provenance import adapter_record, describe_run, train_run_record

    run_info = train_run_record(cfg, model, data.eval, adapted, model_device(model), cfg.train.precision)
    run_info.update(adapter_record(run_dir / "best"))
    print(f"\n{describe_run(run_info)}\nR@K in %, ranks 1-based\n{table}\n")

    adapter_bytes = sum(f.stat().st_size for f in (run_dir / "best").iterdir() if f.is_file())
    print(f"[5/6] adapter saved to {run_dir / 'best'}: {adapter_bytes / 1024:.0f} KB "
          f"({trainable:,} trainable parameters; the frozen backbone is not copied)")

    print("[6/6] indexing the test gallery and answering a text query")
    _, frames, mask = encode_eval_set(model, [], data.eval.visuals, **eval_kw)
    ids = [it.id for it in data.eval.items]
    media = [it.media for it in data.eval.items]
    index = GalleryIndex(frames, mask, ids, media, meta=index_meta(cfg, run_dir / "best"))
    index.save(out / "index")
    query = args.query or data.eval.texts[0]
    from xmodal.encoding import encode_texts

    text = encode_texts(model, [query], max_words=cfg.data.max_words, progress=False)
    ranked = index.search(text, k=len(ids), rerank=head)[0]
    hits = ranked[:5]
    truth = None if args.query else ids[int(data.eval.text_to_visual[0])]
    print(f'query: "{query}"')
    for h in hits:
        mark = "  <- ground truth" if h.id == truth else ""
        print(f"  {h.rank}. {h.id}  score {h.score:.3f}  {h.media}{mark}")
    truth_rank = next((h.rank for h in ranked if h.id == truth), None)
    if truth is not None and truth_rank is not None and truth_rank > 5:
        print(f"  (the ground-truth clip {truth} is ranked {truth_rank} of {len(ids)})")

    summary = {"zero_shot": zero_shot, "adapted": adapted, "trainable": trainable,
               "order_subset": None if order_set is None else {"zero_shot": zero_shot_order, "adapted": adapted_order,
                                                               "videos": len(order_set.visuals)},
               "method": cfg.method, "backbone": cfg.model.backbone, "pretrained": cfg.model.pretrained,
               "best_epoch": result.best_epoch, "adapter_bytes": adapter_bytes,
               "query": query, "top5": [h.__dict__ for h in hits], "ground_truth": truth,
               "ground_truth_rank": truth_rank, "seconds": round(time.time() - t0, 1),
               "world": json.loads((data_dir / "synth.json").read_text()).get("command"),
               "train": training_settings(cfg),
               "machine": _machine(), "run": run_info}
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "demo_table.txt", table + "\n")
    print(f"\ndone in {time.time() - t0:.0f} s on {summary['machine']}; summary in {out / 'demo_summary.json'}")
    return 0
