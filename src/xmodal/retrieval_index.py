"""An indexed gallery: encode visual items once, answer text queries later.

The gallery is encoded offline, independently of any query (the dual-encoder property the
Cross-Modal Adapter keeps: O(N) encodings, not O(N*Q)). Per-frame features are stored so a
text-conditioned pooling head can re-rank; a FAISS inner-product index over the L2-normalised
mean-pooled features finds the candidates.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import faiss
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xmodal.engine.heads import mean_pool
from xmodal.errors import XModalError

FEATURES = "frame_features.safetensors"
META = "gallery.json"
FAISS_FILE = "mean_pooled.faiss"


@dataclass
class Hit:
    rank: int
    id: str
    media: str
    score: float


def index_meta(cfg, adapter: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    """What `xmodal search` needs to rebuild the query side: model, adapter, pooling head, word budget."""
    return {
        "backbone": cfg.model.backbone, "pretrained": cfg.model.pretrained, "seed": cfg.train.seed,
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "head": {"pooling": cfg.head.pooling, "temperature": cfg.head.temperature, "normalize": cfg.head.normalize},
        "max_words": cfg.data.max_words, "dataset": cfg.data.dataset, "split": cfg.data.eval_split,
    }


class GalleryIndex:
    """Per-frame features (N, F, D) + frame mask + item ids, with a FAISS index on top."""

    def __init__(self, frame_features: torch.Tensor, frame_mask: torch.Tensor, ids: Sequence[str],
                 media: Sequence[str], meta: Optional[Dict] = None):
        if frame_features.dim() != 3 or frame_mask.shape != frame_features.shape[:2]:
            raise XModalError(
                f"gallery features must be (N, F, D) with a (N, F) mask, got {tuple(frame_features.shape)} "
                f"and {tuple(frame_mask.shape)}"
            )
        if len(ids) != frame_features.shape[0] or len(media) != len(ids):
            raise XModalError(f"gallery has {frame_features.shape[0]} feature rows but {len(ids)} ids / {len(media)} paths")
        self.frame_features = frame_features.float()
        self.frame_mask = frame_mask.bool()
        self.ids = list(ids)
        self.media = list(media)
        self.meta = dict(meta or {})
        pooled = mean_pool(self.frame_features, self.frame_mask).numpy().astype(np.float32)
        self.faiss = faiss.IndexFlatIP(pooled.shape[1])
        self.faiss.add(pooled)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, text_features: torch.Tensor, k: int = 5,
               rerank: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
               candidates: int = 50) -> List[List[Hit]]:
        """Top-k items per query. `rerank(text (Q,D), frames (C,F,D), mask (C,F)) -> (Q, C)` scores
        the FAISS candidates with a pooling head (e.g. text-conditioned pooling)."""
        text = torch.nn.functional.normalize(text_features.float(), dim=-1)
        k = min(k, len(self))
        n_cand = min(max(candidates, k), len(self)) if rerank is not None else k
        scores, idx = self.faiss.search(text.numpy().astype(np.float32), n_cand)
        results = []
        for q in range(text.shape[0]):
            cand = torch.as_tensor(idx[q], dtype=torch.long)
            s = torch.as_tensor(scores[q])
            if rerank is not None:
                s = rerank(text[q:q + 1], self.frame_features[cand], self.frame_mask[cand])[0]
            order = torch.argsort(s, descending=True)[:k]
            results.append([
                Hit(rank=r + 1, id=self.ids[int(cand[o])], media=self.media[int(cand[o])], score=float(s[o]))
                for r, o in enumerate(order.tolist())
            ])
        return results

    # ----------------------------------------------------------------- storage
    def save(self, directory) -> Path:
        """Write features (safetensors), metadata (JSON) and the FAISS index, atomically."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        save_file({"frame_features": self.frame_features.half().contiguous(),
                   "frame_mask": self.frame_mask.to(torch.uint8).contiguous()}, str(tmp / FEATURES))
        (tmp / META).write_text(json.dumps({**self.meta, "ids": self.ids, "media": self.media}, indent=1) + "\n")
        faiss.write_index(self.faiss, str(tmp / FAISS_FILE))
        if directory.exists():
            for f in (FEATURES, META, FAISS_FILE):
                os.replace(tmp / f, directory / f)
            tmp.rmdir()
        else:
            os.replace(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory) -> "GalleryIndex":
        directory = Path(directory)
        for f in (FEATURES, META):
            if not (directory / f).is_file():
                raise XModalError(f"{directory / f}: not found; build the index with `xmodal index`")
        try:
            meta = json.loads((directory / META).read_text())
        except json.JSONDecodeError as exc:
            raise XModalError(f"{directory / META}: invalid JSON ({exc})") from None
        for key in ("ids", "media"):
            if key not in meta:
                raise XModalError(f"{directory / META}: missing key {key!r}")
        tensors = load_file(str(directory / FEATURES))
        ids, media = meta.pop("ids"), meta.pop("media")
        return cls(tensors["frame_features"].float(), tensors["frame_mask"].bool(), ids, media, meta)
