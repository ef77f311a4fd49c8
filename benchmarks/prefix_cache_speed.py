"""The frozen-prefix cache: training step time with and without it, interleaved in one process.

    python benchmarks/prefix_cache_speed.py --methods projection,partial,msta,coop --epochs 3

On `table.py`'s video world (same data, frames, batch and lr), each method is built twice from
the same seed: one trainer with `train.cache_frozen_prefix`, one without. Both take the same
batches in the same order, one step each in turn (which goes first alternates), so whatever else
the machine runs slows both alike; loading a batch is not timed. Reported per method: median step
time of each over the epochs after the first (the first fills the cache), their ratio, the cache's
hit rate there, and the largest relative difference between the two runs' losses. Writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="projection,partial,msta,coop")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--work", default="table_work", help="table.py's data and frame cache")
    p.add_argument("--videos", type=int, default=900)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--order", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backbone", default="xmodal-tiny")
    p.add_argument("--pretrained", default="xmodal", help="'xmodal' = the packaged weights; 'none' = random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "prefix_cache_speed.json"))
    return p.parse_args(argv)


def measure(args: argparse.Namespace, method: str, root: Path, table_args) -> dict:
    import torch

    import table
    from xmodal.backbones.factory import create_backbone
    from xmodal.engine.train import Trainer, build_data, head_from_config, seed_everything
    from xmodal.methods import apply_method

    cfg = table.run_config(table_args, "video", root, table.Row(method, method), args.seed)
    models, trainers = [], []
    data = None
    for cached in (False, True):
        seed_everything(args.seed)
        model = apply_method(create_backbone(cfg.model.backbone, cfg.model.pretrained, seed=args.seed),
                             cfg.method_config())
        head = model.use_head(head_from_config(cfg.head))
        if data is None:
            data = build_data(cfg, model, log=lambda msg: None)
        steps_per_epoch = len(data.train) // args.batch
        tcfg = dataclasses.replace(cfg.train, cache_frozen_prefix=cached)
        trainers.append(Trainer(model, head, tcfg, args.epochs * steps_per_epoch, torch.device("cpu")))
        models.append(model)
    times = {False: [], True: []}
    losses = {False: [], True: []}
    step = 0
    for epoch in range(args.epochs):
        data.train.set_epoch(epoch)
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for b in range(steps_per_epoch):
            batch = data.collate([data.train[int(i)] for i in order[b * args.batch:(b + 1) * args.batch]])
            turn = (False, True) if step % 2 == 0 else (True, False)
            for cached in turn:
                t0 = time.perf_counter()
                result = trainers[cached].step([batch])
                loss = float(result.loss)  # the step's work is done when its loss is read
                times[cached].append((epoch, (time.perf_counter() - t0) * 1000))
                losses[cached].append(loss)
            step += 1
    stats = trainers[True].prefix_cache.stats.as_dict()
    for t in trainers:
        t.close()
    later = {c: [ms for e, ms in times[c] if e >= 1] or [ms for _, ms in times[c]] for c in (False, True)}
    plain, cached = statistics.median(later[False]), statistics.median(later[True])
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses[False], losses[True]))
    lookups = stats["hits"] + stats["misses"]
    return {"method": method, "steps": step, "step_ms_plain": round(plain, 1), "step_ms_cached": round(cached, 1),
            "ratio": round(cached / plain, 3), "cache": stats,
            "hit_rate": round(stats["hits"] / lookups, 3) if lookups else None,
            "max_relative_loss_difference": rel}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import table

    if args.threads:
        torch.set_num_threads(args.threads)
    table_args = table.parse_args(["--backbone", args.backbone, "--pretrained", args.pretrained, "--work", args.work, "--videos", str(args.videos), "--test", str(args.test),
                                   "--order", str(args.order), "--batch", str(args.batch), "--frames",
                                   str(args.frames), "--epochs", str(args.epochs), "--video-steps", "0",
                                   "--sets", "video"])
    root = table.prepare_data(table_args)["video"]
    rows = []
    print(f"{'method':<12}{'plain ms':>10}{'cached ms':>11}{'ratio':>7}{'hit rate':>10}  cached blocks (vision/text)")
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        r = measure(args, method, root, table_args)
        rows.append(r)
        d = r["cache"]["depth"]
        print(f"{method:<12}{r['step_ms_plain']:>10.0f}{r['step_ms_cached']:>11.0f}{r['ratio']:>7.2f}"
              f"{(r['hit_rate'] or 0):>10.2f}  {d.get('vision')}/{d.get('text')}", flush=True)
    report = {"command": "python benchmarks/prefix_cache_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "epochs": args.epochs, "batch": args.batch,
              "frames": args.frames, "note": "medians over the epochs after the first; both trainers interleaved",
              "results": rows}
    from xmodal.atomic import atomic_write_text

    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
