"""Fast paths for adapter training on a GPU: whole-tower compile, fused sites, bf16 frozen
weights, CUDA-graph replay of a fixed-shape step.

A parameter-efficient step on ViT-B/32 at 32 clips is launch-bound: 48 adapter sites x
several small kernels, autocast casts of every frozen weight in every forward, and the
autograd nodes between them. The options here attack that without changing a result beyond
bf16 rounding (each is tested against the eager path):

- `compile`: `torch.compile` of each tower AS A WHOLE (the vision `VisionTransformer` module
  and the CLIP text path `encode_text`), so the adapters' forward hooks on `ls_1`/`ls_2` are
  traced into one graph per tower and inductor fuses each site with its neighbours. Dynamo
  guards on the hooks: `set_active` / `disable_adapters` recompile instead of running stale
  graphs. Blocks wrapped for recomputation (`grad_checkpoint_frozen`) cannot be traced with
  their frame-context restore, so whole-tower compile is refused there (the engine's
  block-level compile inside the recompute applies instead) and the reason is recorded.
- `fused_adapters`: bottleneck sites run as one autograd node (`methods/fused.py`).
- `bf16_frozen_weights`: frozen matrix weights (linear, attention in-projection, patch conv,
  projections) are STORED in bf16. Under bf16 autocast they are cast to bf16 at every use
  anyway, so the result is bit-identical, but the per-step cast kernels disappear and the
  backward no longer keeps a bf16 copy of each weight alive (~300 MB on ViT-B/32). Needs
  bf16 autocast; the fp32 originals are kept on the host and put back by `FastPath.close()`.
- `cuda_graphs`: `CudaGraphStep` captures a device-only step function once for fixed shapes
  and replays it (one launch for the whole step). The learning rate is fed through a device
  tensor, so the schedule keeps working; batches of another shape run eagerly (`matches`).

`prepare_fast_path(model, cfg, device, precision)` applies the first three and returns a
`FastPath` (what was applied, what was refused and why, `close()` to undo). bf16 autocast is
already the engine's CUDA default (`precision: auto`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from xmodal.errors import XModalError

#: CUDA defaults. Only what changes no number and costs nothing up front is on: bf16-stored frozen
#: weights (bit-identical under bf16 autocast). compile / fused / CUDA graphs stay opt-in until
#: `benchmarks/gpu_suite.sh` has measured which of them wins on a GPU (no GPU run yet).
CUDA_DEFAULTS = {"compile": False, "fused_adapters": False, "bf16_frozen_weights": True, "cuda_graphs": False}

#: batch entries a device step never reads (logging / bookkeeping): they may change between replays
VOLATILE_KEYS = ("captions", "index")


@dataclass
class FastPathOptions:
    compile: bool = False
    compile_mode: Optional[str] = None        # e.g. "max-autotune-no-cudagraphs"
    compile_backend: str = "inductor"         # "aot_eager" traces without code generation (tests)
    fused_adapters: bool = False
    bf16_frozen_weights: bool = False
    cuda_graphs: bool = False

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device) -> "FastPathOptions":
        """Options from a TrainConfig-like object: a field set to None (or absent) takes the
        device default (CUDA_DEFAULTS on CUDA, everything off elsewhere)."""
        defaults = CUDA_DEFAULTS if torch.device(device).type == "cuda" else {}
        values = {}
        for name in ("compile", "fused_adapters", "bf16_frozen_weights", "cuda_graphs"):
            v = getattr(cfg, name, None)
            values[name] = bool(defaults.get(name, False) if v is None else v)
        for name in ("compile_mode", "compile_backend"):
            v = getattr(cfg, name, None)
            if v is not None:
                values[name] = v
        return cls(**values)


@dataclass
class FastPath:
    """What `prepare_fast_path` applied (`applied`), refused (`refused`: option -> reason)."""

    options: FastPathOptions
    applied: List[str] = field(default_factory=list)
    refused: Dict[str, str] = field(default_factory=dict)
    _undo: List[Callable[[], None]] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        parts = [f"fast path: {', '.join(self.applied) or 'none'}"]
        parts += [f"{k} not applied ({v})" for k, v in self.refused.items()]
        return "; ".join(parts)

    def close(self) -> None:
        """Undo everything (restores fp32 frozen weights bit-exactly, drops compiled towers)."""
        while self._undo:
            self._undo.pop()()


def prepare_fast_path(model: nn.Module, cfg: Any = None, device: Optional[torch.device] = None,
                      precision: Optional[str] = None) -> FastPath:
    """Apply the compile / fused / bf16-weights options of `cfg` (a `FastPathOptions`, or any
    object with those fields, e.g. a TrainConfig) to an `AdaptedModel` that has its method
    attached. `precision` is the resolved training precision ("bf16", "fp16", "fp32")."""
    device = torch.device(device) if device is not None else _model_device(model)
    opts = cfg if isinstance(cfg, FastPathOptions) else FastPathOptions.from_config(cfg, device)
    fp = FastPath(opts)
    backbone = getattr(model, "backbone", model)
    try:
        if opts.bf16_frozen_weights:
            if precision != "bf16":
                fp.refused["bf16_frozen_weights"] = (f"needs bf16 autocast, the run's precision is {precision}: "
                                                     f"storing weights in bf16 would change the results")
            else:
                n = _store_frozen_bf16(model, fp._undo)
                fp.applied.append(f"bf16_frozen_weights ({n / 2**20:.0f} MiB saved)")
        if opts.fused_adapters:
            from xmodal.methods import fused

            old = fused.set_enabled(True)
            fp._undo.append(lambda: fused.set_enabled(old))
            fp.applied.append("fused_adapters")
        if opts.compile:
            reason = _whole_tower_blocker(backbone)
            if reason:
                fp.refused["compile"] = reason
            else:
                compile_towers(backbone, fp._undo, mode=opts.compile_mode, backend=opts.compile_backend)
                fp.applied.append(f"compile (whole towers, {opts.compile_backend})")
        if opts.cuda_graphs and device.type != "cuda":
            fp.refused["cuda_graphs"] = f"needs a CUDA device, got {device.type}"
    except BaseException:
        fp.close()
        raise
    return fp


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------- compile
def _whole_tower_blocker(backbone) -> Optional[str]:
    from xmodal.backbones.dual_encoder import MODALITIES

    for m in MODALITIES:
        for block in backbone.blocks(m):
            if "forward" in vars(block):
                return ("blocks are wrapped for recomputation (grad_checkpoint_frozen); a whole tower "
                        "cannot be traced through them: the engine compiles blocks inside the recompute instead")
    return None


def compile_towers(backbone, undo: Optional[List[Callable[[], None]]] = None, *, mode: Optional[str] = None,
                   backend: str = "inductor") -> None:
    """torch.compile the vision tower module and the text encode path, hooks traced in.

    Both are wrapped on the instance (`_compiled_call_impl` / an `encode_text` attribute), so
    the module tree and state_dict keys do not change."""
    clip = backbone.clip
    visual = clip.visual
    visual.compile(mode=mode, backend=backend, dynamic=False)
    clip.encode_text = torch.compile(clip.encode_text, mode=mode, backend=backend, dynamic=False)

    def restore() -> None:
        visual._compiled_call_impl = None
        if "encode_text" in vars(clip):
            del clip.encode_text

    if undo is not None:
        undo.append(restore)


# ------------------------------------------------------------ bf16 frozen weights
def _matrix_weights(backbone) -> List[Tuple[nn.Module, str]]:
    """(module, attribute) of the matmul weights autocast casts to bf16 at every use."""
    from xmodal.backbones.dual_encoder import MODALITIES

    # open_clip casts the text embeddings to the dtype of the first block's c_fc weight
    # (`get_cast_dtype`): that one weight stays fp32, or the residual stream would turn bf16
    keep = {id(backbone.blocks(m)[0].mlp.c_fc) for m in MODALITIES}
    out = []
    for module in backbone.modules():
        if id(module) in keep:
            continue
        if type(module).__name__.startswith("Parametriz") or hasattr(module, "parametrizations"):
            continue  # LoRA-style weights read as W + delta: not a plain autocast cast
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out.append((module, "weight"))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out.append((module, "in_proj_weight"))
    clip = backbone.clip
    for owner, name in ((clip.visual, "proj"), (getattr(clip, "text", clip), "text_projection")):
        if isinstance(getattr(owner, name, None), nn.Parameter):
            out.append((owner, name))
    return out


def _store_frozen_bf16(model: nn.Module, undo: List[Callable[[], None]]) -> int:
    backbone = getattr(model, "backbone", model)
    saved: List[Tuple[nn.Parameter, torch.Tensor]] = []
    seen = set()
    for module, name in _matrix_weights(backbone):
        p = getattr(module, name)
        if not isinstance(p, nn.Parameter) or p.requires_grad or p.dtype != torch.float32 or id(p) in seen:
            continue
        seen.add(id(p))
        host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=p.is_cuda)
        host.copy_(p.data)
        saved.append((p, host))
        p.data = p.data.to(torch.bfloat16)

    def restore() -> None:
        for p, host in saved:
            p.data = host.to(p.device)

    undo.append(restore)
    return sum(h.numel() * 2 for _, h in saved)


# ----------------------------------------------------------------- CUDA graphs
class CudaGraphStep:
    """Capture `step_fn(batch)` once for fixed shapes; later calls copy the batch into static
    buffers and replay the whole step as one graph.

    `step_fn` must do device work only (forward, backward, optimizer step, device-side
    statistics) and return a tensor or a tuple/dict of tensors; host bookkeeping (step counter,
    scheduler) stays outside. The first `warmup` calls run eagerly on a side stream (lazy
    optimizer state, cuBLAS workspaces); the next call captures, and every call from then on
    replays. With an `optimizer`, its groups become `capturable` and read the learning rate
    from a device tensor that is refreshed from `group["lr"]` (the float the scheduler sets)
    before each replay. Results are cloned, so keeping them across replays is safe. Autocast
    inside `step_fn` must use `cache_enabled=False` (a capture requirement).

    `emulate=True` (tests, CPU) replaces capture/replay by running `step_fn` on the static
    buffers, which exercises everything but the graph itself.
    """

    def __init__(self, step_fn: Callable[[Dict[str, Any]], Any], example_batch: Mapping[str, Any], *,
                 optimizer: Optional[torch.optim.Optimizer] = None, warmup: int = 3,
                 device: Optional[torch.device] = None, emulate: bool = False):
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.warmup = int(warmup)
        self.emulate = bool(emulate)
        tensors = {k: v for k, v in example_batch.items() if isinstance(v, torch.Tensor)}
        if device is None:
            device = next(iter(tensors.values())).device if tensors else torch.device("cuda")
        self.device = torch.device(device)
        if self.device.type != "cuda" and not self.emulate:
            raise XModalError(f"cuda_graphs: needs a CUDA device, the step runs on {self.device}")
        self.static = {k: v.detach().clone().to(self.device) for k, v in tensors.items()}
        self.frozen = {k: v for k, v in example_batch.items() if k not in tensors and k not in VOLATILE_KEYS}
        self.calls = 0
        self.replays = 0
        self.graph: Optional[Any] = None
        self.outputs: Any = None
        self._lr: List[torch.Tensor] = []

    # -- shapes
    def mismatch(self, batch: Mapping[str, Any]) -> Optional[str]:
        """Why `batch` cannot be replayed (None if it can)."""
        for k, ref in self.static.items():
            v = batch.get(k)
            if not isinstance(v, torch.Tensor):
                return f"batch[{k!r}] is missing or not a tensor"
            if v.shape != ref.shape or v.dtype != ref.dtype:
                return (f"batch[{k!r}] is {tuple(v.shape)} {v.dtype}, the captured step has "
                        f"{tuple(ref.shape)} {ref.dtype}")
        extra = sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in self.static)
        if extra:
            return f"batch has tensors {extra} the captured step does not read"
        for k in batch:
            if k not in self.static and k not in self.frozen and k not in VOLATILE_KEYS:
                return f"batch[{k!r}] was not in the captured step's batch"
        for k, ref in self.frozen.items():
            if k not in batch or batch[k] != ref:
                return f"batch[{k!r}] differs from the captured step's (non-tensor entries are fixed at capture)"
        return None

    def matches(self, batch: Mapping[str, Any]) -> bool:
        return self.mismatch(batch) is None

    # -- running
    def __call__(self, batch: Mapping[str, Any]):
        why = self.mismatch(batch)
        if why is not None:
            raise XModalError(f"cuda_graphs: {why}; run this batch eagerly (check `matches` first)")
        for k, v in self.static.items():
            v.copy_(batch[k], non_blocking=True)
        view = dict(self.static, **self.frozen, **{k: batch[k] for k in VOLATILE_KEYS if k in batch})
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(view)
        if self.graph is None:
            self._capture(view)
        self._replay(view)
        self.replays += 1
        return _clone(self.outputs)

    def _eager(self, view):
        if self.device.type != "cuda":
            return _clone(self.step_fn(view))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = _clone(self.step_fn(view))
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    @contextlib.contextmanager
    def _lr_tensors(self):
        """Inside: every group's lr is its device tensor (what the graph reads)."""
        if self.optimizer is None:
            yield
            return
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for g, t in zip(self.optimizer.param_groups, self._lr):
            g["lr"] = t
        try:
            yield
        finally:
            for g, lr in zip(self.optimizer.param_groups, floats):
                g["lr"] = lr

    def _capture(self, view) -> None:
        if self.optimizer is not None:
            self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)
                        for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["capturable"] = True
        if self.emulate:
            self.graph = "emulated"
            return
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with self._lr_tensors(), torch.cuda.graph(graph):
            self.outputs = self.step_fn(view)
        self.graph = graph

    def _replay(self, view) -> None:
        if self.optimizer is not None:
            for g, t in zip(self.optimizer.param_groups, self._lr):
                t.fill_(float(g["lr"]))
        if self.emulate:
            with self._lr_tensors():
                self.outputs = self.step_fn(view)
        else:
            self.graph.replay()


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, list):
        return [_clone(o) for o in out]
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out


# ------------------------------------------------------------ a graphable step
def make_device_step(trainer) -> Callable[[Dict[str, Any]], torch.Tensor]:
    """The device part of one `Trainer.step` on ONE micro-batch, for `CudaGraphStep`.

    Forward under bf16/fp16 autocast with the autocast cache off, InfoNCE + the method's extra
    loss, backward, gradient clipping, the guarded fused AdamW update (skipped on the device
    when the loss or gradient is not finite; the latch `trainer.halted` as in the engine),
    zero_grad, logit-scale clamp. Returns the engine's `StepResult.values` layout (STEP_FIELDS:
    loss, t2v, v2t, grad_norm, logit_scale, nonfinite, skipped=0) as one float64 tensor; the
    caller steps the scheduler and counts the update.
    Single process, no loss scaling (fp16 runs use the engine's eager step)."""
    from xmodal.engine.loss import MAX_LOGIT_SCALE, contrastive_loss
    from xmodal.engine.optim import clip_grad_norm, guarded_step

    if getattr(trainer, "ddp", None) is not None or getattr(trainer, "scaler", None) is not None:
        raise XModalError("cuda_graphs: supported for single-process bf16/fp32 training only "
                          "(DDP and fp16 loss scaling run eagerly)")
    device, precision = trainer.device, trainer.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model, head = trainer.model, trainer.head
    log_max = math.log(MAX_LOGIT_SCALE)

    def step(batch: Dict[str, Any]) -> torch.Tensor:
        model.train()
        ctx = (torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None
               else contextlib.nullcontext())
        with ctx:
            text, frames = model(batch["tokens"], batch["pixels"], batch.get("frame_mask"))
        mask = batch.get("frame_mask")
        out = contrastive_loss(text, frames, mask, head, model.logit_scale)
        loss = out.loss
        method = model.method
        if method is not None:
            extra = method.extra_loss(model, batch, {"text": text, "frames": frames, "frame_mask": mask,
                                                     "loss": out, "head": head})
            if extra is not None:
                loss = loss + extra
        loss.backward()
        grad_norm = clip_grad_norm(trainer.params, trainer.cfg.grad_clip).to(device, torch.float64)
        nonfinite = ~torch.isfinite(grad_norm) | ~torch.isfinite(loss.detach())
        trainer.halted |= nonfinite
        guarded_step(trainer.optimizer, trainer.halted.to(torch.float32))
        trainer.optimizer.zero_grad(set_to_none=False)  # graphs need the grads' memory to stay put
        ls = model.logit_scale
        if ls.requires_grad:
            with torch.no_grad():
                ls.clamp_(0, log_max)
        return torch.stack([loss.detach().double(), out.t2v.detach().double(), out.v2t.detach().double(),
                            grad_norm.reshape(()), ls.detach().exp().double(), nonfinite.double().reshape(()),
                            torch.zeros((), dtype=torch.float64, device=device)])

    return step


__all__ = ["CUDA_DEFAULTS", "CudaGraphStep", "FastPath", "FastPathOptions", "compile_towers", "make_device_step",
           "prepare_fast_path"]
