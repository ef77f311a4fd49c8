"""The training loop: one `Trainer` update per global batch, `fit` for a whole run.

`Trainer` owns the optimisation of an `AdaptedModel` (AdamW, warm-up + cosine, gradient
accumulation, clipping, autocast/GradScaler, DDP, block recomputation). `fit` builds the
model and data from a `RunConfig`, runs the epochs, evaluates, logs and checkpoints into a
run directory, and resumes from `RUN/last` so that the loss curve equals an uninterrupted
run's: the data order is a function of (seed, epoch), the schedule of the update count,
and RNG states are restored from the checkpoint.

Run directory: `config.yaml` (resolved), `metrics.csv` (per step and per epoch),
`tb/` (TensorBoard), `last/` (adapter + optimizer/RNG/trainer state), `best/` (adapter of
the best evaluation), `metrics.json` (final evaluation). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.engine import distributed as dist_utils
from xmodal.engine.checkpoint import (
    capture_rng, find_checkpoint, load_training_checkpoint, replace_dir, restore_rank_rng,
    save_training_checkpoint,
)
from xmodal.engine.config import RunConfig, TrainConfig, dump_config, write_text_atomic
from xmodal.engine.evaluate import METRIC_KEYS, evaluate, score_of
from xmodal.engine.heads import SimilarityHead
from xmodal.engine.loss import MAX_LOGIT_SCALE, contrastive_loss
from xmodal.engine.optim import (
    WarmupCosine, autocast, build_optimizer, checkpoint_blocks, clip_grad_norm, compile_blocks,
    make_grad_scaler, resolve_precision, scaler_state,
)
from xmodal.errors import XModalError

CSV_COLUMNS = ["kind", "epoch", "step", "loss", "loss_t2v", "loss_v2t", "lr", "grad_norm", "logit_scale",
               "samples_per_s", *METRIC_KEYS, "score"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def head_from_config(cfg) -> SimilarityHead:
    return SimilarityHead(cfg.pooling, cfg.temperature, cfg.normalize, cfg.max_bytes)


# ============================================================================ Trainer
@dataclass
class StepResult:
    loss: float          # global mean over ranks and accumulation steps
    loss_t2v: float
    loss_v2t: float
    lr: float
    grad_norm: float     # before clipping
    logit_scale: float
    samples: int         # global samples in this update
    skipped: bool = False  # fp16 overflow: the GradScaler skipped the update


class Trainer:
    """Optimises the active method of an AdaptedModel, one global batch per `step`."""

    def __init__(self, model, head: SimilarityHead, cfg: TrainConfig, total_steps: int,
                 device: Optional[torch.device] = None):
        self.model = model
        self.head = head
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.world = dist_utils.world_size()
        model.to(self.device)
        self._undo: List[Callable[[], None]] = []
        blocks = [b for m in (VISION, TEXT) for b in model.backbone.blocks(m)]
        if cfg.grad_checkpoint_frozen:
            self._undo.append(checkpoint_blocks(blocks, compile=cfg.compile))
        elif cfg.compile:
            compile_blocks(blocks)
        named = model.named_trainable_parameters()
        if not named:
            raise XModalError(f"method {model.method.name if model.method else None!r} has no trainable parameters")
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(named, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
        self.scheduler = WarmupCosine(self.optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        self.scaler = make_grad_scaler(self.precision, self.device)
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False, find_unused_parameters=cfg.find_unused_parameters)
        self.global_step = 0

    def close(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()

    # ------------------------------------------------------------------ one update
    def forward_loss(self, batch: Dict[str, Any]):
        """Loss of one micro-batch on this rank (features gathered across ranks)."""
        net = self.ddp if self.ddp is not None else self.model
        batch = to_device(batch, self.device)
        with autocast(self.device, self.precision):
            text, frames = net(batch["tokens"], batch["pixels"], batch.get("frame_mask"))
        mask = batch.get("frame_mask")
        out = contrastive_loss(text, frames, mask, self.head, self.model.logit_scale)
        loss = out.loss
        method = self.model.method
        if method is not None:
            extra = method.extra_loss(self.model, batch, {"text": text, "frames": frames, "frame_mask": mask,
                                                          "loss": out, "head": self.head})
            if extra is not None:
                loss = loss + extra
        return loss, out

    def step(self, micro_batches: Sequence[Dict[str, Any]]) -> StepResult:
        """One optimiser update from this rank's micro-batches (gradient accumulation)."""
        if not micro_batches:
            raise ValueError("step() needs at least one micro-batch")
        self.model.train()
        n = len(micro_batches)
        total = t2v = v2t = 0.0
        samples = 0
        for i, batch in enumerate(micro_batches):
            sync = self.ddp is None or i == n - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                loss, out = self.forward_loss(batch)
                scaled = loss / n
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total += float(loss.detach())
            t2v += float(out.t2v)
            v2t += float(out.v2t)
            samples += int(batch["tokens"].shape[0])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = False
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ls = self.model.logit_scale
        if ls.requires_grad:
            with torch.no_grad():
                ls.clamp_(0, math.log(MAX_LOGIT_SCALE))
        self.global_step += 1
        dev = self.device if self.device.type == "cuda" else "cpu"
        return StepResult(
            loss=dist_utils.all_reduce_mean(total / n, dev), loss_t2v=dist_utils.all_reduce_mean(t2v / n, dev),
            loss_v2t=dist_utils.all_reduce_mean(v2t / n, dev), lr=lr, grad_norm=grad_norm,
            logit_scale=float(ls.detach().exp()), samples=samples * self.world, skipped=skipped)

    # ------------------------------------------------------------------- state
    def state(self) -> Dict[str, Any]:
        return {"global_step": self.global_step, "scheduler": self.scheduler.state_dict(),
                "scaler": scaler_state(self.scaler), "precision": self.precision}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ========================================================================= logging
class RunLog:
    """metrics.csv (+ TensorBoard) of a run; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_epoch: Optional[int] = None,
                 resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_epoch is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch") and int(r["epoch"]) <= resume_epoch]
        self._write_all(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step if resume_epoch else None)
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def _write_all(self, rows: List[Dict[str, Any]]) -> None:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        write_text_atomic(self.path, buf.getvalue())

    def row(self, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in values.items()})
        if self.tb is not None:
            step = int(values["step"])
            prefix = "train" if values["kind"] == "step" else "eval"
            for k, v in values.items():
                if k not in ("kind", "epoch", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics_csv(path: str | os.PathLike) -> List[Dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise XModalError(f"{path}: not found; a run directory holds metrics.csv")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ============================================================================= data
@dataclass
class RunData:
    train: Any
    eval: Any
    collate: Callable


def visual_loader(cfg: RunConfig, model):
    """Item -> CLIP-normalised frames at the backbone's resolution (frame cache if given)."""
    from xmodal.data import VisualLoader
    from xmodal.data.media import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, clip_transform

    visual = model.backbone.clip.visual
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    cache = None
    if cfg.data.frame_cache:
        from xmodal.data.frame_cache import FrameCache

        cache = FrameCache(cfg.data.frame_cache)
    return VisualLoader(clip_transform(model.backbone.image_size, mean, std), fps=cfg.data.fps, cache=cache)


def _read_split(cfg: RunConfig, split: str, cap: Optional[int], log: Callable[[str], None]):
    from xmodal.data import read_dataset

    d = cfg.data
    spec = read_dataset(d.dataset, d.root, split, drop_missing=True, **d.options)
    if spec.missing_media and dist_utils.rank() == 0:
        log(f"warning: {d.dataset} {split}: {spec.missing_media} item(s) without a media file were left out")
    if cap:
        spec.items = spec.items[:cap]
    if not spec.items:
        raise XModalError(f"{d.dataset} split {split!r} under {d.root!r}: no items with media found")
    return spec


def build_data(cfg: RunConfig, model, need_train: bool = True, log: Callable[[str], None] = print) -> RunData:
    """Train and eval datasets of the configured benchmark, tokenised with the model."""
    from functools import partial

    from xmodal.data import EvalDataset, TrainDataset, collate

    d = cfg.data
    load = visual_loader(cfg, model)
    tokenize = partial(model.tokenize, max_words=d.max_words)
    train = None
    if need_train:
        spec = _read_split(cfg, d.train_split, d.max_train_items, log)
        train = TrainDataset(spec.items, tokenize, load, d.num_frames, seed=cfg.train.seed,
                             strict=d.strict_media, unfold_captions=d.unfold_captions)
    spec = _read_split(cfg, d.eval_split, d.max_eval_items, log)
    evalset = EvalDataset(spec.items, None, load, d.num_frames, strict=d.strict_media)
    return RunData(train, evalset, collate)


# ============================================================================== fit
@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    global_step: int
    final_metrics: Dict[str, float] = field(default_factory=dict)
    best_metrics: Dict[str, float] = field(default_factory=dict)
    best_epoch: Optional[int] = None
    step_losses: List[float] = field(default_factory=list)


def _eval_due(epoch: int, cfg: TrainConfig) -> bool:
    last = epoch + 1 == cfg.epochs
    return last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)


def fit(
    cfg: RunConfig,
    run_dir: Optional[str | os.PathLike] = None,
    resume: bool = False,
    *,
    data: Optional[RunData] = None,
    model=None,
    stop_after_epochs: Optional[int] = None,
    source: str = "config",
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train (and evaluate) as `cfg` says, writing the run directory.

    `data` / `model` replace what the config would build (tests, notebooks).
    `stop_after_epochs` ends this invocation early (as a preemption would); `--resume`
    continues it.
    """
    from xmodal.backbones.factory import create_backbone
    from xmodal.methods import apply_method

    tcfg = cfg.train
    info = dist_utils.init_distributed(tcfg.device)
    is_main = info.is_main
    run_dir = Path(run_dir or cfg.output_dir or "runs/run")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(tcfg.seed)  # identical model initialisation on every rank
    if model is None:
        backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                                   seed=tcfg.seed)
        model = apply_method(backbone, cfg.method_config(source))
    head = head_from_config(cfg.head)
    if data is None:
        data = build_data(cfg, model)

    world = info.world_size
    per_update = tcfg.batch_size // tcfg.grad_accum
    if per_update % world:
        raise XModalError(f"{source}: train.batch_size={tcfg.batch_size} / grad_accum={tcfg.grad_accum} "
                          f"must be divisible by the number of processes ({world})")
    micro = per_update // world
    sampler = DistributedSampler(data.train, num_replicas=world, rank=info.rank, shuffle=True, seed=tcfg.seed,
                                 drop_last=True)
    micro_batches_per_epoch = len(sampler) // micro
    steps_per_epoch = micro_batches_per_epoch // tcfg.grad_accum
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise XModalError(f"{source}: the training split has {len(data.train)} items, fewer than one global batch "
                          f"(train.batch_size={tcfg.batch_size}); lower train.batch_size")
    total_steps = tcfg.epochs * steps_per_epoch
    trainer = Trainer(model, head, tcfg, total_steps, info.device)

    # ----------------------------------------------------------- resume
    start_epoch, best_score, best_epoch, best_metrics = 0, -math.inf, None, {}
    ckpt = None
    if resume:
        ckpt = find_checkpoint(run_dir / "last")
        if ckpt is None:
            raise XModalError(f"{run_dir / 'last'}: no training checkpoint to resume from (run without --resume)")
        state = load_training_checkpoint(ckpt, model, trainer.optimizer, info.rank, world, info.device,
                                         restore_rng_state=False)
        if state.get("steps_per_epoch") != steps_per_epoch or state.get("total_steps") != total_steps:
            raise XModalError(
                f"{ckpt}: saved with {state.get('steps_per_epoch')} steps/epoch and {state.get('total_steps')} total, "
                f"this config gives {steps_per_epoch} and {total_steps}; resume needs the same data, batch and epochs")
        trainer.load_state(state["trainer"])
        start_epoch = int(state["epoch"])
        best_score = float(state.get("best_score", -math.inf))
        best_epoch = state.get("best_epoch")
        best_metrics = state.get("best_metrics", {})
        if is_main:
            log(f"resuming from {ckpt} after epoch {start_epoch} (step {trainer.global_step})")

    elif is_main and find_checkpoint(run_dir / "last") is not None:
        log(f"warning: {run_dir} holds a previous run; starting over (pass --resume to continue it)")

    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
        trainable, total = model.parameter_counts()
        log(f"{model.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%); "
            f"{world} process(es), {steps_per_epoch} updates/epoch of {tcfg.batch_size} samples, "
            f"precision {trainer.precision}")
    runlog = RunLog(run_dir, is_main, tcfg.tensorboard, start_epoch if resume else None, trainer.global_step)

    # RNG: restored from the checkpoint (exact continuation) or seeded per rank
    if ckpt is not None:
        restore_rank_rng(ckpt, info.rank, world, info.device)
    else:
        seed_everything(tcfg.seed + info.rank)

    result = FitResult(run_dir, start_epoch, trainer.global_step, best_metrics=best_metrics, best_epoch=best_epoch)
    end_epoch = tcfg.epochs if stop_after_epochs is None else min(tcfg.epochs, stop_after_epochs)
    try:
        for epoch in range(start_epoch, end_epoch):
            sampler.set_epoch(epoch)
            if hasattr(data.train, "set_epoch"):
                data.train.set_epoch(epoch)
            loader = DataLoader(
                data.train, batch_size=micro, sampler=sampler, drop_last=True, collate_fn=data.collate,
                num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                generator=torch.Generator().manual_seed(tcfg.seed * 1000 + epoch),
                persistent_workers=False)
            _train_epoch(trainer, loader, epoch, steps_per_epoch, tcfg, runlog, result, is_main)
            metrics = {}
            if _eval_due(epoch, tcfg):
                metrics = evaluate(model, data.eval, head, collate_fn=data.collate, max_words=cfg.data.max_words,
                                   batch_size=cfg.eval.batch_size, text_batch_size=cfg.eval.text_batch_size,
                                   num_workers=cfg.data.num_workers, dual_softmax=cfg.eval.dual_softmax,
                                   device=info.device, progress=None if (tcfg.progress and is_main) else False)
                score = score_of(metrics, tcfg.best_metric)
                runlog.row({"kind": "epoch", "epoch": epoch + 1, "step": trainer.global_step, **metrics,
                            "score": score})
                if is_main:
                    from xmodal.metrics import format_metrics_table

                    log(f"epoch {epoch + 1}/{tcfg.epochs} evaluation ({tcfg.best_metric} = {score:.2f}):\n"
                        f"{format_metrics_table(metrics)}")
                if score > best_score:
                    best_score, best_epoch, best_metrics = score, epoch + 1, metrics
                    if is_main:
                        _save_best(model, run_dir, metrics, epoch + 1, score)
                result.final_metrics = metrics
            rng = dist_utils.all_gather_object(capture_rng(info.device))
            if is_main:
                save_training_checkpoint(run_dir / "last", model, trainer.optimizer, {
                    "epoch": epoch + 1, "trainer": trainer.state(), "steps_per_epoch": steps_per_epoch,
                    "total_steps": total_steps, "best_score": best_score, "best_epoch": best_epoch,
                    "best_metrics": best_metrics, "world_size": world, "metrics": metrics,
                }, rng)
            dist_utils.barrier()
            result.epochs_done = epoch + 1
        result.global_step = trainer.global_step
        result.best_metrics, result.best_epoch = best_metrics, best_epoch
        if is_main and result.epochs_done == tcfg.epochs and result.final_metrics:
            final = {**result.final_metrics, "epoch": result.epochs_done, "best_epoch": best_epoch,
                     "best_score": best_score, "best_metric": tcfg.best_metric}
            write_text_atomic(run_dir / "metrics.json", json.dumps(final, indent=2) + "\n")
    finally:
        runlog.close()
        trainer.close()
    return result


def _save_best(model, run_dir: Path, metrics: Dict[str, float], epoch: int, score: float) -> None:
    staged = run_dir / ".best.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_adapter(staged)
    write_text_atomic(staged / "metrics.json", json.dumps({**metrics, "epoch": epoch, "score": score}, indent=2) + "\n")
    replace_dir(staged, run_dir / "best")


def _next_batch(it) -> Dict[str, Any]:
    """The next non-empty batch (collate gives None when every sample was unreadable)."""
    for batch in it:
        if batch is not None:
            return batch
    raise XModalError("the training loader ran out of batches: too many unreadable media files "
                      "(see the warnings above), or the dataset changed during the run")


def _train_epoch(trainer: Trainer, loader, epoch: int, steps: int, tcfg: TrainConfig, runlog: RunLog,
                 result: FitResult, is_main: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=steps * tcfg.batch_size, unit="sample", dynamic_ncols=True,
               desc=f"epoch {epoch + 1}/{tcfg.epochs}", disable=not (tcfg.progress and is_main), file=sys.stderr)
    it = iter(loader)
    try:
        for s in range(steps):
            t0 = time.perf_counter()
            micro = [_next_batch(it) for _ in range(tcfg.grad_accum)]
            r = trainer.step(micro)
            dt = max(time.perf_counter() - t0, 1e-9)
            result.step_losses.append(r.loss)
            bar.update(r.samples)
            bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}")
            runlog.row({"kind": "step", "epoch": epoch + 1, "step": trainer.global_step, "loss": r.loss,
                        "loss_t2v": r.loss_t2v, "loss_v2t": r.loss_v2t, "lr": r.lr, "grad_norm": r.grad_norm,
                        "logit_scale": r.logit_scale, "samples_per_s": r.samples / dt})
            if is_main and not tcfg.progress and (trainer.global_step % max(1, tcfg.log_every) == 0 or s == steps - 1):
                print(f"epoch {epoch + 1} step {trainer.global_step}: loss {r.loss:.4f} lr {r.lr:.3g} "
                      f"{r.samples / dt:.1f} samples/s", file=sys.stderr)
    finally:
        bar.close()
        del it
