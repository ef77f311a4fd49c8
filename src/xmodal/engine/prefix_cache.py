"""Cache the frozen prefix of each tower during training: the leading blocks no method touches.

Methods that adapt only the top of a tower (projection, partial, MSTA) spend most of a CPU step
recomputing blocks whose output for a given frame or caption never changes: nothing below their
lowest trainable site has a gradient or a hook. `FrozenPrefixCache` stores, per sample, the output
of those leading blocks, keyed by the exact bytes of the sample's input to the tower's transformer
(plus its shape, dtype, the autocast state and the attention mask). It is exact by construction: a
different input - another frame, another caption, a changed prompt - is a miss and is computed.
Misses are computed as a batch of their own, which can differ from the uncached batch in the last
bits of a float (a matrix product over fewer rows may round differently), so a run with the cache
is recorded as such (`train.cache_frozen_prefix` in the run's config).

Never used where it could be wrong or slow: not for an input that needs a gradient (prompt tokens
entering the tower), not for a tower whose transformer carries hooks of its own, not in eval mode
(evaluation encodes each item once; training-time passes without gradients, such as MSTA's frozen
encoding of the descriptions, are cached), and only on CPU (keying reads the activations on the
host, a synchronisation per step on a GPU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from xmodal.backbones.dual_encoder import MODALITIES, DualEncoder
from xmodal.engine.optim import has_trainable_site

#: cached activations kept at most (bytes, all towers together); the least recently used go first
DEFAULT_MAX_BYTES = 4 * 1024 ** 3


def frozen_prefix_depth(blocks) -> int:
    """How many leading blocks carry no trainable site (parameter, hook or parametrization)."""
    depth = 0
    for block in blocks:
        if has_trainable_site(block):
            break
        depth += 1
    return depth


@dataclass
class PrefixCacheStats:
    depth: Dict[str, int] = field(default_factory=dict)   # modality -> cached leading blocks
    hits: int = 0
    misses: int = 0
    bypassed: int = 0                                      # calls run uncached (grad input, no grad, ...)
    evicted: int = 0
    bytes: int = 0

    def as_dict(self) -> Dict[str, object]:
        return {"depth": dict(self.depth), "hits": self.hits, "misses": self.misses, "bypassed": self.bypassed,
                "evicted": self.evicted, "bytes": self.bytes}


class FrozenPrefixCache:
    """Installed on a backbone's towers by wrapping their transformer's `forward` on the instance
    (the module tree and state_dict do not change); `close()` takes it off again."""

    def __init__(self, backbone: DualEncoder, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = int(max_bytes)
        self.stats = PrefixCacheStats()
        self._store: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self._undo: List[Callable[[], None]] = []
        for modality in MODALITIES:
            blocks = backbone.blocks(modality)
            transformer = _owner_of(backbone, blocks)
            depth = frozen_prefix_depth(blocks)
            if transformer is None or depth == 0 or "forward" in vars(transformer) or \
                    transformer._forward_hooks or transformer._forward_pre_hooks:
                self.stats.depth[modality] = 0
                continue
            self.stats.depth[modality] = depth
            self._install(modality, transformer, blocks, depth)

    @property
    def active(self) -> bool:
        return any(self.stats.depth.values())

    def close(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()
        self._store.clear()
        self.stats.bytes = 0

    # ------------------------------------------------------------------ internals
    def _install(self, modality: str, transformer: nn.Module, blocks: nn.ModuleList, depth: int) -> None:
        original = transformer.forward
        batch_first = bool(getattr(transformer, "batch_first", True))

        def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
            if (not transformer.training or x.requires_grad or x.device.type != "cpu" or x.dim() != 3
                    or getattr(transformer, "grad_checkpointing", False)):
                self.stats.bypassed += 1
                return original(x, attn_mask=attn_mask)
            return self._forward(modality, x, attn_mask, blocks, depth, batch_first)

        transformer.forward = forward

        def undo() -> None:
            if "forward" in vars(transformer):
                del transformer.forward

        self._undo.append(undo)

    def _key(self, modality: str, sample: torch.Tensor, context: bytes) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(modality.encode())
        h.update(context)
        h.update(sample.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.digest()

    def _forward(self, modality: str, x: torch.Tensor, attn_mask, blocks, depth: int, batch_first: bool):
        # x is (N, L, D) as open_clip's Transformer.forward takes it
        context = repr((tuple(x.shape[1:]), str(x.dtype), torch.is_autocast_enabled("cpu"),
                        str(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else "",
                        None if attn_mask is None else (tuple(attn_mask.shape), str(attn_mask.dtype)))).encode()
        if attn_mask is not None:
            context += hashlib.blake2b(attn_mask.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                                       digest_size=16).digest()
        detached = x.detach()
        keys = [self._key(modality, detached[i], context) for i in range(x.shape[0])]
        missing: Dict[bytes, int] = {}  # key -> first index: the same sample twice in a batch is computed once
        for i, k in enumerate(keys):
            if k not in self._store:
                missing.setdefault(k, i)
        fresh: Dict[bytes, torch.Tensor] = {}
        if missing:
            h = detached[list(missing.values())]
            h = h if batch_first else h.transpose(0, 1).contiguous()
            for block in list(blocks)[:depth]:
                h = block(h, attn_mask=attn_mask)
            h = h if batch_first else h.transpose(0, 1)
            fresh = {k: h[j].detach().clone() for j, k in enumerate(missing)}
        self.stats.misses += len(fresh)
        self.stats.hits += sum(1 for k in keys if k in self._store)
        rows = []
        for k in keys:
            if k in self._store:
                self._store.move_to_end(k)
                rows.append(self._store[k])
            else:
                rows.append(fresh[k])
        for k, v in fresh.items():
            self._put(k, v)
        y = torch.stack(rows)
        y = y if batch_first else y.transpose(0, 1).contiguous()
        for block in list(blocks)[depth:]:
            y = block(y, attn_mask=attn_mask)
        return y if batch_first else y.transpose(0, 1)

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        while self._store and self.stats.bytes + size > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.stats.bytes -= old.numel() * old.element_size()
            self.stats.evicted += 1
        self._store[key] = value
        self.stats.bytes += size


def _owner_of(backbone: DualEncoder, blocks: nn.ModuleList) -> Optional[nn.Module]:
    """The module whose `resblocks` is `blocks` (open_clip's Transformer)."""
    for module in backbone.modules():
        if getattr(module, "resblocks", None) is blocks:
            return module
    return None


__all__ = ["FrozenPrefixCache", "PrefixCacheStats", "frozen_prefix_depth", "DEFAULT_MAX_BYTES"]
