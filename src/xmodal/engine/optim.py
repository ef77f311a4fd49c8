"""Optimisation pieces: AdamW groups, warm-up + cosine schedule, precision, recomputation.

- Weight decay (0.2 by default, as CLIP fine-tuning) applies to matrices only: biases, norm
  weights, gains, every other 1-D tensor and `logit_scale` are in a no-decay group.
- The schedule is a pure function of the update count, so its state is one integer and a
  resumed run gets exactly the learning rates of an uninterrupted one.
- AdamW is the fused implementation, whose step honours a device-side `found_inf` flag: a
  non-finite update is skipped on the device, without a host synchronisation (`guarded_step`).
- Mixed precision: bf16 autocast on GPU (no scaler needed); fp16 autocast with `LossScaler`,
  GradScaler's dynamic loss scale kept entirely in device tensors (overflow skips the update and
  halves the scale; nothing is read back to the host inside a step).
- `checkpoint_blocks` recomputes the frozen towers' block activations in backward
  (non-reentrant `torch.utils.checkpoint`): the frozen weights need no gradients, but the
  activations inside each block would otherwise be kept for the input gradients. Scope
  "all" recomputes every block; "frozen" (selective) only blocks without a trainable site,
  so adapted blocks are not run twice. Blocks below the lowest trainable site are never
  differentiated and run plainly in both scopes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from xmodal.backbones import context as vctx
from xmodal.errors import XModalError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_NORM_TOKENS = ("norm", "ln", "bn", "gain", "gamma", "layernorm", "logit_scale", "bias")


# ------------------------------------------------------------------ param groups
def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, gains, any tensor with < 2 dims and the logit scale get no weight decay."""
    if param.ndim < 2:
        return True
    parts = [p.lower() for p in name.replace("/", ".").split(".")]
    for part in parts:
        for tok in _NORM_TOKENS:
            if part == tok or part.startswith(tok + "_") or part.endswith("_" + tok):
                return True
    return False


def param_groups(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float) -> List[Dict]:
    """Two AdamW groups (decay / no decay); parameter names are kept for checkpoints."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p) else decay).append((name, p))
    groups = []
    for label, items, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if items:
            groups.append({"params": [p for _, p in items], "param_names": [n for n, _ in items],
                           "weight_decay": wd, "group": label})
    return groups


def build_optimizer(named_params, lr: float, weight_decay: float = 0.2, betas=(0.9, 0.98),
                    eps: float = 1e-6) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA): its step can be skipped on the device (`guarded_step`)."""
    groups = param_groups(named_params, weight_decay)
    if not groups:
        raise XModalError("the method has no trainable parameters; nothing to optimise")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)


def guarded_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() that leaves parameters and state untouched where `found_inf` (a device
    tensor, 1.0 = skip) is set, decided on the device with no host synchronisation.

    Fused Adam/AdamW read `found_inf` themselves (the protocol GradScaler uses for them) and
    undo their step count on a skip; `build_optimizer` always builds a fused AdamW.
    """
    if not getattr(optimizer, "defaults", {}).get("fused"):
        raise TypeError(f"guarded_step needs a fused optimizer, got {type(optimizer).__name__} without fused=True")
    optimizer.grad_scale, optimizer.found_inf = None, found_inf.reshape(())
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = optimizer.found_inf = None


# ---------------------------------------------------------------------- schedule
class WarmupCosine:
    """Linear warm-up over the first `warmup_ratio` of the updates, then cosine decay.

    Update s (0-based) uses lr * f(s): f = (s+1)/W for s < W, then
    min_ratio + (1-min_ratio) * (1 + cos(pi * (s-W)/(S-W))) / 2.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1,
                 min_lr_ratio: float = 0.0, warmup_steps: Optional[int] = None):
        if total_steps < 1:
            raise XModalError(f"the schedule needs at least one update, got total_steps={total_steps}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise XModalError(f"train.warmup_ratio={warmup_ratio}: expected a value in [0, 1)")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps if warmup_steps is not None else math.floor(warmup_ratio * total_steps))
        self.min_lr_ratio = float(min_lr_ratio)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()


# ---------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise XModalError(f"train.precision={precision!r}: expected one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """Dynamic fp16 loss scaling (GradScaler's rule) with its state in device tensors.

    `unscale_` divides the gradients by the scale and raises a device flag on any inf/NaN;
    `update` then halves the scale (overflow) or doubles it after `growth_interval` clean
    steps. Neither reads anything back to the host; `state_dict` does (checkpoints only).
    """

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.device = device
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._scale = torch.full((1,), float(init_scale), dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.dtype)

    def unscale_(self, grads: Sequence[torch.Tensor], found_inf: torch.Tensor) -> None:
        """In place: grads /= scale; found_inf (shape (1,), float) set to 1 on a non-finite grad."""
        inv = self._scale.double().reciprocal().float()
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv)

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def get_scale(self) -> float:
        return float(self._scale.item())

    def state_dict(self) -> Dict:
        return {"scale": float(self._scale.item()), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self._growth_tracker.item())}

    def load_state_dict(self, state: Dict) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state.get("_growth_tracker", 0)))
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))


def make_grad_scaler(precision: str, device: torch.device) -> Optional[LossScaler]:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    return LossScaler(device)


def scaler_state(scaler: Optional[LossScaler]) -> Dict:
    """Loss-scaler state as plain numbers (JSON)."""
    if scaler is None:
        return {}
    return {k: (float(v) if isinstance(v, (float, int)) and not isinstance(v, bool) else v)
            for k, v in scaler.state_dict().items()}


# --------------------------------------------------------------- recomputation
@contextlib.contextmanager
def _restore_visual_context(ctx: vctx.VisualContext):
    """Re-enter the frame context of the forward pass while a block is recomputed in backward."""
    with vctx.frames(ctx.num_frames, ctx.frame_mask):
        yield


def has_trainable_site(block: nn.Module) -> bool:
    """A block a method adapts: trainable weights of its own, hooks or parametrizations (where
    methods inject). A miss costs only speed: such a block is recomputed, gradients stay exact."""
    from torch.nn.utils import parametrize

    if any(p.requires_grad for p in block.parameters()):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m) for m in block.modules())


def _needs_grad(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def checkpoint_blocks(blocks: Sequence[nn.Module], compile: bool = False, scope: str = "all") -> Callable[[], None]:
    """Recompute block activations in backward instead of storing them.

    `scope="all"` recomputes every block. `scope="frozen"` (selective, cheaper) recomputes only
    blocks without a trainable site: those store just their input, while adapted blocks keep
    their activations and are not run twice. Either way a frozen block whose input needs no
    gradient (it lies below the lowest trainable site) runs plainly: nothing would be stored
    for it and backward never reaches it.

    The block's `forward` is wrapped on the instance (the module tree and state_dict do not
    change), so forward hooks on its submodules - where methods inject - run inside the
    checkpointed region in both the forward and the recomputation. The visual frame context
    is captured at forward time and restored during recomputation. With `compile`, the
    block's own forward (hooks included) is torch.compiled inside the eager checkpoint
    (dynamo cannot trace a checkpoint with a custom context). Returns an undo function.
    """
    from torch.utils.checkpoint import checkpoint

    if scope not in ("all", "frozen"):
        raise XModalError(f"train.grad_checkpoint_scope={scope!r}: expected 'all' or 'frozen'")
    undo = []
    for block in blocks:
        if "forward" in vars(block):
            continue  # already wrapped
        adapted = has_trainable_site(block)
        if scope == "frozen" and adapted:
            continue
        original = torch.compile(block.forward, dynamic=False) if compile else block.forward

        def wrapped(*args, _orig=original, _frozen=not adapted, **kwargs):
            if not torch.is_grad_enabled() or (_frozen and not _needs_grad(args, kwargs)):
                return _orig(*args, **kwargs)
            ctx = vctx.visual_context()
            return checkpoint(
                _orig, *args, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _restore_visual_context(ctx)),
                **kwargs,
            )

        block.forward = wrapped
        undo.append(block)

    def remove() -> None:
        for b in undo:
            if "forward" in vars(b):
                del b.forward

    return remove


def compile_blocks(blocks: Sequence[nn.Module], mode: Optional[str] = None) -> None:
    """torch.compile each block in place (its hooks, i.e. the adapters, are traced with it)."""
    for block in blocks:
        block.compile(mode=mode, dynamic=False)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (<= 0 disables clipping); returns the pre-clip norm as a 0-d device
    tensor (read it at a logging interval: converting it here would synchronise every step).
    A non-finite norm is returned as is (the caller skips that update)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
