"""Batched, gradient-free encoding of texts, images and videos for evaluation and indexing.

Evaluation encodes every caption and every gallery item once, offline, then scores all
pairs. These helpers do that for a `DualEncoder` or an `AdaptedModel` (anything with
`tokenize`, `encode_text`, `encode_image`, `encode_video`):

* the model runs in eval mode under `torch.inference_mode()` (no autograd bookkeeping at all)
  and is given back in exactly the train/eval state of each of its submodules that it came
  with; the returned tensors are ordinary tensors (usable later with autograd or in place);
* on a CUDA device the forward runs under bf16 autocast (`amp=None` = automatic), on CPU
  in the model's own precision; inputs are cast to the model's parameter dtype;
* results are float32, unnormalised (call `normalize` where the method needs cosine
  similarity) and collected on `output_device` (CPU by default: a gallery can be larger
  than accelerator memory);
* on CUDA nothing synchronises per batch: inputs go to the device from pinned host memory
  with non-blocking copies (DataLoader batches built with `pin_memory=True` are used as they
  are, others are pinned on the fly) and results come back by non-blocking copies into
  pinned buffers, with one synchronisation at the end. So the host prepares (or the
  loader's workers decode) batch i+1 while the GPU encodes batch i; big batches
  (`batch_size`, or the loader's) keep the GPU busy;
* progress is shown when stderr is a terminal (`progress=None`), or forced on/off (plain periodic
  lines instead of a bar when stderr is a file; see `xmodal.progress`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from xmodal.errors import XModalError
from xmodal.progress import progress as progress_bar

Device = Union[str, torch.device, None]


# ---------------------------------------------------------------------- helpers
def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along the last dim; all-zero rows (padded frames) stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _embed_dim(model: nn.Module) -> Optional[int]:
    for owner in (model, getattr(model, "backbone", None)):
        dim = getattr(owner, "embed_dim", None) if owner is not None else None
        if isinstance(dim, int):
            return dim
    return None


def _resolve_device(model: nn.Module, device: Device) -> torch.device:
    return model_device(model) if device is None else torch.device(device)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise XModalError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return batch_size


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() inside the block; afterwards every submodule gets its own old mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def autocast(device: torch.device, amp: Optional[bool] = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (amp=None), or wherever amp=True; nothing otherwise."""
    enabled = device.type == "cuda" if amp is None else bool(amp)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _inference(model: nn.Module, device: torch.device, amp: Optional[bool]) -> Iterator[None]:
    with eval_mode(model), torch.inference_mode(), autocast(device, amp):
        yield


def _empty(shape: Tuple[int, ...], output_device: Device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=output_device or "cpu")


def to_device(x: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host -> GPU without blocking the host (pinned source, non_blocking), then the dtype cast
    on the device; elsewhere a plain `.to` (CPU: the very same values as before)."""
    if device.type == "cuda" and x.device.type == "cpu":
        if not x.is_pinned():
            x = x.pin_memory()  # the caching host allocator keeps it alive until the copy is done
        x = x.to(device, non_blocking=True)
        return x if dtype is None else x.to(dtype)
    return x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)


def loader_options(device: Device, num_workers: int = 0, prefetch: int = 4) -> dict:
    """DataLoader keyword arguments for an encoding loader on `device`: pinned batches on CUDA
    (so `to_device` copies them without blocking), and `prefetch` batches per decode worker
    queued ahead, so decoding overlaps the GPU's encoding of the batch before."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    opts: dict = {"pin_memory": dev.type == "cuda"}
    if num_workers > 0:
        opts["prefetch_factor"] = int(prefetch)
    return opts


class _Collector:
    """Per-batch results -> float32 on `output_device`, without a synchronisation per batch:
    GPU -> CPU copies land in pinned buffers with non_blocking=True; `tensors()` waits once."""

    def __init__(self, output_device: Device):
        self.output_device = torch.device(output_device or "cpu")
        self.parts: List[torch.Tensor] = []
        self.pending = False

    def add(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.device.type == "cuda" and self.output_device.type == "cpu":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            self.pending = True
            x = host
        else:
            x = x.to(self.output_device)
        self.parts.append(x)
        return x

    def wait(self) -> None:
        if self.pending:
            torch.cuda.synchronize()
            self.pending = False

    def tensors(self) -> List[torch.Tensor]:
        self.wait()
        return self.parts


def _empty_dim(model: nn.Module, what: str) -> int:
    dim = _embed_dim(model)
    if dim is None:
        raise XModalError(f"{what}: nothing to encode and the model has no `embed_dim` to shape an empty result")
    return dim


# ------------------------------------------------------------------------ texts
def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    batch_size: int = 256,
    max_words: Optional[int] = None,
    device: Device = None,
    *,
    amp: Optional[bool] = None,
    progress: Optional[bool] = None,
    output_device: Device = "cpu",
) -> torch.Tensor:
    """Captions -> (N, D) float32 text features, tokenised batch by batch with `model.tokenize`.

    `max_words` is the token budget passed to `tokenize` (SOT/EOT included; long captions
    keep their end token).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise XModalError(f"texts[{i}]: expected a string, got {type(text).__name__}")
    batch_size = _check_batch_size(batch_size)
    if not texts:
        return _empty((0, _empty_dim(model, "texts")), output_device)
    dev = _resolve_device(model, device)
    out = _Collector(output_device)
    with _inference(model, dev, amp), progress_bar(
        total=len(texts), desc="texts", unit="text", enabled=progress, leave=False
    ) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            tokens = to_device(model.tokenize(chunk, max_words=max_words), dev)
            out.add(model.encode_text(tokens))
            bar.update(len(chunk))
    return torch.cat(out.tensors(), dim=0)


# ----------------------------------------------------------------------- images
def _image_batch(batch: Any, where: str) -> torch.Tensor:
    """(b, 3, H, W) from a tensor, a (b, 1, 3, H, W) one-frame clip batch or a dict with `pixels`."""
    if isinstance(batch, Mapping):
        if "pixels" not in batch:
            raise XModalError(f"{where}: batch dict has no 'pixels' entry (keys: {sorted(batch)})")
        batch = batch["pixels"]
    if not isinstance(batch, torch.Tensor):
        raise XModalError(f"{where}: expected a tensor of images, got {type(batch).__name__}")
    if batch.dim() == 5 and batch.shape[1] == 1:
        batch = batch[:, 0]
    if batch.dim() != 4:
        raise XModalError(f"{where}: expected images of shape (N, 3, H, W), got {tuple(batch.shape)}")
    return batch


def encode_images(
    model: nn.Module,
    images: Union[torch.Tensor, Iterable[Any]],
    batch_size: int = 256,
    device: Device = None,
    *,
    amp: Optional[bool] = None,
    progress: Optional[bool] = None,
    output_device: Device = "cpu",
) -> torch.Tensor:
    """Images (N, 3, H, W), or an iterable of such batches / dicts with `pixels` -> (N, D) float32."""
    batch_size = _check_batch_size(batch_size)
    dev = _resolve_device(model, device)
    dtype = _param_dtype(model)
    if isinstance(images, torch.Tensor):
        images = _image_batch(images, "images")
        batches: Iterable[Any] = (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
        total: Optional[int] = images.shape[0]
    else:
        batches, total = images, None
    out = _Collector(output_device)
    with _inference(model, dev, amp), progress_bar(
        total=total, desc="images", unit="img", enabled=progress, leave=False
    ) as bar:
        for i, batch in enumerate(batches):
            pixels = _image_batch(batch, f"images batch {i}")
            out.add(model.encode_image(to_device(pixels, dev, dtype)))
            bar.update(pixels.shape[0])
    parts = out.tensors()
    if not parts:
        return _empty((0, _empty_dim(model, "images")), output_device)
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------- videos
def _check_mask(frame_mask: Optional[torch.Tensor], b: int, f: int, where: str) -> torch.Tensor:
    if frame_mask is None:
        return torch.ones(b, f, dtype=torch.bool)
    if not isinstance(frame_mask, torch.Tensor) or tuple(frame_mask.shape) != (b, f):
        shape = tuple(frame_mask.shape) if isinstance(frame_mask, torch.Tensor) else type(frame_mask).__name__
        raise XModalError(f"{where}: frame_mask must have shape (B, F) = {(b, f)}, got {shape}")
    return frame_mask.to(torch.bool)


def _check_video(videos: Any, where: str) -> torch.Tensor:
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise XModalError(f"{where}: expected clips of shape (B, F, 3, H, W), got {shape}")
    return videos


def encode_videos(
    model: nn.Module,
    videos: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    batch_size: int = 32,
    device: Device = None,
    *,
    amp: Optional[bool] = None,
    progress: Optional[bool] = None,
    output_device: Device = "cpu",
) -> torch.Tensor:
    """Clips (B, F, 3, H, W) -> per-frame features (B, F, D) float32; `batch_size` counts clips.

    Padded frames (mask False) are encoded like the others; pooling heads drop them.
    """
    videos = _check_video(videos, "videos")
    b, f = videos.shape[:2]
    mask = _check_mask(frame_mask, b, f, "videos")
    batch_size = _check_batch_size(batch_size)
    if b == 0:
        return _empty((0, f, _empty_dim(model, "videos")), output_device)
    dev = _resolve_device(model, device)
    dtype = _param_dtype(model)
    out = _Collector(output_device)
    with _inference(model, dev, amp), progress_bar(
        total=b, desc="videos", unit="clip", enabled=progress, leave=False
    ) as bar:
        for start in range(0, b, batch_size):
            clips = to_device(videos[start : start + batch_size], dev, dtype)
            m = to_device(mask[start : start + batch_size], dev)
            out.add(model.encode_video(clips, m))
            bar.update(clips.shape[0])
    return torch.cat(out.tensors(), dim=0)


def encode_loader(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: Device = None,
    *,
    amp: Optional[bool] = None,
    progress: Optional[bool] = None,
    output_device: Device = "cpu",
    return_index: bool = False,
):
    """Encode every batch of an eval DataLoader -> (features (N, F, D), frame_mask (N, F)).

    Batches are dicts with `pixels` (B, F, 3, H, W) (images: F = 1, or 4-D) and optionally
    `frame_mask` (B, F) (all True when absent). Batches with fewer frames are padded to
    the largest F with zero features and mask False. Rows follow the loader's order; with
    `return_index=True` the concatenated `index` entries (N,) are returned third.
    """
    dev = _resolve_device(model, device)
    dtype = _param_dtype(model)
    collector = _Collector(output_device)
    masks: List[torch.Tensor] = []
    indices: List[torch.Tensor] = []
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with _inference(model, dev, amp), progress_bar(
        total=total, desc="gallery", unit="batch", enabled=progress, leave=False
    ) as bar:
        for i, batch in enumerate(loader):
            where = f"loader batch {i}"
            if not isinstance(batch, Mapping) or "pixels" not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise XModalError(f"{where}: expected a dict with 'pixels' (and 'frame_mask'), got {keys}")
            pixels = batch["pixels"]
            if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
                pixels = pixels.unsqueeze(1)
            pixels = _check_video(pixels, f"{where} 'pixels'")
            b, f = pixels.shape[:2]
            mask = _check_mask(batch.get("frame_mask"), b, f, where)
            if return_index:
                index = batch.get("index")
                if not isinstance(index, torch.Tensor) or tuple(index.shape) != (b,):
                    raise XModalError(f"{where}: return_index=True needs an 'index' tensor of shape ({b},)")
                indices.append(index.detach().to(torch.long).cpu())
            collector.add(model.encode_video(to_device(pixels, dev, dtype), to_device(mask, dev)))
            masks.append(mask.to(output_device or "cpu"))
            bar.update(1)
    feats = collector.tensors()
    if not feats:
        raise XModalError("loader: yielded no batches; expected at least one batch of visual items")
    f_max = max(x.shape[1] for x in feats)
    padded_feats, padded_masks = [], []
    for x, m in zip(feats, masks):
        pad = f_max - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1)
            m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
        padded_feats.append(x)
        padded_masks.append(m)
    result = (torch.cat(padded_feats, dim=0), torch.cat(padded_masks, dim=0))
    if return_index:
        return result + (torch.cat(indices, dim=0),)
    return result


__all__ = [
    "autocast",
    "loader_options",
    "to_device",
    "encode_images",
    "encode_loader",
    "encode_texts",
    "encode_videos",
    "eval_mode",
    "model_device",
    "normalize",
]
