"""Data: annotation readers -> `Item`s, media decoding, torch datasets and collate.

The torch-dependent names (`TrainDataset`, `EvalDataset`, `collate`, ...) are imported on
first use so that reading annotations (e.g. `xmodal data inspect`) stays light.
"""

from __future__ import annotations

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers import READERS, read_dataset

_LAZY = {
    "TrainDataset": "xmodal.data.dataset",
    "EvalDataset": "xmodal.data.dataset",
    "VisualDataset": "xmodal.data.dataset",
    "TextDataset": "xmodal.data.dataset",
    "VisualLoader": "xmodal.data.dataset",
    "collate": "xmodal.data.dataset",
}

__all__ = ["Item", "DatasetSpec", "READERS", "read_dataset", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmodal.data' has no attribute {name!r}")
