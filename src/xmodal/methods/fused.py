"""Fused execution of one bottleneck adapter site: one autograd node instead of a chain.

The eager `Bottleneck.forward` is a chain of small ops per site and step: the concatenations of
the Cross-Modal Adapter's shared slices (weight and bias), autocast weight casts, two linears,
the activation, a scale multiply, a dtype cast, each its own autograd node. With 48 sites on
ViT-B/32 the small-batch step is launch- and host-bound. `FusedBottleneck` is ONE autograd
node per site, doing the same arithmetic with the fewest ops:

    forward : pre = addmm(b_down, h, W_down^T)        (shared down slice concatenated inside)
              z   = act(pre)
              out = addmm(b_up, z, W_up^T, beta=s, alpha=s)  (scale folded in; shared up slice inside)
    saves   : h, pre, z and the (cast, concatenated) weights - what eager autocast keeps too
    backward: dW_up, db_up, dW_down, db_down, dh by mm/sum with the activation's derivative in
              closed form (no nested autograd: traceable by torch.compile, capturable in a CUDA
              graph); the shared slices' gradients are views split off the concatenated ones
              (both towers accumulate into them).

Measured on CPU (tests/test_fused_adapters.py): the same number of kernels as eager (never
more), one autograd node instead of about ten. It does not fuse kernels by itself: under
`torch.compile` (whole towers, `engine/fastpath.py`) the node is traced and inductor fuses
around it. Whether it pays on a GPU is what `benchmarks/gpu_suite.sh` measures (`fused`).

Computation runs in the autocast dtype when autocast is on (bf16 on CUDA), else in the
adapter's dtype, exactly as autocast would run the eager linears; the delta comes back in the
input's dtype and weight gradients in the weights' dtype. Dropout in training is not fused
(`supports` says when the fused path applies; the eager path runs otherwise); the optional
LayerNorm runs eagerly before the fused node.

Switched by `set_enabled(True)` / `enabled()` (process-wide, read at each forward, so
`torch.compile` guards on it); `prepare_fast_path(fused_adapters=True)` turns it on.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch

_ENABLED = False


def set_enabled(flag: bool) -> bool:
    """Route bottleneck adapters through the fused path (True) or the eager one; returns the old value."""
    global _ENABLED
    old, _ENABLED = _ENABLED, bool(flag)
    return old


def is_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Within this block bottleneck adapters run fused (flag=True) or eager."""
    old = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(old)


def supports(bottleneck) -> bool:
    """The fused path covers everything but training-time dropout (norm runs eagerly before it)."""
    return (bottleneck.dropout is None or not bottleneck.training) and bottleneck.activation in FUSED_ACTIVATIONS


def _compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """What autocast would run a linear in: its dtype when enabled on x's device, else the params'."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _cat(a: torch.Tensor, b: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    return a if b is None else torch.cat([a, b], dim=dim)


class FusedBottleneck(torch.autograd.Function):
    """delta = scale * (act(h [W_d ; W_ds]^T + b_d) [W_u ; W_us]^T + [b_u ; b_us]), h = x.to(param dtype)."""

    @staticmethod
    def forward(ctx, x, act, scale, compute_dtype, w_down, b_down, w_down_s, w_up, b_up, w_up_s, b_up_s):
        shape, out_dtype = x.shape, x.dtype
        param_dtype = w_down.dtype
        with torch.autocast(x.device.type, enabled=False):
            # h = x.to(param dtype) as the eager path, then to the compute dtype (autocast's cast)
            h = x.reshape(-1, shape[-1]).to(param_dtype).to(compute_dtype)
            wd = _cat(w_down, w_down_s, 1).to(compute_dtype)
            wu = _cat(w_up, w_up_s, 0).to(compute_dtype)
            bu = None if b_up is None else _cat(b_up, b_up_s, 0).to(compute_dtype)
            bd = _cast(b_down, compute_dtype)
            pre = torch.addmm(bd, h, wd.t()) if bd is not None else h @ wd.t()
            z = _activate(act, pre)
            if bu is not None:
                out = torch.addmm(bu, z, wu.t(), beta=scale, alpha=scale)
            else:
                out = z @ wu.t()
                if scale != 1.0:
                    out = out * scale
        ctx.save_for_backward(h, pre, z, wd, wu)
        ctx.act, ctx.scale, ctx.shape, ctx.param_dtype = act, scale, shape, param_dtype
        ctx.split_in = w_down.shape[1]
        ctx.split_out = w_up.shape[0]
        ctx.has = (b_down is not None, w_down_s is not None, b_up is not None, w_up_s is not None)
        ctx.dtypes = tuple(None if t is None else t.dtype
                           for t in (w_down, b_down, w_down_s, w_up, b_up, w_up_s, b_up_s))
        return out.to(out_dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad_out):
        h, pre, z, wd, wu = ctx.saved_tensors
        scale = ctx.scale
        dt = h.dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
            if scale != 1.0:
                g = g * scale
            # out = s * (z W_u^T + b_u): with g = s * grad: dz = g W_u, dW_u = g^T z, db_u = sum g
            grad_pre = _activation_grad(ctx.act, g @ wu, pre)
            grad_wu = torch.mm(g.t(), z)
            grad_bu = g.sum(0) if ctx.has[2] else None
            grad_wd = torch.mm(grad_pre.t(), h)
            grad_bd = grad_pre.sum(0) if ctx.has[0] else None
            grad_h = (grad_pre @ wd) if ctx.needs_input_grad[0] else None
        d_wd, d_bd, d_wds, d_wu, d_bu, d_wus, d_bus = ctx.dtypes
        gx = None if grad_h is None else grad_h.reshape(ctx.shape).to(grad_out.dtype)
        # one cast per concatenated gradient, then free slicing into the unique / shared parts
        grad_wd, grad_wu = grad_wd.to(d_wd), grad_wu.to(d_wu)
        grad_bd = _to(grad_bd, d_bd)
        grad_bu = _to(grad_bu, d_bu)
        gwd, gwds = grad_wd[:, : ctx.split_in], (grad_wd[:, ctx.split_in:] if ctx.has[1] else None)
        gwu, gwus = grad_wu[: ctx.split_out], (grad_wu[ctx.split_out:] if ctx.has[3] else None)
        gbu = gbus = None
        if grad_bu is not None:
            gbu, gbus = grad_bu[: ctx.split_out], (grad_bu[ctx.split_out:] if ctx.has[3] else None)
        return gx, None, None, None, gwd, grad_bd, gwds, gwu, gbu, gwus, gbus


def _activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"no fused activation {name!r}")


def _activation_grad(name: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx * grad, in closed form (no nested autograd: compile- and graph-capture-safe)."""
    if name in ("gelu_tanh", "gelu"):
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "quick_gelu":
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))
    if name == "relu":
        return torch.where(x > 0, grad, torch.zeros_like(grad))
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    raise ValueError(f"no fused activation {name!r}")


#: activations the fused path computes (the names of `bottleneck.ACTIVATIONS`)
FUSED_ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu", "relu", "silu")


def _to(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return None if t is None or dtype is None else t.to(dtype)


def bottleneck_forward(bottleneck, x: torch.Tensor, shared=None) -> torch.Tensor:
    """The fused equivalent of `Bottleneck.forward(x, shared)` (same parameters, same result)."""
    down, up = bottleneck.down, bottleneck.up
    w_down_s = b_up_s = w_up_s = None
    if bottleneck.shared_in:
        w_down_s = _need(shared, "down").weight
    if bottleneck.shared_out:
        proj = _need(shared, "up")
        w_up_s, b_up_s = proj.weight, proj.bias
    if bottleneck.norm is not None:  # the pre-norm runs eagerly; its output feeds the fused site
        x_in = bottleneck.norm(x.to(down.weight.dtype))
    else:
        x_in = x
    compute = _compute_dtype(x, down.weight.dtype)
    out = FusedBottleneck.apply(x_in, bottleneck.activation, bottleneck.scale, compute, down.weight, down.bias,
                                w_down_s, up.weight, up.bias, w_up_s, b_up_s)
    return out.to(x.dtype)


def _need(shared, part: str):
    proj = getattr(shared, part, None) if shared is not None else None
    if proj is None:
        raise RuntimeError(f"this bottleneck shares its {part} projection but no shared slice was given")
    return proj


def kernel_count(fn: Callable[[], torch.Tensor]) -> Tuple[int, int]:
    """(forward ops, backward ops) that `fn()` dispatches, counted with the profiler-free
    TorchDispatchMode: what tests use to show a fused site launches fewer kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in _FREE_OPS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as fwd:
        out = fn()
    with _Count() as bwd:
        out.sum().backward()
    return fwd.n, bwd.n


# view / metadata ops that launch no kernel
_FREE_OPS = {
    torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.t.default,
    torch.ops.aten.transpose.int, torch.ops.aten.reshape.default, torch.ops.aten.detach.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.expand.default, torch.ops.aten.alias.default,
    torch.ops.aten.permute.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
}


__all__ = ["FusedBottleneck", "bottleneck_forward", "enabled", "is_enabled", "kernel_count", "set_enabled",
           "supports"]
