"""Torch datasets over `Item`s and the `collate` that builds the batch dict of ARCHITECTURE.md.

- `TrainDataset`: one (caption, clip) pair per item per epoch. The caption is drawn from the
  item's captions by a generator seeded with (seed, epoch, index), so an epoch is the same
  whatever the worker count or the order of access, and a resumed run sees exactly the
  captions it would have seen (CLIP4Clip draws one caption per video and epoch likewise).
- `EvalDataset`: all captions flattened (`texts`, `text_to_visual`) plus `visuals`, a
  dataset of the gallery items, so texts and the gallery are encoded separately, once.
  Missing or unreadable items never enter a gallery: a missing media file is a
  `MissingMediaError` at construction unless `allow_missing=True` (then the set is the
  present subset, marked `partial`), and `drop_unreadable` gives the subset without the
  items that failed to decode (recorded in `unreadable_media`).

Unreadable media follow `xmodal.data.media.MediaPolicy`: by default the sample becomes None,
`collate` drops it and counts it in `batch["skipped"]` (each path is logged once with its
reason, the index is kept in `failures_by_index`); `strict=True` raises the `MediaError`.

Descriptions (MSTA) become `desc_tokens` (K, L) and `desc_kind` (K,) per sample, codes
0 spatial / 1 temporal / 2 generic; `descriptions_per_kind=N` shows at most N of each kind,
drawn per epoch like captions in training and the first N in the gallery (None: all).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from xmodal.data import media
from xmodal.data.items import DESC_KIND_CODE, DESC_KIND_PAD, DatasetSpec, Item, require_media, shown
from xmodal.errors import DataError, UnreadableMediaError

Tokenize = Callable[[List[str]], torch.Tensor]
LoadVisual = Callable[[Item, int], Tuple[torch.Tensor, torch.Tensor]]


class VisualLoader:
    """Item -> (pixels (F, 3, H, W), frame_mask (F,)) through `xmodal.data.media`.

    Videos go through `media.load_clip` (1 frame per `fps` second, uniform `num_frames`,
    padded with mask False, the item's [start, end) segment); images through
    `media.load_image` as a one-frame clip. A plain class so DataLoader workers can pickle it.
    """

    def __init__(self, transform: Optional[Callable] = None, fps: float = 1.0, cache=None):
        self.transform = transform
        self.fps = fps
        self.cache = cache

    def __call__(self, item: Item, num_frames: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if item.kind == "image":
            pixels = media.load_image(item.media, self.transform, cache=self.cache)
            return pixels.unsqueeze(0), torch.ones(1, dtype=torch.bool)
        return media.load_clip(item.media, num_frames=num_frames, fps=self.fps, transform=self.transform,
                               start=item.start, end=item.end, cache=self.cache)


def _check_items(items: Sequence[Item], need_captions: bool) -> List[Item]:
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise DataError(f"dataset item {i}: expected an xmodal.data.Item, got {type(item).__name__}")
        if need_captions and not item.captions:
            raise DataError(f"dataset item {i} ({item.id!r}): expected at least one caption, got none")
    return items


def _kinds(item: Item) -> List[str]:
    """The item's description kinds; "generic" for descriptions set without kinds."""
    if len(item.description_kinds) == len(item.descriptions):
        return item.description_kinds
    return ["generic"] * len(item.descriptions)


class _VisualItems(Dataset):
    """Shared loading of an item's frames (under the media policy) and descriptions."""

    def __init__(self, items: Sequence[Item], tokenize: Optional[Tokenize], load_visual: Optional[LoadVisual],
                 num_frames: int, strict: bool, max_descriptions: Optional[int],
                 descriptions_per_kind: Optional[int] = None):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if descriptions_per_kind is not None and (isinstance(descriptions_per_kind, bool) or
                                                  int(descriptions_per_kind) != descriptions_per_kind or
                                                  descriptions_per_kind < 1):
            raise ValueError(f"descriptions_per_kind must be an integer >= 1 or None, got {descriptions_per_kind!r}")
        self.tokenize = tokenize
        self.load_visual = load_visual if load_visual is not None else VisualLoader()
        self.num_frames = int(num_frames)
        self.max_descriptions = max_descriptions
        self.descriptions_per_kind = descriptions_per_kind
        self.policy = media.MediaPolicy(strict=strict)
        self._failed_index: Dict[int, str] = {}

    @property
    def skipped(self) -> int:
        """Samples skipped for unreadable media in this process (workers keep their own counts)."""
        return self.policy.skipped

    @property
    def failures(self) -> Dict[str, str]:
        """path -> reason of every unreadable media file seen in this process."""
        return self.policy.failures

    @property
    def failures_by_index(self) -> Dict[int, str]:
        """item index -> reason of every item whose media could not be read in this process.

        DataLoader workers keep their own copies: across workers, the items absent from the
        batches' `index` are the unreadable ones (`EvalDataset.unreadable_indices`).
        """
        return dict(self._failed_index)

    @property
    def failed_indices(self) -> List[int]:
        return sorted(self._failed_index)

    def _load(self, index: int, item: Item) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        visual = self._visual(item)
        if visual is None:
            self._failed_index[int(index)] = self.policy.failures.get(item.media, "unreadable")
        return visual

    def _visual(self, item: Item) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        out = self.policy.call(self.load_visual, item, self.num_frames)
        if out is None:
            return None
        pixels, mask = out
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 4:
            raise ValueError(f"load_visual({item.id!r}) must return (F, 3, H, W) pixels, got {tuple(pixels.shape)}")
        mask = torch.ones(pixels.shape[0], dtype=torch.bool) if mask is None else mask.to(torch.bool)
        if mask.shape != (pixels.shape[0],):
            raise ValueError(f"load_visual({item.id!r}) returned a mask of shape {tuple(mask.shape)} for {pixels.shape[0]} frames")
        return pixels, mask

    def _tokens(self, texts: List[str]) -> torch.Tensor:
        if self.tokenize is None:
            raise ValueError("this dataset was built without a tokenize function")
        tokens = torch.as_tensor(self.tokenize(texts))
        if tokens.dim() != 2 or tokens.shape[0] != len(texts):
            raise ValueError(f"tokenize must return (N, L) tokens for N={len(texts)} texts, got {tuple(tokens.shape)}")
        return tokens.long()

    def _description_rng(self, index: int, code: int) -> Optional[np.random.Generator]:
        """Generator for drawing descriptions of item `index`, kind `code`; None: take the first ones."""
        return None

    def _pick_descriptions(self, index: int, item: Item) -> List[int]:
        """Indices into `item.descriptions` this sample shows: up to `descriptions_per_kind` per kind
        (in file order), then at most `max_descriptions` in all."""
        picked = list(range(len(item.descriptions)))
        per_kind = self.descriptions_per_kind
        if per_kind is not None:
            picked = []
            kinds = _kinds(item)
            for kind, code in DESC_KIND_CODE.items():
                of_kind = [i for i, k in enumerate(kinds) if k == kind]
                if len(of_kind) > per_kind:
                    rng = self._description_rng(index, code)
                    if rng is None:
                        of_kind = of_kind[:per_kind]
                    else:
                        of_kind = sorted(of_kind[j] for j in rng.choice(len(of_kind), per_kind, replace=False))
                picked += of_kind
            picked.sort()
        return picked[: self.max_descriptions] if self.max_descriptions else picked

    def _add_descriptions(self, sample: Dict[str, Any], index: int, item: Item) -> None:
        if item.descriptions and self.tokenize is not None:
            picked = self._pick_descriptions(index, item)
            if not picked:
                return
            sample["desc_tokens"] = self._tokens([item.descriptions[i] for i in picked])
            kinds = _kinds(item)
            sample["desc_kind"] = torch.tensor([DESC_KIND_CODE[kinds[i]] for i in picked], dtype=torch.long)


class TrainDataset(_VisualItems):
    """(caption, clip) pairs for contrastive training.

    By default one sample per item per epoch with a caption drawn from the item's captions
    (deterministic in seed, epoch and index; call `set_epoch` before each epoch).
    `unfold_captions=True` instead yields every (item, caption) pair once per epoch.
    DataLoader workers copy the dataset when an iterator starts, so with
    `persistent_workers=True` the epoch set later does not reach them.
    """

    def __init__(self, items: Sequence[Item], tokenize: Tokenize, load_visual: Optional[LoadVisual] = None,
                 num_frames: int = 12, *, seed: int = 0, strict: bool = False, unfold_captions: bool = False,
                 max_descriptions: Optional[int] = None, descriptions_per_kind: Optional[int] = None):
        super().__init__(items, tokenize, load_visual, num_frames, strict, max_descriptions, descriptions_per_kind)
        self.items = _check_items(items, need_captions=True)
        self.seed = int(seed)
        self.epoch = 0
        self.unfold_captions = unfold_captions
        self._pairs = [(i, j) for i, it in enumerate(self.items) for j in range(len(it.captions))] if unfold_captions else None

    @classmethod
    def from_spec(cls, spec: DatasetSpec, tokenize: Tokenize, load_visual: Optional[LoadVisual] = None,
                  num_frames: Optional[int] = None, **kwargs) -> "TrainDataset":
        """A training set over a read split, with the protocol's frame budget and the spec's
        `descriptions_per_kind` unless given."""
        kwargs.setdefault("descriptions_per_kind", spec.descriptions_per_kind)
        return cls(spec.items, tokenize, load_visual, num_frames or spec.max_frames, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._pairs) if self._pairs is not None else len(self.items)

    def caption_index(self, index: int, epoch: Optional[int] = None) -> int:
        """Which caption item `index` shows in `epoch` (default: the current epoch)."""
        n = len(self.items[index].captions)
        if n == 1:
            return 0
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, int(index)])
        return int(rng.integers(n))

    def _description_rng(self, index: int, code: int) -> np.random.Generator:
        """Seeded by (seed, epoch, index, kind): a new draw each epoch, the same on resume."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF, int(index), 1 + code])

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        if self._pairs is not None:
            i, j = self._pairs[index]
        else:
            i = int(index)
            j = self.caption_index(i)
        item = self.items[i]
        visual = self._load(i, item)
        if visual is None:
            return None
        caption = item.captions[j]
        sample = {"index": i, "caption": caption, "tokens": self._tokens([caption])[0],
                  "pixels": visual[0], "frame_mask": visual[1]}
        self._add_descriptions(sample, i, item)
        return sample


class VisualDataset(_VisualItems):
    """The gallery: one sample per item with its frames (and description tokens)."""

    def __init__(self, items: Sequence[Item], load_visual: Optional[LoadVisual] = None, num_frames: int = 12, *,
                 tokenize: Optional[Tokenize] = None, strict: bool = False, max_descriptions: Optional[int] = None,
                 descriptions_per_kind: Optional[int] = None):
        super().__init__(items, tokenize, load_visual, num_frames, strict, max_descriptions, descriptions_per_kind)
        self.items = _check_items(items, need_captions=False)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        item = self.items[index]
        visual = self._load(index, item)
        if visual is None:
            return None
        sample = {"index": int(index), "pixels": visual[0], "frame_mask": visual[1]}
        self._add_descriptions(sample, int(index), item)
        return sample


class TextDataset(Dataset):
    """The queries: one sample per caption with its tokens and the index of its item."""

    def __init__(self, texts: Sequence[str], tokenize: Tokenize, text_to_visual: Optional[torch.Tensor] = None):
        self.texts = list(texts)
        self.tokenize = tokenize
        self.text_to_visual = text_to_visual

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        tokens = torch.as_tensor(self.tokenize([self.texts[index]])).long()
        sample = {"index": int(index), "caption": self.texts[index], "tokens": tokens[0]}
        if self.text_to_visual is not None:
            sample["visual_index"] = int(self.text_to_visual[index])
        return sample


class EvalDataset:
    """A retrieval test set: `texts` (all captions, item by item), `text_to_visual` (T,),
    `visual_to_texts` (each item's caption indices), `visuals` (gallery dataset) and
    `text_dataset` (query dataset, when a tokenize function is given).

    Items whose media file is missing raise `MissingMediaError` (count, `where`, first
    paths); with `allow_missing=True` they and their captions are left out and listed in
    `missing_media`. `num_items_requested` is the count before dropping, `partial` whether
    anything was dropped, `kept_indices` / `kept_text_indices` map this set's items / texts
    to the ones it was built from. `where` names the split in messages ("msrvtt test
    (root ...)"; `from_spec` fills it in).
    """

    def __init__(self, items: Sequence[Item], tokenize: Optional[Tokenize] = None,
                 load_visual: Optional[LoadVisual] = None, num_frames: int = 12, *, strict: bool = False,
                 max_captions: Optional[int] = None, max_descriptions: Optional[int] = None,
                 descriptions_per_kind: Optional[int] = None, allow_missing: bool = False,
                 where: str = "evaluation set"):
        items = _check_items(items, need_captions=True)
        self.where = where
        self.allow_missing = allow_missing
        self._options = dict(tokenize=tokenize, load_visual=load_visual, num_frames=num_frames, strict=strict,
                             max_captions=max_captions, max_descriptions=max_descriptions,
                             descriptions_per_kind=descriptions_per_kind)
        self.num_items_requested = len(items)
        self.num_texts_requested = sum(len(self._captions(item)) for item in items)
        present, self.missing_media = require_media(items, where, allow_missing)
        self.unreadable_media: List[str] = []
        absent = set(self.missing_media)
        self._build(present, [i for i, item in enumerate(items) if item.media not in absent],
                    [self._captions(item) for item in items])

    def _captions(self, item: Item) -> List[str]:
        cap = self._options["max_captions"]
        return item.captions[:cap] if cap else item.captions

    def _build(self, items: List[Item], kept: List[int], parent_captions: List[List[str]]) -> None:
        o = self._options
        self.items = items
        self.kept_indices = list(kept)
        starts, total = [], 0
        for caps in parent_captions:
            starts.append(total)
            total += len(caps)
        self.kept_text_indices = [starts[i] + k for i in kept for k in range(len(parent_captions[i]))]
        self.texts: List[str] = []
        owners: List[int] = []
        self.visual_to_texts: List[List[int]] = []
        for i, item in enumerate(self.items):
            captions = self._captions(item)
            self.visual_to_texts.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.texts.extend(captions)
            owners.extend([i] * len(captions))
        self.text_to_visual = torch.tensor(owners, dtype=torch.long)
        self.visuals = VisualDataset(self.items, o["load_visual"], o["num_frames"], tokenize=o["tokenize"],
                                     strict=o["strict"], max_descriptions=o["max_descriptions"],
                                     descriptions_per_kind=o["descriptions_per_kind"])
        tokenize = o["tokenize"]
        self.text_dataset = TextDataset(self.texts, tokenize, self.text_to_visual) if tokenize is not None else None

    @classmethod
    def from_spec(cls, spec: DatasetSpec, tokenize: Optional[Tokenize] = None, load_visual: Optional[LoadVisual] = None,
                  num_frames: Optional[int] = None, **kwargs) -> "EvalDataset":
        """A test set over a read split, with the protocol's frame budget unless given.

        Items `read_dataset(drop_missing=True)` removed count as missing here too (they are
        appended after the spec's items, so `kept_indices` still index `spec.items`).
        """
        kwargs.setdefault("where", spec.where)
        kwargs.setdefault("descriptions_per_kind", spec.descriptions_per_kind)
        return cls(list(spec.items) + list(spec.dropped), tokenize, load_visual, num_frames or spec.max_frames,
                   **kwargs)

    @property
    def partial(self) -> bool:
        """True when items of the requested split were left out (missing or unreadable media)."""
        return bool(self.missing_media or self.unreadable_media)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    @property
    def num_visuals(self) -> int:
        return len(self.items)

    @property
    def skipped(self) -> int:
        return self.visuals.skipped

    def unreadable_indices(self, encoded_index) -> List[int]:
        """Gallery indices absent from `encoded_index` (the `index` of every batch that was
        encoded): the items whose media could not be decoded, whatever the worker count."""
        seen = {int(i) for i in torch.as_tensor(encoded_index).reshape(-1).tolist()}
        return [i for i in range(len(self.items)) if i not in seen]

    def drop_unreadable(self, failed_indices: Sequence[int], allow: bool = True) -> "EvalDataset":
        """This set without the gallery items `failed_indices` (media that failed to decode)
        and their captions; the paths are added to `unreadable_media`.

        Returns `self` when nothing failed. `kept_indices` / `kept_text_indices` of the
        result index into this set, so already-encoded features can be subset rather than
        re-encoded. `allow=False` raises `UnreadableMediaError` instead (count, first paths
        and reasons); a set left with no items is a DataError either way.
        """
        failed = sorted({int(i) for i in failed_indices})
        if not failed:
            return self
        bad = [i for i in failed if not 0 <= i < len(self.items)]
        if bad:
            raise IndexError(f"drop_unreadable: indices {bad[:3]} out of range for {len(self.items)} items")
        reasons = self.visuals.failures
        paths = [self.items[i].media for i in failed]
        listed = shown([f"{p} ({reasons[p]})" if p in reasons else p for p in paths])
        if len(failed) == len(self.items):
            raise DataError(f"{self.where}: none of the {len(self.items)} media files could be decoded "
                            f"(first: {listed})")
        if not allow:
            raise UnreadableMediaError(f"{self.where}: {len(failed)} of {len(self.items)} media files could not be "
                                       f"decoded (first: {listed}); --allow-missing proceeds on the readable subset "
                                       f"and marks the result partial")
        drop = set(failed)
        subset = object.__new__(EvalDataset)
        subset.__dict__.update({k: v for k, v in self.__dict__.items()
                                if k in ("where", "allow_missing", "_options", "num_items_requested",
                                         "num_texts_requested", "missing_media")})
        subset.unreadable_media = list(self.unreadable_media) + paths
        kept = [i for i in range(len(self.items)) if i not in drop]
        subset._build([self.items[i] for i in kept], kept, [self._captions(item) for item in self.items])
        return subset

    def coverage(self) -> Dict[str, Any]:
        """What of the requested split this set evaluates, for printing and for metrics files."""
        return {"partial": self.partial, "items_requested": self.num_items_requested, "items": len(self.items),
                "texts_requested": self.num_texts_requested, "texts": len(self.texts),
                "missing_media": len(self.missing_media), "unreadable_media": len(self.unreadable_media),
                "first_missing": self.missing_media[:3], "first_unreadable": self.unreadable_media[:3]}


def _pad_frames(pixels: List[torch.Tensor], masks: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    frames = max(p.shape[0] for p in pixels)
    shape = pixels[0].shape[1:]
    if any(p.shape[1:] != shape for p in pixels):
        raise ValueError(f"cannot batch frames of different sizes: {sorted({tuple(p.shape[1:]) for p in pixels})}")
    out = pixels[0].new_zeros((len(pixels), frames) + tuple(shape))
    mask = torch.zeros(len(pixels), frames, dtype=torch.bool)
    for b, (p, m) in enumerate(zip(pixels, masks)):
        out[b, : p.shape[0]] = p
        mask[b, : m.shape[0]] = m
    return out, mask


def collate(samples: Sequence[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Batch dict: `index` (B,), `tokens` (B, L), `captions`, `pixels` (B, F, 3, H, W),
    `frame_mask` (B, F), `desc_tokens` (B, K, L) + `desc_mask` (B, K) + `desc_kind` (B, K)
    (0 spatial, 1 temporal, 2 generic, -1 padding) when any sample has descriptions, and
    `skipped` (samples dropped for unreadable media).

    None samples are dropped; a batch where all were dropped is None (skip it).
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    batch: Dict[str, Any] = {
        "index": torch.tensor([int(s["index"]) for s in kept], dtype=torch.long),
        "skipped": len(samples) - len(kept),
    }
    if "tokens" in kept[0]:
        batch["tokens"] = torch.stack([s["tokens"] for s in kept])
    if "caption" in kept[0]:
        batch["captions"] = [s["caption"] for s in kept]
    if "visual_index" in kept[0]:
        batch["visual_index"] = torch.tensor([s["visual_index"] for s in kept], dtype=torch.long)
    if "pixels" in kept[0]:
        batch["pixels"], batch["frame_mask"] = _pad_frames([s["pixels"] for s in kept], [s["frame_mask"] for s in kept])
    with_desc = [s.get("desc_tokens") for s in kept]
    present = [d for d in with_desc if d is not None]
    if present:
        k = max(d.shape[0] for d in present)
        length = present[0].shape[1]
        desc = torch.zeros(len(kept), k, length, dtype=present[0].dtype)
        desc_mask = torch.zeros(len(kept), k, dtype=torch.bool)
        desc_kind = torch.full((len(kept), k), DESC_KIND_PAD, dtype=torch.long)
        for b, (s, d) in enumerate(zip(kept, with_desc)):
            if d is not None:
                desc[b, : d.shape[0]] = d
                desc_mask[b, : d.shape[0]] = True
                kinds = s.get("desc_kind")
                desc_kind[b, : d.shape[0]] = kinds if kinds is not None else DESC_KIND_CODE["generic"]
        batch["desc_tokens"], batch["desc_mask"], batch["desc_kind"] = desc, desc_mask, desc_kind
    return batch
