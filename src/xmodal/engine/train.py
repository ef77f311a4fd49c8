"""The training loop: one `Trainer` update per global batch, `fit` for a whole run.

`Trainer` owns the optimisation of an `AdaptedModel` (fused AdamW, warm-up + cosine, gradient
accumulation, clipping, autocast/loss scaling, DDP, block recomputation) without a host
synchronisation inside a step. `fit` builds the model and data from a `RunConfig`, runs the
epochs, evaluates, logs and checkpoints into a run directory, and resumes from `RUN/last` so
that the loss curve equals an uninterrupted run's, also from the middle of an epoch
(`train.save_every_steps`): the data order is a function of (seed, epoch, dropped items)
(`engine/sampler.py`), the schedule of the update count, and RNG states, sampler position and
the set of unreadable items dropped so far are restored from the checkpoint.

Safety: a NaN/inf loss or gradient is never applied; the run stops at the next log interval
with "training diverged at step N" and names the last good checkpoint, and no checkpoint is
written after it. An unreadable training item is dropped from the sampler once seen; the run
ends only when no readable item is left.

Run directory: `config.yaml` (resolved), `metrics.csv` (per step and per epoch),
`tb/` (TensorBoard), `last/` (adapter + optimizer/RNG/trainer state, `engine/checkpoint.py`),
`best/` (adapter of the best evaluation), `metrics.json` (final evaluation). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from xmodal.atomic import WriteError, atomic_directory, atomic_write_text, describe_write_error, ensure_dir
from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.engine import distributed as dist_utils
from xmodal.engine.checkpoint import (
    CheckpointError, capture_rng, describe_missing, find_checkpoint, load_training_checkpoint, read_trainer_state,
    recover_checkpoint, restore_rank_rng, save_training_checkpoint,
)
from xmodal.engine.config import RunConfig, TrainConfig, dump_config
from xmodal.engine.evaluate import METRIC_KEYS, evaluate, score_of
from xmodal.engine.fastpath import CudaGraphStep, make_device_step, prepare_fast_path
from xmodal.engine.heads import SimilarityHead
from xmodal.engine.loss import MAX_LOGIT_SCALE, contrastive_loss
from xmodal.engine.optim import (
    WarmupCosine, autocast, build_optimizer, checkpoint_blocks, clip_grad_norm, guarded_step,
    make_grad_scaler, resolve_precision, scaler_state,
)
from xmodal.errors import DataError, XModalError

CSV_COLUMNS = ["kind", "epoch", "step", "loss", "loss_t2v", "loss_v2t", "lr", "grad_norm", "logit_scale",
               "samples_per_s", "skipped", *METRIC_KEYS, "score"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def head_from_config(cfg) -> SimilarityHead:
    return SimilarityHead(cfg.pooling, cfg.temperature, cfg.normalize, cfg.max_bytes)


# ============================================================================ Trainer
STEP_FIELDS = ("loss", "loss_t2v", "loss_v2t", "grad_norm", "logit_scale", "nonfinite", "skipped")


class TrainingDiverged(XModalError):
    """A loss or gradient became NaN/inf; that update was not applied."""


@dataclass
class StepResult:
    """One update's numbers, kept on the device (`values`, ordered as STEP_FIELDS) so that
    `Trainer.step` never waits for the device. Reading a float property synchronises and gives
    this rank's value; the engine reads global means at log intervals via `Trainer.collect`."""

    values: torch.Tensor
    lr: float
    samples: int         # global samples in this update
    step: int            # global step after this update

    def _get(self, name: str) -> float:
        return float(self.values[STEP_FIELDS.index(name)])

    loss = property(lambda self: self._get("loss"))
    loss_t2v = property(lambda self: self._get("loss_t2v"))
    loss_v2t = property(lambda self: self._get("loss_v2t"))
    grad_norm = property(lambda self: self._get("grad_norm"))        # before clipping
    logit_scale = property(lambda self: self._get("logit_scale"))
    skipped = property(lambda self: self._get("skipped") > 0)         # fp16 overflow: update skipped


@dataclass
class StepRecord:
    """One update's numbers on the host: means over ranks (from `Trainer.collect`)."""

    step: int
    lr: float
    samples: int
    loss: float
    loss_t2v: float
    loss_v2t: float
    grad_norm: float
    logit_scale: float
    nonfinite: bool      # the loss or gradient was NaN/inf (update not applied)
    skipped: bool        # fp16 overflow (update not applied, loss scale lowered)

    @property
    def diverged(self) -> bool:
        return self.nonfinite or not math.isfinite(self.loss)


class Trainer:
    """Optimises the active method of an AdaptedModel, one global batch per `step`.

    No host synchronisation inside `step`: losses, gradient norm and logit scale stay device
    tensors until `collect` (one all-reduce of the stacked values, one transfer per log
    interval). A non-finite loss or gradient is caught on the device: the fused AdamW step
    reads a `found_inf` flag and leaves weights and state untouched, and the flag latches
    (`halted`) so that no later update of this run is applied either; `collect` then reports
    the first such step and the engine stops there ("training diverged at step N"). Under
    fp16 an overflowing gradient instead skips just that update and halves the loss scale
    (GradScaler's rule), reported as `skipped`. With several processes the decision uses the
    (all-reduced, hence identical) gradients only, so every rank applies or skips alike.
    """

    def __init__(self, model, head: SimilarityHead, cfg: TrainConfig, total_steps: int,
                 device: Optional[torch.device] = None, max_frames: Optional[int] = None):
        self.model = model
        self.head = head
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.world = dist_utils.world_size()
        # With several processes the loss gathers features at a fixed shape (no size exchange, no
        # host sync): rows up to the per-rank micro-batch (`fit`'s loader never yields more; the
        # collate only drops unreadable samples) and frames up to the data's frame budget, both
        # the same on every rank. Without `max_frames` the sizes are exchanged per micro-batch.
        self.pad_to: Optional[Tuple[int, int]] = None
        per_update = cfg.batch_size // cfg.grad_accum
        if self.world > 1 and max_frames and per_update % self.world == 0:
            self.pad_to = (per_update // self.world, int(max_frames))
        model.to(self.device)
        self._undo: List[Callable[[], None]] = []
        blocks = [b for m in (VISION, TEXT) for b in model.backbone.blocks(m)]
        if cfg.grad_checkpoint_frozen:
            self._undo.append(checkpoint_blocks(blocks, compile=bool(cfg.compile), scope=cfg.grad_checkpoint_scope))
        # whole-tower compile, fused adapter sites, bf16-stored frozen weights (engine/fastpath.py)
        self.fast = prepare_fast_path(model, cfg, self.device, self.precision)
        self._undo.append(self.fast.close)
        self.prefix_cache = None  # frozen-prefix cache (engine/prefix_cache.py), CPU opt-in
        if getattr(cfg, "cache_frozen_prefix", False):
            if self.device.type != "cpu":
                raise XModalError(f"train.cache_frozen_prefix is a CPU option (keying a sample reads it on the host, "
                                  f"a synchronisation per step here); got device {self.device}")
            if any(a.startswith("compile") for a in self.fast.applied):
                raise XModalError("train.cache_frozen_prefix and train.compile exclude each other (the compiled "
                                  "tower would not call the cached transformer)")
            from xmodal.engine.prefix_cache import FrozenPrefixCache

            self.prefix_cache = FrozenPrefixCache(model.backbone)
            self._undo.append(self.prefix_cache.close)
        self.graph = None  # CudaGraphStep, captured at the first eligible step
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
        self.halted = torch.zeros((), dtype=torch.bool, device=self.device)  # latched divergence
        self.pending: List[StepResult] = []

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
        out = contrastive_loss(text, frames, mask, self.head, self.model.logit_scale, pad_to=self.pad_to)
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
        if self.fast.options.cuda_graphs and len(micro_batches) == 1 and self.ddp is None and self.scaler is None:
            result = self._graph_step(micro_batches[0])
            if result is not None:
                return result
        n = len(micro_batches)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, t2v, v2t
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
            sums += torch.stack([loss.detach(), out.t2v, out.v2t]).to(torch.float64)
            samples += int(batch["tokens"].shape[0])
        sums /= n
        found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.scaler is not None:
            self.scaler.unscale_([p.grad for p in self.params if p.grad is not None], found_inf)
        grad_norm = clip_grad_norm(self.params, self.cfg.grad_clip).to(self.device, torch.float64)
        bad_grad = ~torch.isfinite(grad_norm)
        bad_loss = ~torch.isfinite(sums[0]) if self.world == 1 else torch.zeros_like(bad_grad)
        if self.scaler is None:
            nonfinite, overflow = bad_grad | bad_loss, torch.zeros_like(bad_grad)
        else:  # fp16: an overflowing gradient is the scaler's business, a non-finite loss is divergence
            nonfinite, overflow = bad_loss, bad_grad | (found_inf[0] > 0)
        self.halted |= nonfinite
        skip = self.halted | overflow
        lr = self.optimizer.param_groups[0]["lr"]
        guarded_step(self.optimizer, skip.to(torch.float32))
        if self.scaler is not None:
            self.scaler.update(overflow.to(torch.float32).reshape(1))
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ls = self.model.logit_scale
        if ls.requires_grad:
            with torch.no_grad():
                ls.clamp_(0, math.log(MAX_LOGIT_SCALE))
        self.global_step += 1
        values = torch.cat([sums, grad_norm.reshape(1), ls.detach().exp().to(self.device, torch.float64).reshape(1),
                            nonfinite.to(torch.float64).reshape(1), (overflow & ~self.halted).to(torch.float64).reshape(1)])
        result = StepResult(values, lr, samples * self.world, self.global_step)
        self.pending.append(result)
        return result

    def _graph_step(self, batch: Dict[str, Any]) -> Optional[StepResult]:
        """Replay the captured step for a batch of the captured shapes (None: run eagerly)."""
        batch = to_device(batch, self.device)
        if self.graph is None:
            self.graph = CudaGraphStep(make_device_step(self), batch, optimizer=self.optimizer)
        if not self.graph.matches(batch):
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        values = self.graph(batch)
        self.scheduler.step()
        self.global_step += 1
        result = StepResult(values, lr, int(batch["tokens"].shape[0]), self.global_step)
        self.pending.append(result)
        return result

    def collect(self) -> List[StepRecord]:
        """The steps since the last call, averaged over ranks: one all-reduce, one device->host
        copy. Every rank must call it at the same steps (it is a collective)."""
        if not self.pending:
            return []
        values = torch.stack([r.values for r in self.pending])
        dist_utils.all_reduce_mean_(values)
        rows = values.tolist()
        records = [StepRecord(r.step, r.lr, r.samples, *row[:5], nonfinite=row[5] > 0, skipped=row[6] > 0)
                   for r, row in zip(self.pending, rows)]
        self.pending.clear()
        return records

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
    """metrics.csv (+ TensorBoard) of a run; a no-op on ranks other than 0.

    On resume the rows after the checkpoint (steps it does not contain, evaluations of epochs it
    did not finish) are cut, so the file reads as if the run had never stopped."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_epoch: Optional[int] = None,
                 resume_step: int = 0, wandb: Optional[Dict[str, Any]] = None,
                 config: Optional[Dict[str, Any]] = None):
        from xmodal.engine.trackers import build_trackers

        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.trackers: List[Any] = []
        if not enabled:
            return
        rows = []
        if resume_epoch is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if _row_kept(r, resume_epoch, resume_step)]
        self._write_all(rows)
        self.trackers = build_trackers(run_dir, tensorboard, wandb, config=config,
                                       purge_step=resume_step if resume_epoch is not None else None)

    def _write_all(self, rows: List[Dict[str, Any]]) -> None:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        atomic_write_text(self.path, buf.getvalue())

    def row(self, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                    {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in values.items()})
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # no half-written row
            raise WriteError(describe_write_error(exc, self.path)) from None
        for tracker in self.trackers:
            tracker.log(values)

    def provenance(self, run: Dict[str, Any]) -> None:
        """The run record (weights, data, head ...) for the trackers, once it is known."""
        if self.enabled and not getattr(self, "_provenance_sent", False):
            self._provenance_sent = True
            for tracker in self.trackers:
                tracker.set_provenance(run)

    def close(self, final: Optional[Dict[str, Any]] = None) -> None:
        for tracker in self.trackers:
            tracker.finish(final)
        self.trackers = []


def _row_kept(row: Dict[str, str], epochs_done: int, global_step: int) -> bool:
    try:
        if row.get("kind") == "step":
            return int(row["step"]) <= global_step
        return int(row["epoch"]) <= epochs_done
    except (KeyError, TypeError, ValueError):
        return False


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
    dropped_items: Dict[int, str] = field(default_factory=dict)  # unreadable training items left out
    prefix_cache: Optional[Dict[str, Any]] = None  # frozen-prefix cache statistics (train.cache_frozen_prefix)


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
    stop_after_steps: Optional[int] = None,
    source: str = "config",
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train (and evaluate) as `cfg` says, writing the run directory.

    `data` / `model` replace what the config would build (tests, notebooks).
    `stop_after_epochs` ends this invocation after that epoch (checkpoint written), as a
    scheduled stop would; `stop_after_steps` ends it right after that update *without*
    writing anything more, as a kill would. `--resume` continues either.
    """
    from xmodal.backbones.factory import create_backbone
    from xmodal.methods import apply_method

    tcfg = cfg.train
    info = dist_utils.init_distributed(tcfg.device)
    is_main = info.is_main
    run_dir = Path(run_dir or cfg.output_dir or "runs/run")
    if is_main:
        ensure_dir(run_dir)
    if data is None and not cfg.data.root:
        raise XModalError(f"{source}: data.root is unset; set it in the config (the dataset root or annotation "
                          f"file) or pass data.root=PATH")

    seed_everything(tcfg.seed)  # identical model initialisation on every rank
    if model is None:
        backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, cache_dir=cfg.model.cache_dir,
                                   seed=tcfg.seed)
        model = apply_method(backbone, cfg.method_config(source))
    head = model.use_head(head_from_config(cfg.head))  # a trained head (seq_transformer) joins the adapter
    from xmodal.provenance import describe_run, train_run_record, training_record, weights_record

    # saved adapters remember the weights (hash), head, frames and words they were trained with
    model.training_record = training_record(cfg, weights_record(model.backbone, cfg.model.pretrained,
                                                                cfg.model.cache_dir))
    if data is None:
        data = build_data(cfg, model)

    world = info.world_size
    per_update = tcfg.batch_size // tcfg.grad_accum
    if per_update % world:
        raise XModalError(f"{source}: train.batch_size={tcfg.batch_size} / grad_accum={tcfg.grad_accum} "
                          f"must be divisible by the number of processes ({world})")
    micro = per_update // world
    micro_batches_per_epoch = (len(data.train) // world) // micro
    steps_per_epoch = micro_batches_per_epoch // tcfg.grad_accum
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise XModalError(f"{source}: the training split has {len(data.train)} items, fewer than one global batch "
                          f"(train.batch_size={tcfg.batch_size}); lower train.batch_size")
    total_steps = tcfg.epochs * steps_per_epoch
    trainer = Trainer(model, head, tcfg, total_steps, info.device,
                      max_frames=getattr(data.train, "num_frames", None) or cfg.data.num_frames)
    last_dir = run_dir / "last"
    if trainer.prefix_cache is not None and is_main:
        depth = trainer.prefix_cache.stats.depth
        log("frozen-prefix cache: " + (", ".join(f"{m} {d} of {len(model.backbone.blocks(m))} blocks"
                                                 for m, d in depth.items()) if trainer.prefix_cache.active
                                       else "no tower has an unadapted leading block; nothing is cached"))

    # ----------------------------------------------------------- resume
    start_epoch, best_score, best_epoch, best_metrics = 0, -math.inf, None, {}
    position = SamplerPosition()
    ckpt = None
    if resume:
        if is_main:
            recover_checkpoint(last_dir)  # finish or roll back a write that a crash interrupted
        dist_utils.barrier()
        ckpt = find_checkpoint(last_dir)
        if ckpt is None:
            detail = describe_missing(last_dir) if any(p.exists() for p in (last_dir, run_dir / ".last.old",
                                                                            run_dir / ".last.tmp")) else ""
            raise CheckpointError(f"{last_dir}: no training checkpoint to resume from"
                                  + (f" ({detail})" if detail else "") + "; run without --resume to start over")
        state = load_training_checkpoint(ckpt, model, trainer.optimizer, info.rank, world, info.device,
                                         restore_rng_state=False)
        if state.get("steps_per_epoch") != steps_per_epoch or state.get("total_steps") != total_steps:
            raise XModalError(
                f"{ckpt}: saved with {state.get('steps_per_epoch')} steps/epoch and {state.get('total_steps')} total, "
                f"this config gives {steps_per_epoch} and {total_steps}; resume needs the same data, batch and epochs")
        try:
            trainer.load_state(state["trainer"])
            start_epoch = int(state["epoch"])
            position = SamplerPosition.from_state(state.get("sampler") or {}, info.rank, world)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt / 'trainer_state.json'}: invalid trainer state ({exc!r})") from None
        best_score = -math.inf if state.get("best_score") is None else float(state["best_score"])
        best_epoch = state.get("best_epoch")
        best_metrics = state.get("best_metrics", {})
        if is_main:
            where = f"epoch {start_epoch + 1} update {position.step_in_epoch}" if position.step_in_epoch \
                else f"after epoch {start_epoch}"
            log(f"resuming from {ckpt} at {where} (step {trainer.global_step})")

    elif is_main and find_checkpoint(last_dir) is not None:
        log(f"warning: {run_dir} holds a previous run; starting over (pass --resume to continue it)")

    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
        trainable, total = model.parameter_counts()
        log(f"{model.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%); "
            f"{world} process(es), {steps_per_epoch} updates/epoch of {tcfg.batch_size} samples, "
            f"precision {trainer.precision}")
    runlog = RunLog(run_dir, is_main, tcfg.tensorboard, start_epoch if resume else None, trainer.global_step,
                    wandb=tcfg.wandb, config=cfg.to_dict())

    # RNG: restored from the checkpoint (exact continuation) or seeded per rank
    if ckpt is not None:
        restore_rank_rng(ckpt, info.rank, world, info.device)
    else:
        seed_everything(tcfg.seed + info.rank)

    result = FitResult(run_dir, start_epoch, trainer.global_step, best_metrics=best_metrics, best_epoch=best_epoch)
    end_epoch = tcfg.epochs if stop_after_epochs is None else min(tcfg.epochs, stop_after_epochs)

    def checkpoint(epoch: int, metrics: Dict[str, float], epoch_end: bool = False) -> None:
        """Write RUN/last (rank 0) with every rank's RNG and sampler position; all ranks call it.
        At an epoch's end the ranks' dropped items become the next epoch's (common) exclusions."""
        gathered = dist_utils.all_gather_object((capture_rng(info.device), position.cursor, position.dropped))
        position.merge_dropped([g[2] for g in gathered])
        if epoch_end:
            position.next_epoch()
            gathered = [(g[0], 0, g[2]) for g in gathered]
        if is_main:
            save_training_checkpoint(last_dir, model, trainer.optimizer, {
                "epoch": epoch, "trainer": trainer.state(), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "best_score": best_score if math.isfinite(best_score) else None,
                "best_epoch": best_epoch,
                "best_metrics": best_metrics, "world_size": world, "metrics": metrics,
                "sampler": position.state([g[1] for g in gathered]),
            }, [g[0] for g in gathered])
        dist_utils.barrier()

    run = _EpochRunner(trainer, data, cfg, info, runlog, result, position, log, last_dir, checkpoint,
                       steps_per_epoch, micro, stop_after_steps)
    try:
        for epoch in range(start_epoch, end_epoch):
            if not run.train_epoch(epoch):
                result.global_step = trainer.global_step
                return result  # stopped after `stop_after_steps` updates, as a kill would
            metrics = {}
            if _eval_due(epoch, tcfg):
                metrics = evaluate(model, data.eval, head, collate_fn=data.collate, max_words=cfg.data.max_words,
                                   batch_size=cfg.eval.batch_size, text_batch_size=cfg.eval.text_batch_size,
                                   num_workers=cfg.data.num_workers, dual_softmax=cfg.eval.dual_softmax,
                                   device=info.device, progress=None if (tcfg.progress and is_main) else False)
                score = score_of(metrics, tcfg.best_metric)
                run_info = train_run_record(cfg, model, data.eval, metrics, info.device, trainer.precision)
                runlog.provenance(run_info)
                runlog.row({"kind": "epoch", "epoch": epoch + 1, "step": trainer.global_step, **metrics,
                            "score": score})
                if is_main:
                    from xmodal.metrics import format_metrics_table

                    log(f"epoch {epoch + 1}/{tcfg.epochs} evaluation ({tcfg.best_metric} = {score:.2f}):\n"
                        f"{format_metrics_table(metrics, title=describe_run(run_info))}")
                if score > best_score:
                    best_score, best_epoch, best_metrics = score, epoch + 1, metrics
                    if is_main:
                        _save_best(model, run_dir, {**metrics, "run": run_info}, epoch + 1, score)
                result.final_metrics = metrics
            checkpoint(epoch + 1, metrics, epoch_end=True)
            if is_main and position.dropped:
                log(f"warning: {len(position.dropped)} unreadable training item(s) left out of the sampler so far "
                    f"(listed in {last_dir / 'trainer_state.json'}), e.g. {next(iter(position.dropped.values()))}")
            result.epochs_done = epoch + 1
        result.global_step = trainer.global_step
        result.best_metrics, result.best_epoch = best_metrics, best_epoch
        result.dropped_items = dict(position.dropped)
        if trainer.prefix_cache is not None:
            result.prefix_cache = trainer.prefix_cache.stats.as_dict()
        if is_main and result.epochs_done == tcfg.epochs and result.final_metrics:
            final = {**result.final_metrics, "epoch": result.epochs_done, "best_epoch": best_epoch,
                     "best_score": best_score, "best_metric": tcfg.best_metric,
                     "dropped_train_items": len(position.dropped),
                     **({"frozen_prefix_cache": trainer.prefix_cache.stats.as_dict()}
                        if trainer.prefix_cache is not None else {}),
                     "run": train_run_record(cfg, model, data.eval, result.final_metrics, info.device,
                                             trainer.precision)}
            atomic_write_text(run_dir / "metrics.json", json.dumps(final, indent=2) + "\n")
            runlog.provenance(final["run"])
            runlog.close(final)
    finally:
        runlog.close()
        trainer.close()
    return result


def _save_best(model, run_dir: Path, metrics: Dict[str, float], epoch: int, score: float) -> None:
    with atomic_directory(run_dir / "best") as staged:
        model.save_adapter(staged / "adapter")
        for name in os.listdir(staged / "adapter"):
            os.replace(staged / "adapter" / name, staged / name)
        os.rmdir(staged / "adapter")
        atomic_write_text(staged / "metrics.json", json.dumps({**metrics, "epoch": epoch, "score": score}, indent=2) + "\n")


class SamplerPosition:
    """Where the sample stream of this rank stands, and which items were found unreadable.

    `exclude` (frozen for the current epoch, the same on every rank) shapes the epoch's batches;
    `dropped` (index -> reason) grows as unreadable items are seen and becomes the next epoch's
    `exclude`. `cursor` counts the micro-batches this rank consumed in the epoch, so a resumed
    run restarts its stream exactly there. All of it is part of the checkpoint."""

    def __init__(self, step_in_epoch: int = 0, cursor: int = 0, exclude=(), dropped: Optional[Dict[int, str]] = None):
        self.step_in_epoch = int(step_in_epoch)
        self.cursor = int(cursor)
        self.exclude = sorted(int(i) for i in exclude)
        self.dropped: Dict[int, str] = dict(dropped or {})

    def merge_dropped(self, per_rank: List[Dict[int, str]]) -> None:
        for d in per_rank:
            for k, v in d.items():
                self.dropped.setdefault(int(k), v)

    def next_epoch(self) -> None:
        self.step_in_epoch, self.cursor = 0, 0
        self.exclude = sorted(self.dropped)

    def state(self, cursors: List[int]) -> Dict[str, Any]:
        return {"step_in_epoch": self.step_in_epoch, "cursor": list(cursors), "exclude": self.exclude,
                "dropped": {str(k): v for k, v in sorted(self.dropped.items())}}

    @classmethod
    def from_state(cls, state: Dict[str, Any], rank: int, world: int) -> "SamplerPosition":
        cursors = state.get("cursor", [0] * world)
        if len(cursors) != world:
            raise ValueError(f"sampler cursors of {len(cursors)} processes, resuming with {world}")
        return cls(state.get("step_in_epoch", 0), cursors[rank], state.get("exclude", ()),
                   {int(k): str(v) for k, v in (state.get("dropped") or {}).items()})


class _EpochRunner:
    """The updates of one epoch: batches from the resumable sampler, unreadable items dropped,
    metrics collected (one host sync) every `train.log_every` updates, checkpoints every
    `train.save_every_steps`, divergence reported at the first sync after it happened."""

    def __init__(self, trainer: Trainer, data: RunData, cfg: RunConfig, info, runlog: RunLog, result: FitResult,
                 position: SamplerPosition, log: Callable[[str], None], last_dir: Path, checkpoint,
                 steps: int, micro: int, stop_after_steps: Optional[int]):
        self.trainer, self.data, self.cfg, self.info = trainer, data, cfg, info
        self.runlog, self.result, self.position, self.log = runlog, result, position, log
        self.last_dir, self.checkpoint = last_dir, checkpoint
        self.steps, self.micro, self.stop_after_steps = steps, micro, stop_after_steps
        self.is_main = info.is_main
        self._t0 = time.perf_counter()
        self._samples = 0

    def _loader(self, epoch: int):
        from xmodal.engine.sampler import EpochBatches, IndexedDataset, collate_with_failures

        d, t = self.cfg.data, self.cfg.train
        plan = EpochBatches(len(self.data.train), self.micro, seed=t.seed, epoch=epoch, rank=self.info.rank,
                            world_size=self.info.world_size, exclude=self.position.exclude,
                            start=self.position.cursor)
        return DataLoader(IndexedDataset(self.data.train), batch_sampler=plan,
                          collate_fn=collate_with_failures(self.data.collate), num_workers=d.num_workers,
                          pin_memory=self.info.device.type == "cuda",
                          generator=torch.Generator().manual_seed(t.seed * 1000 + epoch), persistent_workers=False)

    def _next_batch(self, it) -> Dict[str, Any]:
        """The next batch with at least one readable sample; unreadable items are dropped for good."""
        while True:
            try:
                out = next(it)
            except StopIteration:
                raise DataError(f"no readable training item left: all {len(self.data.train)} items of the training "
                                f"split were unreadable (e.g. {next(iter(self.position.dropped.values()), '?')})") from None
            self.position.cursor += 1
            for index, why in out["unreadable"].items():
                if index not in self.position.dropped:
                    self.position.dropped[index] = why
                    if self.is_main:
                        self.log(f"warning: unreadable training item dropped from the sampler: {why}")
            if out["batch"] is not None:
                return out["batch"]
            if len(self.position.dropped) >= len(self.data.train):
                raise DataError(
                    f"no readable training item left: all {len(self.data.train)} items of the training split were "
                    f"unreadable (e.g. {next(iter(self.position.dropped.values()))})")

    def train_epoch(self, epoch: int) -> bool:
        """Run the rest of `epoch`; False if `stop_after_steps` ended the invocation."""
        from xmodal.progress import progress

        t, trainer = self.cfg.train, self.trainer
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        # a bar on a terminal, plain periodic lines in a log file
        bar = progress(self.steps * t.batch_size, desc=f"epoch {epoch + 1}/{t.epochs}", unit="sample",
                       enabled=bool(t.progress and self.is_main), initial=self.position.step_in_epoch * t.batch_size)
        it = iter(self._loader(epoch))
        self._t0, self._samples = time.perf_counter(), 0
        try:
            while self.position.step_in_epoch < self.steps:
                micro = [self._next_batch(it) for _ in range(t.grad_accum)]
                r = trainer.step(micro)
                self.position.step_in_epoch += 1
                self._samples += r.samples
                bar.update(r.samples)
                if self.stop_after_steps is not None and trainer.global_step >= self.stop_after_steps:
                    return False
                last = self.position.step_in_epoch == self.steps
                save = bool(t.save_every_steps) and trainer.global_step % t.save_every_steps == 0 and not last
                if last or save or trainer.global_step % t.log_every == 0:
                    self.flush(epoch, bar)
                if save:
                    self.checkpoint(epoch, {})
            return True
        finally:
            bar.close()
            del it

    def flush(self, epoch: int, bar=None) -> None:
        """The host sync of a log interval: metrics rows, console line, divergence check."""
        records = self.trainer.collect()
        if not records:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rate = self._samples / dt
        self._t0, self._samples = time.perf_counter(), 0
        bad = next((r for r in records if r.diverged), None)
        for r in records:
            self.result.step_losses.append(r.loss)
            self.runlog.row({"kind": "step", "epoch": epoch + 1, "step": r.step, "loss": r.loss,
                             "loss_t2v": r.loss_t2v, "loss_v2t": r.loss_v2t, "lr": r.lr, "grad_norm": r.grad_norm,
                             "logit_scale": r.logit_scale, "samples_per_s": rate, "skipped": int(r.skipped)})
            if r is bad:
                break
        if bad is not None:
            self._diverged(bad)
        r = records[-1]
        skipped = sum(x.skipped for x in records)
        note = f", {skipped} update(s) skipped for fp16 overflow" if skipped else ""
        if bar is not None:
            bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}")
        if self.is_main and (not self.cfg.train.progress or skipped):
            print(f"epoch {epoch + 1} step {r.step}: loss {r.loss:.4f} lr {r.lr:.3g} {rate:.1f} samples/s{note}",
                  file=sys.stderr)

    def _diverged(self, bad: StepRecord) -> None:
        last = find_checkpoint(self.last_dir)
        if last is not None:
            step = read_trainer_state(last).get("trainer", {}).get("global_step")
            where = (f"{last} (step {step}); lower train.lr and start over (--resume from it keeps the "
                     f"checkpoint's learning-rate schedule)")
        else:
            where = "none (nothing was saved yet); lower train.lr and start over"
        raise TrainingDiverged(
            f"training diverged at step {bad.step} (loss={bad.loss:.6g}, grad_norm={bad.grad_norm:.6g}, "
            f"lr={bad.lr:.3g}); that update and later ones were not applied and no checkpoint was written after "
            f"it; last good checkpoint: {where}")
