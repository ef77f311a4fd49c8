"""The paper-style results table on the generated world, with seeds, ablations and a chart.

    python benchmarks/table.py --curves                         # 1. loss curves -> OUT/curves.{json,png}
    python benchmarks/table.py --budget-from benchmarks/results/table/curves.json   # 2. the table there
    python benchmarks/table.py --budget-from ... --device cuda --precision bf16     # same on one GPU
    bash benchmarks/table_cpu.sh     # the claims only (7 methods + 4 ablation settings, 3 seeds), 2-core CPU
    python benchmarks/table.py --quick                          # smoke run: 1 seed, 2 updates, 3 methods

The budget is read off the training curves, not the clock: `--curves` trains every main
method once (seed 0) for `--curve-epochs` full epochs, logs every update's loss and finds
each method's plateau (the first update after which the smoothed loss stays within 5 % of
its total decrease from the final level) at a constant lr after the warm-up (a decaying lr
would flatten every curve by itself). `--budget-from` trains each method for whole epochs up
to its own plateau (an ablation setting: its method's), so a method is neither stopped before
it converged nor charged epochs it does not need; `--uniform-budget` gives every method the
slowest one's plateau instead (the curves' "recommended"). Each record keeps its epochs, and
the whole per-method budget is part of the protocol.

Seeds: the seed claims' methods (`SEEDED_METHODS`: full fine-tuning, partial, projection,
the Cross-Modal Adapter, the uni-modal adapter, MV-Adapter, MSTA) and the four ablation settings
the claims compare against (`CLAIM_ABLATIONS`: share down, d_s=0, MV temporal none, MSTA without
consistency) get every seed of `--seeds`; every other method and ablation setting gets the first
seed only (the table says so).

Rows: zero-shot, then every registered method with its default config, trained on both
downstream sets of `xmodal.synth` (the video-text set whose captions describe event order,
and the shifted image-text set) from the project's own small CLIP (xmodal-tiny,
pretrained="xmodal"), `--seeds` seeds each (method initialisation + data order); cells are
mean +- sample std over seeds. Columns: trainable parameters, R@1/5/10, MdR, MnR both
directions on the test split, and step time / peak memory measured side by side by
`train_speed.py` at the same batch shape (ratios to full fine-tuning).

Ablations (video set, same protocol): the Cross-Modal Adapter's d_s sweep, what is shared
(up / down / both), where adapters sit (attn / ffn / both), sequential vs parallel; the
MV-Adapter's temporal adaptation (none / without calibration / full) and CMT on/off; MSTA's
consistency loss on/off. Every trained video-set model is also evaluated on the order
subset (`test_order`: groups of clips that differ only in event order).

Claims C1-C5 of the seed papers get a verdict computed from the records (`claims`):
"reproduced", "not reproduced", or "inconclusive (difference < 2 × pooled std)".

Every training run writes `OUT/records/<set>/<row>/seed<k>.json` when it finishes, so an
interrupted table resumes where it stopped (pass --force to retrain). The final evaluation
is the last epoch's (no model selection on the test split). Outputs: `OUT/table.md`,
`OUT/table.json`, `OUT/table.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
CORE_ORDER = ["full_finetune", "partial", "projection", "uni_adapter", "cross_modal_adapter"]
#: methods the claims are about: every seed; every other method runs the first seed only
SEEDED_METHODS = {"full_finetune", "partial", "projection", "cross_modal_adapter", "uni_adapter", "mv_adapter", "msta"}
#: ablation settings a claim (C3-C5) is decided on: every seed; the other ablations run the first seed
CLAIM_ABLATIONS = {"cross_modal_adapter-share=down", "cross_modal_adapter-d_s=0", "mv_adapter-temporal=none",
                   "msta-consistency_weight=0.0"}
ORDER_SPLIT = "test_order"
BACKBONE_LR_METHODS = {"full_finetune", "partial"}   # update pretrained weights: a smaller lr
COLS = ("R@1", "R@5", "R@10", "MdR", "MnR")
SETS = {  # name -> what the rows call its two directions
    "video": ("t2v", "v2t"),
    "image": ("t2i", "i2t"),
}


# ------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Row:
    """One table row: a method and the options that differ from its defaults."""

    label: str
    method: Optional[str]                      # None: zero-shot
    options: Tuple[Tuple[str, Any], ...] = ()
    group: str = "main"                        # main | an ablation's name

    @property
    def slug(self) -> str:
        if self.method is None:
            return "zero_shot"
        opts = "".join(f"-{k}={_fmt_opt(v)}" for k, v in self.options)
        return f"{self.method}{opts}"


def _fmt_opt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def main_rows(methods: Optional[Sequence[str]] = None) -> List[Row]:
    """Zero-shot, the paper's rows in its order, then every other registered method."""
    from xmodal.methods import list_methods

    registered = list_methods()
    chosen = registered if methods is None else list(methods)
    unknown = [m for m in chosen if m not in registered]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {registered}")
    ordered = [m for m in CORE_ORDER if m in chosen] + sorted(m for m in chosen if m not in CORE_ORDER)
    return [Row("zero-shot", None)] + [Row(m, m) for m in ordered]


def ablation_rows() -> List[Row]:
    """The papers' ablations; the default setting of each axis is its main-table run."""
    cma, mva = "cross_modal_adapter", "mv_adapter"
    rows = []
    for d_s in (0, 8, 16, 32, 64):
        rows.append(Row(f"d_s={d_s}" + (" (uni-modal)" if d_s == 0 else ""), cma,
                        () if d_s == 16 else (("d_s", d_s),), "CMA: shared dimension d_s"))
    for share in ("up", "down", "both"):
        rows.append(Row(f"share {share}", cma, () if share == "up" else (("share", share),), "CMA: what is shared"))
    for pos in ("attn", "ffn", "both"):
        rows.append(Row(f"after {pos}", cma, () if pos == "both" else (("positions", pos),), "CMA: position"))
    for form in ("sequential", "parallel"):
        rows.append(Row(form, cma, () if form == "sequential" else (("form", form),), "CMA: form"))
    for temporal in ("none", "no_calibration", "full"):
        rows.append(Row(f"temporal {temporal}", mva, () if temporal == "full" else (("temporal", temporal),),
                        "MV-Adapter: temporal adaptation"))
    rows.append(Row("CMT off", mva, (("cmt", False),), "MV-Adapter: cross modality tying"))
    rows.append(Row("CMT on", mva, (), "MV-Adapter: cross modality tying"))
    rows.append(Row("consistency off", "msta", (("consistency_weight", 0.0),), "MSTA: consistency loss"))
    rows.append(Row("consistency on", "msta", (), "MSTA: consistency loss"))
    return rows


def claim_ablation_rows() -> List[Row]:
    """The ablation settings a claim is decided on, with their axis' default (a main-table run)."""
    rows = ablation_rows()
    groups = {r.group for r in rows if r.slug in CLAIM_ABLATIONS}
    return [r for r in rows if r.group in groups and (r.slug in CLAIM_ABLATIONS or not r.options)]


def is_seeded(group: str, method: Optional[str], slug: str) -> bool:
    """Whether a row gets every seed: the claims' main rows and the ablation settings a claim
    compares against; every other row (and zero-shot, which is deterministic) runs once."""
    if group == "main":
        return method is not None and method in SEEDED_METHODS
    return slug in CLAIM_ABLATIONS or slug in SEEDED_METHODS  # an axis' default is that method's main run


def seeds_for(row: Row, seeds: Sequence[int]) -> List[int]:
    return list(seeds) if is_seeded(row.group, row.method, row.slug) else list(seeds[:1])


# --------------------------------------------------------------------- protocol
def plateau_epochs(plateau_step: int, steps_per_epoch: int) -> int:
    """Whole epochs that reach a plateau at update `plateau_step` (at least 1)."""
    return max(1, math.ceil(plateau_step / max(steps_per_epoch, 1)))


def per_method_budget(curves: Dict[str, Any]) -> Dict[str, Dict[str, int]]:
    """{set: {method: full epochs up to its loss plateau}} from a --curves report."""
    spe = curves["recommended"]["steps_per_epoch"]
    budget: Dict[str, Dict[str, int]] = {}
    for c in curves["curves"].values():
        budget.setdefault(c["set"], {})[c["method"]] = plateau_epochs(c["plateau_step"], spe[c["set"]])
    return budget


def epochs_for(args: argparse.Namespace, set_name: str, method: Optional[str]) -> int:
    """Full epochs of `method` on `set_name`: its own plateau under a per-method budget, else --epochs."""
    if args.budget is None or method is None:
        return args.epochs
    try:
        return args.budget[set_name][method]
    except KeyError:
        raise SystemExit(f"--budget-from {args.budget_from}: no curve of {set_name}/{method}; "
                         f"run --curves for it first (or pass --uniform-budget)") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="benchmarks/results/table", help="results folder (table.md/.json/.png, records/)")
    p.add_argument("--work", default="table_work", help="generated data, frame cache and run directories")
    p.add_argument("--backbone", default="xmodal-tiny")
    p.add_argument("--pretrained", default="xmodal", help="'xmodal' = the packaged weights; 'none' = random")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--sets", default="video,image", help="which downstream sets (video, image)")
    p.add_argument("--methods", default="all", help="comma-separated methods for the main table, or 'all'")
    p.add_argument("--ablations", choices=["all", "claims", "none"], default="all",
                   help="ablation settings: every one, only those a claim (C3-C5) is decided on, or none")
    p.add_argument("--no-ablations", dest="ablations", action="store_const", const="none", help="= --ablations none")
    p.add_argument("--videos", type=int, default=900, help="clips generated (train + test + order subset)")
    p.add_argument("--order", type=int, default=100, help="clips of the order subset (video set)")
    p.add_argument("--images", type=int, default=1200, help="images generated (train + test)")
    p.add_argument("--test", type=int, default=200, help="test items of each set")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated world")
    p.add_argument("--frames", type=int, default=4, help="frames per clip (video set)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--video-steps", type=int, default=12, help="updates per epoch on the video set (0: full epoch)")
    p.add_argument("--image-steps", type=int, default=24, help="updates per epoch on the image set (0: full epoch)")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of the parameter-efficient methods")
    p.add_argument("--backbone-lr", type=float, default=1e-4, help="lr of full fine-tuning and partial")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice; with --jobs, per run and 1 by default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at a time, each in its own process (a GPU shares one card between them)")
    p.add_argument("--cache-frozen-prefix", action="store_true",
                   help="CPU: reuse the output of the blocks below a method's lowest adapted one (projection, "
                        "partial, MSTA); equal up to float rounding, so it is part of the protocol")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new run after this many seconds; what finished is reported, the rest listed")
    p.add_argument("--speed-steps", type=int, default=1, help="train_speed.py: measured steps per round")
    p.add_argument("--speed-rounds", type=int, default=2, help="train_speed.py: interleaved rounds")
    p.add_argument("--no-speed", action="store_true", help="skip the step-time/peak-memory columns")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--force", action="store_true", help="retrain runs that already have a result")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's directory (checkpoints, metrics.csv)")
    p.add_argument("--report-only", action="store_true", help="only rebuild table.md/.json/.png from OUT/records")
    p.add_argument("--curves", action="store_true",
                   help="train each main method once for --curve-epochs full epochs; write OUT/curves.json/.png")
    p.add_argument("--curve-epochs", type=int, default=6, help="--curves: full epochs per method")
    p.add_argument("--budget-from", default=None, metavar="CURVES_JSON",
                   help="train each method for full epochs up to its own loss plateau in a --curves run "
                        "(ablation settings: their method's); --uniform-budget: the slowest method's, for all")
    p.add_argument("--uniform-budget", action="store_true",
                   help="with --budget-from: every method trains the slowest method's plateau (the recommendation)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: seed 0, 2 updates, zero-shot + projection + cross_modal_adapter, 48/40 items")
    p.set_defaults(constant_lr=False)  # --curves sets it: the lr stays constant after the warm-up
    args = p.parse_args(argv)
    args.budget = None  # {set: {method: epochs}} with --budget-from (per-method plateaus)
    if args.quick:
        args.seeds, args.video_steps, args.image_steps = "0", 2, 2
        args.videos, args.order, args.images, args.test, args.batch = 56, 8, 40, 16, 8
        if args.methods == "all":
            args.methods = "projection,cross_modal_adapter"
        if args.ablations == "all":
            args.ablations = "none"
        args.speed_rounds = 1
    if args.budget_from:
        curves = json.loads(Path(args.budget_from).read_text())
        if curves.get("missing"):  # a budget read off some curves only may be too short for the others
            p.error(f"--budget-from {args.budget_from}: the curves of {', '.join(curves['missing'])} are missing; "
                    f"finish them with --curves first")
        rec = curves["recommended"]
        args.epochs, args.video_steps, args.image_steps = int(rec["epochs"]), 0, 0
        if not args.uniform_budget:
            args.budget = per_method_budget(curves)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.set_list = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in args.set_list if s not in SETS]
    if bad or not args.set_list:
        p.error(f"--sets: expected names from {sorted(SETS)}, got {args.sets!r}")
    if not args.seed_list:
        p.error("--seeds: expected at least one seed")
    if args.jobs < 1:
        p.error(f"--jobs: expected a positive number of parallel runs, got {args.jobs}")
    return args


def protocol(args: argparse.Namespace) -> Dict[str, Any]:
    """What every run shares; stored with each result so that a changed protocol is not mixed in
    (the generator versions too: a record of another world is retrained, never reused)."""
    from xmodal.synth.world import GENERATOR_VERSIONS

    return {"generators": {"videos": GENERATOR_VERSIONS["videos"], "shifted-images": GENERATOR_VERSIONS["shifted-images"]},
            "backbone": args.backbone, "pretrained": args.pretrained, "videos": args.videos, "order": args.order,
            "images": args.images,
            "test": args.test, "data_seed": args.data_seed, "frames": args.frames, "batch": args.batch,
            "epochs": args.epochs if args.budget is None else "each method's loss plateau (budget)",
            **({"budget": args.budget} if args.budget is not None else {}), "video_steps": args.video_steps, "image_steps": args.image_steps,
            "lr": args.lr, "backbone_lr": args.backbone_lr, "precision": args.precision,
            **({"schedule": "constant lr after warm-up"} if args.constant_lr else {}),
            **({"cache_frozen_prefix": True} if args.cache_frozen_prefix else {})}


# ------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace) -> Dict[str, Path]:
    """Generate the two downstream sets (reused when already there) and cache the videos' frames."""
    from xmodal.synth.world import GENERATOR_VERSIONS, read_jsonl, write_shifted_images, write_video_set

    work = Path(args.work)
    roots = {}
    for name in args.set_list:
        kind = "videos" if name == "video" else "shifted-images"
        size = f"n{args.videos}-o{args.order}" if name == "video" else f"n{args.images}"
        root = work / "data" / f"{name}-v{GENERATOR_VERSIONS[kind]}-{size}-s{args.data_seed}"
        n = args.videos if name == "video" else args.images
        marker = root / "synth.json"
        if not marker.is_file():
            print(f"generating the {name} set: {n} items ({args.test} test) -> {root}")
            if name == "video":
                write_video_set(root, n=n, n_test=args.test, n_order=args.order, seed=args.data_seed)
            else:
                write_shifted_images(root, n=n, n_test=args.test, seed=args.data_seed)
        roots[name] = root
    if "video" in roots:
        from xmodal.data.frame_cache import extract_frames

        root = roots["video"]
        splits = ("train", "test") + ((ORDER_SPLIT,) if (root / f"{ORDER_SPLIT}.jsonl").is_file() else ())
        items = [{"id": r["id"], "media": str(root / r["video"])}
                 for split in splits for r in read_jsonl(root / f"{split}.jsonl")]
        extract_frames(items, work / "frames" / root.name, fps=1.0, fmt="npy", size=0, progress=True,
                       bench_clips=0)
    return roots


def run_config(args: argparse.Namespace, set_name: str, root: Path, row: Row, seed: int):
    from xmodal.engine.config import DataConfig, EvalConfig, HeadConfig, ModelConfig, RunConfig, TrainConfig

    video = set_name == "video"
    steps = args.video_steps if video else args.image_steps
    lr = args.backbone_lr if row.method in BACKBONE_LR_METHODS else args.lr
    return RunConfig(
        data=DataConfig(dataset="jsonl", root=str(root), num_frames=args.frames if video else 1, max_words=32,
                        num_workers=0, frame_cache=str(Path(args.work) / "frames" / root.name) if video else None),
        model=ModelConfig(backbone=args.backbone, pretrained=None if args.pretrained == "none" else args.pretrained),
        method={"name": row.method or "none (zero-shot: evaluated, never trained)", **dict(row.options)},
        head=HeadConfig(pooling="text_conditioned" if video else "mean"),
        train=TrainConfig(epochs=epochs_for(args, set_name, row.method), batch_size=args.batch, lr=lr, device=args.device,
                          min_lr_ratio=1.0 if args.constant_lr else 0.0,
                          precision=args.precision, seed=seed, max_steps_per_epoch=steps or None, progress=False,
                          cache_frozen_prefix=args.cache_frozen_prefix,
                          tensorboard=False, eval_every=0, log_every=10**9),
        eval=EvalConfig(batch_size=64),
        output_dir=str(Path(args.work) / "runs" / set_name / row.slug / f"seed{seed}"))


def result_path(args: argparse.Namespace, set_name: str, row: Row, seed: int) -> Path:
    return Path(args.out) / "records" / set_name / row.slug / f"seed{seed}.json"


def finished_record(path: Path, proto: Dict[str, Any]) -> bool:
    """A record of a finished run at this protocol is there (one of another protocol is not reused)."""
    return path.is_file() and json.loads(path.read_text()).get("protocol") == proto


def _write_json(path: Path, data: Any) -> None:
    from xmodal.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def evaluate_order_subset(cfg, model, root: Path) -> Optional[Dict[str, float]]:
    """Metrics on the order subset (video set), or None when the set has none."""
    import dataclasses

    from xmodal.engine.evaluate import evaluate
    from xmodal.engine.train import build_data, head_from_config

    if not (root / f"{ORDER_SPLIT}.jsonl").is_file():
        return None
    order_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_split=ORDER_SPLIT))
    data = build_data(order_cfg, model, need_train=False, log=lambda msg: None)
    metrics = evaluate(model, data.eval, head_from_config(cfg.head), collate_fn=data.collate,
                       max_words=cfg.data.max_words, batch_size=cfg.eval.batch_size, progress=False)
    return {k: float(v) for k, v in metrics.items()}


def train_one(args: argparse.Namespace, set_name: str, root: Path, row: Row, seed: int) -> Dict[str, Any]:
    """Train (or, for zero-shot, only evaluate) one row with one seed; the result record."""
    from xmodal.backbones.factory import create_backbone
    from xmodal.engine.evaluate import evaluate
    from xmodal.engine.train import build_data, fit, head_from_config, seed_everything
    from xmodal.methods import AdaptedModel, apply_method

    cfg = run_config(args, set_name, root, row, seed)
    t0 = time.time()
    if row.method is None:
        model = AdaptedModel(create_backbone(cfg.model.backbone, cfg.model.pretrained, seed=seed))
        data = build_data(cfg, model, need_train=False)
        metrics = evaluate(model, data.eval, head_from_config(cfg.head), collate_fn=data.collate,
                           max_words=cfg.data.max_words, batch_size=cfg.eval.batch_size, progress=False)
        trainable, total = 0, model.parameter_counts()[1]
        from xmodal.provenance import train_run_record

        extra = {"run": train_run_record(cfg, model, data.eval, metrics, "cpu" if args.device == "auto" else args.device,
                                         args.precision)}
    else:
        seed_everything(seed)  # as fit() would before building the model itself
        model = apply_method(create_backbone(cfg.model.backbone, cfg.model.pretrained, seed=seed),
                             cfg.method_config())
        trainable, total = model.parameter_counts()
        result = fit(cfg, cfg.output_dir, model=model, log=lambda msg: None)
        metrics = result.final_metrics
        extra = {"updates": result.global_step, "first_loss": result.step_losses[0],
                 "last_loss": result.step_losses[-1], "losses": [round(float(x), 5) for x in result.step_losses]}
        written = Path(cfg.output_dir) / "metrics.json"  # fit's record of what was measured
        if written.is_file():
            extra["run"] = json.loads(written.read_text()).get("run")
        if result.prefix_cache:  # what the frozen-prefix cache covered and how often it was hit
            extra["frozen_prefix_cache"] = result.prefix_cache
        if not args.keep_runs:  # the record below is what the table needs; checkpoints are large
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
    if set_name == "video":
        order = evaluate_order_subset(cfg, model, root)
        if order is not None:
            extra["order_metrics"] = order
    return {"set": set_name, "row": row.label, "group": row.group, "method": row.method or "zero_shot",
            "options": dict(row.options), "seed": seed, "trainable": trainable, "total": total,
            "metrics": {k: float(v) for k, v in metrics.items()}, "seconds": round(time.time() - t0, 1),
            "epochs": 0 if row.method is None else cfg.train.epochs,
            "protocol": protocol(args), **extra}


# -------------------------------------------------------------------- execution
Job = Tuple[str, Row, int]  # (set, row, seed)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def execute(args: argparse.Namespace, todo: Sequence[Job], roots: Dict[str, Path], on_record,
            deadline: Optional[float] = None) -> Tuple[List[str], List[Job]]:
    """Train every job (`--jobs` at a time, each in a spawned process of its own), calling
    `on_record(job, record)` in this process as each one finishes, in finishing order.

    Runs are independent (each seeds itself and writes nothing another reads), so running them
    side by side changes no number. After `deadline` no new run starts; the ones under way
    finish. Returns (failures, jobs left unrun by the deadline)."""
    failures: List[str] = []
    skipped: List[Job] = []

    def failed(job: Job, exc: BaseException) -> None:
        failures.append(f"{job[0]} {job[1].slug} seed {job[2]}: {type(exc).__name__}: {exc}")
        print(f"FAILED {failures[-1]}", flush=True)

    def over() -> bool:
        return deadline is not None and time.time() > deadline

    if args.jobs <= 1:
        for job in todo:
            if over():
                skipped.append(job)
                continue
            try:
                rec = train_one(args, job[0], roots[job[0]], job[1], job[2])
            except Exception as exc:  # one broken configuration must not cost the others' hours
                failed(job, exc)
                continue
            on_record(job, rec)
        return failures, skipped

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(args.threads or 1,)) as pool:
        pending = {pool.submit(train_one, args, s, roots[s], row, seed): (s, row, seed) for s, row, seed in todo}
        while pending:
            done, _ = wait(list(pending), timeout=2.0, return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    failed(job, exc)
                else:
                    on_record(job, fut.result())
            if over():
                for fut in [f for f in pending if f.cancel()]:
                    skipped.append(pending.pop(fut))
    return failures, skipped


# ------------------------------------------------------------------------ speed
def measure_speed(args: argparse.Namespace, set_name: str, methods: List[str]) -> Dict[str, Any]:
    """train_speed.py's interleaved step time and peak memory at this set's batch shape."""
    sys.path.insert(0, str(HERE))
    import train_speed

    argv = ["--device", "cpu" if args.device == "auto" and not train_speed._cuda() else
            ("cuda" if args.device == "auto" else args.device),
            "--backbone", args.backbone, "--batch", str(args.batch),
            "--frames", str(args.frames if set_name == "video" else 1), "--steps", str(args.speed_steps),
            "--rounds", str(args.speed_rounds), "--methods", ",".join(methods), "--mem-steps", "1",
            "--precision", args.precision, "--pooling", "text_conditioned" if set_name == "video" else "mean"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_memory:
        argv.append("--no-memory")
    report = train_speed.measure(train_speed.parse_args(argv))
    print(train_speed.format_table(report))
    report["shape"] = speed_shape(args, set_name)
    return report


def speed_shape(args: argparse.Namespace, set_name: str) -> Dict[str, Any]:
    return {"backbone": args.backbone, "batch": args.batch, "frames": args.frames if set_name == "video" else 1,
            "precision": args.precision, "memory": not args.no_memory}


# ---------------------------------------------------------------------- summary
def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(records: List[Dict[str, Any]], rows: List[Row], set_name: str,
              speed: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per-row mean/std over seeds (rows without any finished run are left out)."""
    from xmodal.engine.evaluate import METRIC_KEYS

    out = []
    for row in rows:
        mine = [r for r in records if r["set"] == set_name and r["row_slug"] == row.slug]
        if not mine:
            continue
        entry = {"row": row.label, "slug": row.slug, "group": row.group, "method": row.method or "zero_shot",
                 "options": dict(row.options), "seeds": sorted(r["seed"] for r in mine),
                 "trainable": mine[0]["trainable"], "total": mine[0]["total"], "metrics": {}}
        for key in METRIC_KEYS:
            m, s = mean_std([r["metrics"][key] for r in mine])
            entry["metrics"][key] = {"mean": m, "std": s}
        if all("order_metrics" in r for r in mine):
            entry["order_metrics"] = {}
            for key in METRIC_KEYS:
                m, s = mean_std([r["order_metrics"][key] for r in mine])
                entry["order_metrics"][key] = {"mean": m, "std": s}
        res = (speed or {}).get("results", {}).get(row.method or "", None) if row.group == "main" else None
        if res:
            entry["step_ms"] = res["step_ms_median"]
            entry["step_time_ratio"] = res["step_time_ratio"]
            if "peak_mb" in res:
                entry["peak_mb"] = res["peak_mb"]
                entry["peak_memory_ratio"] = res["peak_memory_ratio"]
        out.append(entry)
    return out


def _cell(stat: Dict[str, float], digits: int = 1) -> str:
    if stat["std"] == 0:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _label(e: Dict[str, Any], n_seeds: int) -> str:
    """Row label; a row with fewer finished seeds than its policy asks for says how many it has."""
    k = len(e["seeds"])
    if e["method"] == "zero_shot":
        return e["row"]
    want = n_seeds if is_seeded(e["group"], e["method"], e["slug"]) else 1
    if k == want:
        return e["row"] if want == n_seeds else f"{e['row']} (1 seed)"
    return f"{e['row']} ({k} of {want} seeds)"


def markdown_table(entries: List[Dict[str, Any]], set_name: str, with_speed: bool, n_seeds: int) -> str:
    fwd, bwd = SETS[set_name]
    head = ["method", "trainable", "%"] + [f"{fwd} {c}" for c in COLS] + [f"{bwd} {c}" for c in COLS]
    if with_speed:
        head += ["step ms (×FT)", "peak MB (×FT)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        pct = 100 * e["trainable"] / e["total"] if e["total"] else 0.0
        cells = [_label(e, n_seeds), f"{e['trainable']:,}", f"{pct:.3g}"]
        cells += [_cell(e["metrics"][f"{d}/{c}"]) for d in ("t2v", "v2t") for c in COLS]
        if with_speed:
            cells.append(f"{e['step_ms']:.0f} ({e['step_time_ratio']:.2f})" if "step_ms" in e else "-")
            cells.append(f"{e['peak_mb']:.0f} ({e['peak_memory_ratio']:.2f})" if "peak_mb" in e else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_markdown(entries: List[Dict[str, Any]], n_seeds: int) -> str:
    head = ["ablation", "setting", "trainable"] + [f"t2v {c}" for c in COLS] + [f"v2t {c}" for c in COLS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e["group"], _label(e, n_seeds), f"{e['trainable']:,}"]
        cells += [_cell(e["metrics"][f"{d}/{c}"]) for d in ("t2v", "v2t") for c in COLS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(tables: Dict[str, List[Dict[str, Any]]], path: Path) -> Path:
    """R@1 and R@10 of every main-table row, both directions, both sets, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from xmodal.engine.plot import _save

    series = [(d, c) for c in ("R@1", "R@10") for d in ("t2v", "v2t")]
    width = 0.8 / len(series)
    colours = ["#1f77b4", "#ff7f0e", "#9ecae1", "#fdbe85"]
    fig, axes = plt.subplots(len(tables), 1, figsize=(13, 3.8 * len(tables)), squeeze=False)
    for ax, (set_name, entries) in zip(axes[:, 0], tables.items()):
        x = np.arange(len(entries))
        names = dict(zip(("t2v", "v2t"), SETS[set_name]))
        for k, (d, c) in enumerate(series):
            means = [e["metrics"][f"{d}/{c}"]["mean"] for e in entries]
            stds = [e["metrics"][f"{d}/{c}"]["std"] for e in entries]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=1.5,
                   color=colours[k], label=f"{names[d]} {c}")
        top = max(e["metrics"][f"{d}/{c}"]["mean"] + e["metrics"][f"{d}/{c}"]["std"] for e in entries
                  for d, c in series)
        ax.set_ylim(0, 1.2 * top + 1)  # room for the legend above the bars
        ax.set_xticks(x, [e["row"] for e in entries], rotation=35, ha="right")
        ax.set_ylabel("recall (%)")
        ax.set_title(f"{set_name} set (mean ± std over seeds)")
        ax.legend(loc="upper right", fontsize=8, ncol=4)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path



# ----------------------------------------------------------------------- claims
CLAIM_METRIC = "t2v/R@1"
INCONCLUSIVE = "inconclusive (difference < 2 × pooled std)"


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt of the mean of the two sample variances (a single run contributes variance 0)."""
    va = statistics.variance(a) if len(a) > 1 else 0.0
    vb = statistics.variance(b) if len(b) > 1 else 0.0
    return math.sqrt((va + vb) / 2)


def compare(a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> Dict[str, Any]:
    """Is mean(a) - mean(b) > -margin? "reproduced" / "not reproduced" / inconclusive.

    Inconclusive when |mean(a) - mean(b) + margin| < 2 × pooled std, or when either side
    has a single run (no spread to judge the difference by).
    """
    if not a or not b:
        return {"verdict": "not run", "diff": None, "pooled_std": None, "n": [len(a), len(b)]}
    diff = statistics.fmean(a) - statistics.fmean(b)
    sd = pooled_std(a, b)
    if len(a) < 2 or len(b) < 2 or abs(diff + margin) < 2 * sd:
        verdict = INCONCLUSIVE
    else:
        verdict = "reproduced" if diff + margin > 0 else "not reproduced"
    return {"verdict": verdict, "diff": diff, "pooled_std": sd, "n": [len(a), len(b)]}


def _values(records: List[Dict[str, Any]], slug: str, key: str = "metrics", metric: str = CLAIM_METRIC,
            set_name: str = "video") -> List[float]:
    return [r[key][metric] for r in records if r["set"] == set_name and r["row_slug"] == slug and key in r]


def claims(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Verdicts C1-C5 of the seed papers, on the video set's t2v R@1 (C3: on the order subset)."""
    cma, uni, ft = "cross_modal_adapter", "uni_adapter", "full_finetune"
    out = []

    def add(cid: str, text: str, result: Dict[str, Any], **extra) -> None:
        out.append({"id": cid, "claim": text, **result, **extra})

    add("C1", "the Cross-Modal Adapter beats the uni-modal adapter", compare(_values(records, cma), _values(records, uni)))
    c2 = compare(_values(records, cma), _values(records, ft), margin=1.0)
    share = [r for r in records if r["row_slug"] == cma and r.get("total")]
    pct = 100 * share[0]["trainable"] / share[0]["total"] if share else None
    if pct is not None and pct >= 1.0 and c2["verdict"] != "not run":
        c2["verdict"] = "not reproduced"
    add("C2", "the Cross-Modal Adapter is within 1 point of full fine-tuning at < 1% trainable parameters", c2,
        trainable_pct=pct)
    add("C3", "MV-Adapter's temporal adaptation beats none on the order subset",
        compare(_values(records, "mv_adapter", "order_metrics"), _values(records, "mv_adapter-temporal=none",
                                                                          "order_metrics")))
    up, down, none = (_values(records, cma), _values(records, f"{cma}-share=down"), _values(records, f"{cma}-d_s=0"))
    vs_down, vs_none = compare(up, down), compare(up, none)
    verdicts = {vs_down["verdict"], vs_none["verdict"]}
    if "not run" in verdicts:
        verdict = "not run"
    elif "not reproduced" in verdicts:
        verdict = "not reproduced"
    elif verdicts == {"reproduced"}:
        verdict = "reproduced"
    else:
        verdict = INCONCLUSIVE
    add("C4", "sharing the up-projection beats sharing the down-projection and sharing none (d_s=0)",
        {"verdict": verdict, "vs_down": vs_down, "vs_none": vs_none})
    add("C5", "MSTA's consistency loss helps when descriptions are present",
        compare(_values(records, "msta"), _values(records, "msta-consistency_weight=0.0")))
    return out


def claims_markdown(results: List[Dict[str, Any]]) -> str:
    lines = ["| claim | what | difference (pooled std) | verdict |", "|---|---|---|---|"]
    for c in results:
        if c["id"] == "C4":
            parts = [f"vs {k[3:]}: {c[k]['diff']:+.2f} ({c[k]['pooled_std']:.2f})" for k in ("vs_down", "vs_none")
                     if c[k]["diff"] is not None]
            diff = "; ".join(parts) or "-"
        else:
            diff = "-" if c["diff"] is None else f"{c['diff']:+.2f} ({c['pooled_std']:.2f})"
        lines.append(f"| {c['id']} | {c['claim']} | {diff} | {c['verdict']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------- curves
def smooth(values: Sequence[float], window: int) -> List[float]:
    """Trailing moving average (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plateau_step(losses: Sequence[float], tolerance: float = 0.05, window: Optional[int] = None) -> int:
    """First update (1-based) after which the smoothed loss stays within `tolerance` of its total
    decrease above the final smoothed level; len(losses) when it never settles before the end."""
    if not losses:
        return 0
    window = window or max(5, len(losses) // 20)
    sm = smooth(list(losses), window)
    first, last = max(sm[:window]), sm[-1]
    band = last + tolerance * max(first - last, 0.0)
    step = len(sm)
    for i in range(len(sm) - 1, -1, -1):
        if sm[i] > band:
            break
        step = i + 1
    return step


def recommend_budget(curves: Dict[str, Dict[str, Any]], steps_per_epoch: Dict[str, int]) -> Dict[str, Any]:
    """The slowest method's plateau on any set, in whole epochs (every set trains that many)."""
    epochs = 1
    slowest = None
    for key, c in curves.items():
        set_name = c["set"]
        need = plateau_epochs(c["plateau_step"], steps_per_epoch[set_name])
        if need >= epochs:
            epochs, slowest = need, key
    return {"epochs": epochs, "slowest": slowest, "steps_per_epoch": steps_per_epoch}


def curves_figure(curves: Dict[str, Dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xmodal.engine.plot import _save

    sets = sorted({c["set"] for c in curves.values()})
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 4.5), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        shown = [c for c in curves.values() if c["set"] == set_name]
        colours = plt.get_cmap("tab20").colors  # 20 distinct colours: no two methods share one
        for i, c in enumerate(shown):
            sm = smooth(c["losses"], max(5, len(c["losses"]) // 20))
            (line,) = ax.plot(range(1, len(sm) + 1), sm, lw=1.2, label=c["method"], color=colours[i % 20],
                              ls="-" if i < 20 else "--")
            ax.axvline(c["plateau_step"], color=line.get_color(), lw=0.6, ls=":")
        ax.set_title(f"{set_name} set: smoothed training loss (dotted: plateau)")
        ax.set_xlabel("update")
        ax.set_ylabel("InfoNCE loss")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def run_curves(args: argparse.Namespace, rows: List[Row], deadline: Optional[float] = None) -> Dict[str, Any]:
    """Train every main method once (first seed) for --curve-epochs full epochs; plateau per method.

    The lr stays constant after the warm-up: under the table's cosine decay every loss flattens as the
    lr goes to zero (a 6-epoch cosine run put all seven claim methods' plateaus at 83-89% of it), so a
    plateau there says when the schedule ends, not when the method has converged."""
    args.epochs, args.video_steps, args.image_steps = args.curve_epochs, 0, 0
    args.constant_lr, args.budget = True, None
    roots = prepare_data(args)
    out = Path(args.out)
    seed = args.seed_list[0]
    proto = protocol(args)

    def path_of(set_name: str, row: Row) -> Path:
        return out / "curves" / set_name / f"{row.slug}.json"

    trained = [(s, row) for s in args.set_list for row in rows if row.method is not None]
    todo = [(s, row, seed) for s, row in trained if args.force or not finished_record(path_of(s, row), proto)]

    def on_record(job: Job, rec: Dict[str, Any]) -> None:
        _write_json(path_of(job[0], job[1]), rec)
        print(f"curve: {job[0]} {job[1].slug} ({args.curve_epochs} epochs, {rec['seconds']:.0f} s)", flush=True)

    failures, skipped = execute(args, todo, roots, on_record, deadline)
    curves: Dict[str, Dict[str, Any]] = {}
    steps_per_epoch: Dict[str, int] = {}
    missing = []
    for set_name, row in trained:
        path = path_of(set_name, row)
        if not finished_record(path, proto):
            missing.append(f"{set_name}/{row.slug}")
            continue
        rec = json.loads(path.read_text())
        losses = rec["losses"]
        steps_per_epoch[set_name] = rec["updates"] // max(args.curve_epochs, 1)
        curves[f"{set_name}/{row.slug}"] = {"set": set_name, "method": row.slug, "losses": losses,
                                            "plateau_step": plateau_step(losses), "updates": rec["updates"]}
    if missing:  # a budget chosen without them could be too short for exactly those methods
        print(f"curves missing for {len(missing)} method(s) ({', '.join(missing)}): the recommendation "
              f"below covers only the others; rerun to finish them", file=sys.stderr)
    report = {"protocol": proto, "seed": seed, "curves": curves,
              "recommended": recommend_budget(curves, steps_per_epoch),
              **({"missing": missing} if missing else {}), **({"failures": failures} if failures else {})}
    _write_json(out / "curves.json", report)
    curves_figure(curves, out / "curves.png")
    rec = report["recommended"]
    print(f"recommended budget: {rec['epochs']} epoch(s) (slowest to plateau: {rec['slowest']}); "
          f"run: python benchmarks/table.py --budget-from {out / 'curves.json'}")
    return report


def load_records(out: Path, proto: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Finished runs of this protocol (results of another protocol in OUT/records are ignored)."""
    records = []
    for f in sorted((out / "records").glob("*/*/seed*.json")):
        rec = json.loads(f.read_text())
        if rec.get("protocol") == proto:
            rec["row_slug"] = f.parent.name
            records.append(rec)
    return records


def write_report(args: argparse.Namespace, rows: List[Row], ablations: List[Row],
                 speed: Dict[str, Dict[str, Any]], seconds: Optional[float]) -> Dict[str, Any]:
    out = Path(args.out)
    proto = protocol(args)
    records = load_records(out, proto)
    tables = {s: summarize(records, rows, s, speed.get(s)) for s in args.set_list}
    abl = summarize(records, ablations, "video", None) if ablations and "video" in args.set_list else []
    argv = [a for a in sys.argv[1:] if a != "--report-only"]  # the command that produced the runs
    command = " ".join(["python benchmarks/table.py", shlex.join(argv)]).strip()
    import torch

    threads = args.threads or (1 if args.jobs > 1 else torch.get_num_threads())
    machine = (f"{platform.machine()} ({os.cpu_count()} CPU cores), {threads} thread(s) per run, "
               f"torch {torch.__version__}")
    if args.device.startswith("cuda") and torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name()}; " + machine
    verdicts = claims(records)
    if args.jobs > 1:
        machine += f"; {args.jobs} runs at a time"
    machine += f"; {args.precision}" + ("; frozen-prefix cache on" if args.cache_frozen_prefix else "")
    report = {"protocol": proto, "seeds": args.seed_list, "command": command, "machine": machine,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "seed_policy": {
                  "all_seeds": sorted(SEEDED_METHODS), "other_methods": args.seed_list[:1]},
              "seconds": seconds, "tables": tables, "ablations": abl, "claims": verdicts,
              "speed": {s: {k: v for k, v in r.items() if k != "results"} for s, r in speed.items()}}
    others = sorted({e["method"] for t in tables.values() for e in t} - SEEDED_METHODS - {"zero_shot"})
    md = [f"Generated world, backbone {args.backbone} (pretrained={args.pretrained}); "
          f"{len(args.seed_list)} seed(s) {args.seed_list} for {', '.join(sorted(SEEDED_METHODS))} and their "
          f"ablations, 1 seed ({args.seed_list[0]}) for the other methods ({', '.join(others) or 'none'}); "
          f"mean ± sample std; R@K in %, ranks 1-based. {machine}, {report['date']}. Command: `{command}`", ""]
    if args.budget is not None:
        md += ["Budget: each method trains full epochs up to its own loss plateau in the curves (`--budget-from "
               f"{args.budget_from}`; an ablation setting gets its method's): "
               + "; ".join(f"{s} " + ", ".join(f"{m} {n}" for m, n in sorted(b.items()))
                           for s, b in args.budget.items() if s in args.set_list) + ".", ""]
    else:
        steps = {"video": args.video_steps, "image": args.image_steps}
        md += [f"Budget: {args.epochs} epoch(s) for every method"
               + "".join(f"; {s}: at most {steps[s]} updates per epoch" for s in args.set_list if steps[s]) + ".", ""]
    trained = [r for r in records if r.get("method") != "zero_shot"]
    if trained:
        md += [f"Time: {len(trained)} training runs took {sum(r['seconds'] for r in trained) / 60:.0f} run-minutes"
               + (f"; this invocation {seconds / 60:.0f} min of wall time" if seconds else "") + ".", ""]
    for s, entries in tables.items():
        n_train = args.videos - args.test - args.order if s == "video" else args.images - args.test
        md += [f"### {s} set ({n_train} train / {args.test} test"
               + (f", {args.frames} frames per clip" if s == "video" else "") + ")", "",
               markdown_table(entries, s, with_speed=s in speed, n_seeds=len(args.seed_list)), ""]
        if s == "video" and any("order_metrics" in e for e in entries):
            order_rows = [dict(e, metrics=e["order_metrics"]) for e in entries if "order_metrics" in e]
            md += [f"### video set, order subset ({args.order} clips in groups that differ only in event order)", "",
                   markdown_table(order_rows, s, with_speed=False, n_seeds=len(args.seed_list)), ""]
    if abl:
        md += ["### ablations (video set)", "", ablation_markdown(abl, len(args.seed_list)), ""]
        order_abl = [dict(e, metrics=e["order_metrics"]) for e in abl if "order_metrics" in e]
        if order_abl:
            md += ["### ablations, order subset", "", ablation_markdown(order_abl, len(args.seed_list)), ""]
    md += ["### claims (video set, t2v R@1; C3 on the order subset)", "", claims_markdown(verdicts), ""]
    from xmodal.atomic import atomic_write_text

    atomic_write_text(out / "table.md", "\n".join(md))
    _write_json(out / "table.json", report)
    if any(tables.values()):
        bar_chart({s: e for s, e in tables.items() if e}, out / "table.png")
    return report


# ------------------------------------------------------------------------- main
def run_order(args: argparse.Namespace, rows: List[Row], ablations: List[Row]) -> List[Tuple[str, Row, int]]:
    """Seed-major: every row of seed 0 first, so a table stopped early has whole rows.

    Zero-shot is deterministic and runs once per set; an ablation setting that is a
    main-table configuration (the default of its axis) is not trained twice.
    """
    jobs = []
    main_slugs = {r.slug for r in rows}
    extra = list({r.slug: r for r in ablations if r.slug not in main_slugs}.values())
    for seed in args.seed_list:
        for s in args.set_list:
            jobs += [(s, row, seed) for row in rows if seed in seeds_for(row, args.seed_list)]
        if "video" in args.set_list:
            jobs += [("video", row, seed) for row in extra if seed in seeds_for(row, args.seed_list)]
    return jobs


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    deadline = None if args.budget_s is None else t0 + args.budget_s
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = main_rows(methods)
    ablations = {"all": ablation_rows, "claims": claim_ablation_rows, "none": list}[args.ablations]()
    out = Path(args.out)
    if args.curves:
        report = run_curves(args, rows, deadline)
        return 1 if report.get("missing") else 0
    for s in args.set_list:  # a per-method budget must cover every method before hours are spent
        for row in rows + (ablations if s == "video" else []):
            epochs_for(args, s, row.method)
    speed_file = out / "speed.json"
    speed: Dict[str, Dict[str, Any]] = json.loads(speed_file.read_text()) if speed_file.is_file() else {}
    failures: List[str] = []
    skipped: List[Job] = []
    if not args.report_only:
        roots = prepare_data(args)
        proto = protocol(args)
        jobs = run_order(args, rows, ablations)
        todo = [(s, row, seed) for s, row, seed in jobs
                if args.force or not finished_record(result_path(args, s, row, seed), proto)]
        left = {seed: sum(1 for j in todo if j[2] == seed) for seed in args.seed_list}
        print(f"table: {len(todo)} of {len(jobs)} run(s) to train, {args.jobs} at a time", flush=True)

        def on_record(job: Job, rec: Dict[str, Any]) -> None:
            set_name, row, seed = job
            _write_json(result_path(args, set_name, row, seed), rec)
            print(f"{set_name:<6}{row.slug:<44}seed {seed}: t2v R@1 {rec['metrics']['t2v/R@1']:5.1f} "
                  f"v2t R@1 {rec['metrics']['v2t/R@1']:5.1f} ({rec['seconds']:.0f} s; "
                  f"{time.time() - t0:.0f} s in)", flush=True)
            left[seed] -= 1
            if left[seed] == 0:  # a whole seed is in: refresh the report
                write_report(args, rows, ablations, speed, None)

        failures, skipped = execute(args, todo, roots, on_record, deadline)
        if not args.no_speed and not (deadline is not None and time.time() > deadline):
            # measured after the runs, with nothing else on the machine
            names = [r.method for r in rows if r.method]
            for s in args.set_list:
                if args.force or s not in speed or speed[s].get("shape") != speed_shape(args, s) \
                        or not set(names) <= set(speed[s].get("results", {})):
                    speed[s] = measure_speed(args, s, names)
                    _write_json(speed_file, speed)
    seconds: Optional[float] = round(time.time() - t0, 1)
    if args.report_only:  # a rebuilt report keeps the wall time of the run that made the records
        previous = out / "table.json"
        seconds = json.loads(previous.read_text()).get("seconds") if previous.is_file() else None
    report = write_report(args, rows, ablations, speed, seconds)
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'}")
    if failures:
        print(f"{len(failures)} run(s) failed (rerun to retry them):\n  " + "\n  ".join(failures), file=sys.stderr)
    if skipped:
        print(f"--budget-s {args.budget_s:g} ran out: {len(skipped)} run(s) not started (rerun to add them):\n  "
              + "\n  ".join(f"{s} {row.slug} seed {seed}" for s, row, seed in skipped), file=sys.stderr)
    return 0 if report["tables"] and not failures and not skipped else 1


if __name__ == "__main__":
    raise SystemExit(main())
