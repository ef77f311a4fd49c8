"""Each benchmark's published evaluation protocol, so a run that names only the dataset
uses the settings the reported numbers were measured with (not generic 12 frames / 32 words).

Split names are the ones the reader takes. The shipped configs/*.yaml use the same values
(tests/test_readers.py checks both against this table).
"""

from __future__ import annotations

from typing import Any, Dict

_CLIP4CLIP = "CLIP4Clip (Luo et al., 2022) / Cross-Modal Adapter (Jiang et al., 2022) settings"

PROTOCOLS: Dict[str, Dict[str, Any]] = {
    "msrvtt": dict(num_frames=12, max_words=32, test_split="test", train_split="train_9k", paragraph=False,
                   kind="video", captions_per_item=1,
                   source=f"{_CLIP4CLIP}: 12 frames, 32 words; test = the 1k-A (JSFusion) split, train = 9k"),
    "msvd": dict(num_frames=12, max_words=32, test_split="test", train_split="train", paragraph=False,
                 kind="video", captions_per_item=None,
                 source=f"{_CLIP4CLIP}: 12 frames, 32 words; 670 test videos, every caption a query"),
    "didemo": dict(num_frames=64, max_words=64, test_split="test", train_split="train", paragraph=True,
                   kind="video", captions_per_item=1,
                   source=f"{_CLIP4CLIP}: paragraph-to-video retrieval, 64 frames, 64 words"),
    "activitynet": dict(num_frames=64, max_words=64, test_split="val_1", train_split="train", paragraph=True,
                        kind="video", captions_per_item=1,
                        source=f"{_CLIP4CLIP}: paragraph-to-video retrieval on val_1, 64 frames, 64 words"),
    "lsmdc": dict(num_frames=12, max_words=32, test_split="test", train_split="train", paragraph=False,
                  kind="video", captions_per_item=1,
                  source=f"{_CLIP4CLIP}: 12 frames, 32 words; the 1000-clip LSMDC 2016 test set"),
    "coco": dict(num_frames=1, max_words=32, test_split="test", train_split="train", paragraph=False,
                 kind="image", captions_per_item=5,
                 source="Karpathy & Fei-Fei (2015) 5k test split, 5 captions per image; "
                        "32 words as in the shipped configs"),
    "flickr30k": dict(num_frames=1, max_words=32, test_split="test", train_split="train", paragraph=False,
                      kind="image", captions_per_item=5,
                      source="Karpathy & Fei-Fei (2015) 1k test split, 5 captions per image; "
                             "32 words as in the shipped configs"),
    "jsonl": dict(num_frames=12, max_words=32, test_split="test", train_split="train", paragraph=False,
                  kind="video", captions_per_item=None,
                  source="own data: no published protocol; xmodal's clip-level defaults (images use 1 frame)"),
}
