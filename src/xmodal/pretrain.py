"""Contrastive pretraining of a small OpenCLIP model from random init on the generated corpus.

No real CLIP weights can be had on these machines, so the project trains its own: symmetric
InfoNCE with a learnable logit scale, AdamW, linear warm-up then cosine decay. The corpus
is loaded once into memory as uint8 (tens of thousands of 64 px images fit in a few hundred
MB); every step's batch, caption choice and augmentation come from an RNG keyed by
(seed, step), so a resumed run reproduces an uninterrupted one exactly. The result is an
fp16 OpenCLIP state dict (`model.safetensors`) with a model card and its held-out
zero-shot retrieval scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.atomic import atomic_write_bytes
from xmodal.errors import CheckpointMismatchError, DataError, XModalError
from xmodal.safetensors_file import write_safetensors

LOGIT_SCALE_MAX = math.log(100.0)
#: config fields that must match for --resume (they change what the run computes)
_RESUME_FIELDS = ("arch", "steps", "batch", "lr", "weight_decay", "warmup", "seed", "augment", "min_lr")


@dataclass
class PretrainConfig:
    data: str
    out: str
    arch: str = "xmodal-tiny"
    steps: int = 1000
    batch: int = 128
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    amp: bool = False              # bf16 autocast (CUDA only)
    augment: bool = True
    log_every: int = 10
    save_every: int = 200
    eval_every: int = 0            # 0: evaluate only at the end
    eval_max: Optional[int] = None  # cap on held-out items (None: all of test.jsonl)
    resume: bool = False
    stop_after: Optional[int] = None  # stop (with a checkpoint) once this step is reached

    def check(self) -> None:
        for name in ("steps", "batch", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise XModalError(f"--{name.replace('_', '-')}={getattr(self, name)}: expected a positive integer")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise XModalError(f"--lr={self.lr}, --min-lr={self.min_lr}: expected 0 <= min-lr <= lr and lr > 0")
        if self.warmup < 0 or self.eval_every < 0:
            raise XModalError("--warmup and --eval-every must be >= 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise XModalError(f"--device={self.device}: CUDA is not available on this machine; use --device cpu")


# ------------------------------------------------------------------------------- data
@dataclass
class Corpus:
    """Images (N, 3, S, S) uint8 and their captions (one list per image)."""

    images: torch.Tensor
    captions: List[List[str]]
    ids: List[str]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def load_corpus(folder: str | os.PathLike, split: str, image_size: int, limit: Optional[int] = None) -> Corpus:
    """Read `{split}.jsonl` of a plain-JSONL image set and decode every image into memory."""
    from PIL import Image

    from xmodal.synth.world import read_jsonl

    folder = Path(folder)
    path = folder / f"{split}.jsonl"
    rows = read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{path}: no items (expected one JSON object per line with 'image' and 'captions')")
    images = np.empty((len(rows), image_size, image_size, 3), np.uint8)
    captions, ids = [], []
    for i, row in enumerate(rows):
        where = f"{path}:{i + 1}"
        if "image" not in row:
            raise DataError(f"{where}: missing field 'image' (pretraining needs an image-caption corpus)")
        caps = row.get("captions")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c for c in caps):
            raise DataError(f"{where}: 'captions' must be a non-empty list of strings")
        media = folder / row["image"]
        try:
            with Image.open(media) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BICUBIC)
                images[i] = np.asarray(im)
        except FileNotFoundError:
            raise DataError(f"{where}: image file {media} not found") from None
        except OSError as exc:
            raise DataError(f"{where}: cannot decode image {media} ({exc})") from None
        captions.append(caps)
        ids.append(str(row.get("id", i)))
    return Corpus(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions, ids, str(path))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding columns at the end (the text tower is causal, so results do not change)."""
    used = int((tokens != 0).any(dim=0).nonzero().max()) + 1 if tokens.numel() else 1
    return tokens[:, :used]


def encode_text_trimmed(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text` on a sequence shorter than the context length.

    The causal mask means positions before the end-of-text token never see the padding
    after it, so cutting the padding gives the same features at a fraction of the cost.
    """
    n = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n].to(cast)
    mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
    x = clip.ln_final(clip.transformer(x, attn_mask=mask))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def normalisation(clip: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The image mean/std the architecture expects (CLIP's unless its config says otherwise)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def augment(images: torch.Tensor, rng: np.random.Generator, max_shift: int = 2) -> torch.Tensor:
    """Light augmentation for uint8 (B, 3, S, S): small shifts (edge-replicated) and brightness.

    No flips or crops that would move an object to another named position: captions say
    "on the left", so geometry must stay honest.
    """
    b, _, s, _ = images.shape
    x = images.float()
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        shifts = rng.integers(0, 2 * max_shift + 1, size=(b, 2))
        x = torch.stack([padded[i, :, dy:dy + s, dx:dx + s] for i, (dx, dy) in enumerate(shifts.tolist())])
    gain = torch.from_numpy(rng.uniform(0.85, 1.15, size=(b, 1, 1, 1)).astype(np.float32))
    return (x * gain).clamp_(0, 255)


def to_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or 0..255 float (B, 3, S, S) -> CLIP-normalised float."""
    return (images.float() / 255.0 - mean) / std


# ---------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(clip: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on matrices only (not on gains, biases, norms, the logit scale)."""
    decay, no_decay = [], []
    for name, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the batch; also returns the in-batch image->text accuracy."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    acc = (logits.argmax(dim=1) == labels).float().mean()
    return loss, acc


# --------------------------------------------------------------------------- retrieval
def retrieval_metrics(sim: torch.Tensor, text_to_visual: torch.Tensor) -> Dict[str, float]:
    """R@1/5/10 (%), MdR, MnR both ways under the project-wide tie policy (`xmodal.metrics`).

    The "mean" policy (expected rank under random tie-breaking) is the one eval and train
    use too: a collapsed model (all features equal) scores chance, never R@1 = 100.
    """
    from xmodal import metrics

    return metrics.retrieval_metrics(sim.float(), text_to_visual.long(), ties=metrics.DEFAULT_TIES)


@torch.no_grad()
def zero_shot(clip: torch.nn.Module, tokenize: Callable, corpus: Corpus, device: str = "cpu",
              batch: int = 256, limit: Optional[int] = None) -> Dict[str, float]:
    """Text->image and image->text retrieval over (the first `limit` items of) a held-out corpus."""
    n = len(corpus) if limit is None else min(limit, len(corpus))
    mean, std = normalisation(clip)
    was_training = clip.training
    clip.eval()
    img_feats, txt_feats, t2v = [], [], []
    for i in range(0, n, batch):
        pixels = to_pixels(corpus.images[i:i + batch], mean, std).to(device)
        img_feats.append(F.normalize(clip.encode_image(pixels).float(), dim=-1).cpu())
    texts = [c for i in range(n) for c in corpus.captions[i]]
    t2v = torch.tensor([i for i in range(n) for _ in corpus.captions[i]])
    for i in range(0, len(texts), batch):
        tokens = trim_tokens(tokenize(texts[i:i + batch])).to(device)
        txt_feats.append(F.normalize(encode_text_trimmed(clip, tokens).float(), dim=-1).cpu())
    clip.train(was_training)
    sim = torch.cat(txt_feats) @ torch.cat(img_feats).t()
    metrics = retrieval_metrics(sim, t2v)
    metrics["items"] = n
    metrics["texts"] = len(texts)
    metrics["chance/R@1"] = 100.0 / n
    return metrics


# ------------------------------------------------------------------------------ files
def _atomic_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def export_state(clip: torch.nn.Module, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """The OpenCLIP state dict (its own key names) cast to `dtype` for release."""
    return {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
            for k, v in clip.state_dict().items()}


# ------------------------------------------------------------------------- checkpoint
CKPT_DIR = "checkpoint"
CKPT_POINTER = "latest.json"


def save_checkpoint(out: Path, step: int, clip, optimizer, state: Dict) -> Path:
    """Model + AdamW moments in one safetensors file, then an atomically swapped pointer JSON.

    The pointer is written last, so a crash at any moment leaves the previous checkpoint
    valid; older state files are deleted only after the pointer names the new one.
    """
    folder = out / CKPT_DIR
    tensors = {f"model.{k}": v for k, v in clip.state_dict().items()}
    names = {id(p): n for n, p in clip.named_parameters()}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{names[id(p)]}.{key}"] = value
    fname = f"state-{step:07d}.safetensors"
    write_safetensors(folder / fname, tensors, {"step": str(step)})
    _atomic_json(folder / CKPT_POINTER, {**state, "step": step, "file": fname})
    for old in folder.glob("state-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)
    return folder / fname


def load_checkpoint(out: Path, clip, optimizer) -> Dict:
    """Restore model and optimiser from `out/checkpoint`; returns the pointer's state dict."""
    from safetensors.torch import load_file

    pointer = out / CKPT_DIR / CKPT_POINTER
    if not pointer.is_file():
        raise CheckpointMismatchError(f"--resume: no checkpoint at {pointer} (start without --resume)")
    state = json.loads(pointer.read_text())
    path = out / CKPT_DIR / state["file"]
    tensors = load_file(str(path))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = clip.state_dict()
    bad = sorted(set(expected) ^ set(model_state))
    bad += [k for k in expected if k in model_state and model_state[k].shape != expected[k].shape]
    if bad:
        raise CheckpointMismatchError(f"{path}: model tensors do not match architecture {state['config']['arch']!r}: "
                                      f"{bad[:5]}")
    clip.load_state_dict(model_state, strict=True)
    device = next(clip.parameters()).device
    for name, p in clip.named_parameters():
        moments = {k.rsplit(".", 1)[1]: v.to(device) for k, v in tensors.items()
                   if k.startswith(f"optim.{name}.") and k.count(".") == name.count(".") + 2}
        if moments:
            if "step" in moments:
                moments["step"] = moments["step"].cpu()
            optimizer.state[p] = moments
    return state


# ------------------------------------------------------------------------------- loop
@dataclass
class _Log:
    path: Path
    echo: Callable[[str], None]
    rows: List[Dict] = field(default_factory=list)

    def add(self, row: Dict, line: str) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.echo(line)


def _batch_indices(step: int, n: int, batch: int, seed: int, cache: Dict[int, np.ndarray]) -> np.ndarray:
    """Indices of step `step`: epoch-wise permutations keyed by (seed, epoch), last partial batch dropped."""
    per_epoch = n // batch
    epoch, j = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = np.random.default_rng([seed, 11, epoch]).permutation(n)
    return cache[epoch][j * batch:(j + 1) * batch]


def pretrain(cfg: PretrainConfig, command: Optional[str] = None,
             echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> Dict:
    """Train (or resume) and, once `cfg.steps` is reached, evaluate and write the release files.

    Returns the summary (also written to `out/pretrain_summary.json`); stops early with a
    checkpoint when `cfg.stop_after` is reached (summary has `"finished": False`).
    """
    from xmodal.backbones.factory import create_backbone

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, out = Path(cfg.data), Path(cfg.out)
    train_file = data / "train.jsonl"
    if not train_file.is_file():
        raise DataError(f"--data {data}: {train_file.name} not found (generate one with `xmodal synth images`)")
    out.mkdir(parents=True, exist_ok=True)
    pointer = out / CKPT_DIR / CKPT_POINTER
    if pointer.is_file() and not cfg.resume:
        raise XModalError(f"--out {out}: a checkpoint exists ({pointer}); pass --resume to continue it or "
                          f"choose an empty folder")

    backbone = create_backbone(cfg.arch, seed=cfg.seed)
    clip = backbone.clip.to(cfg.device)
    clip.requires_grad_(True)
    clip.train()
    size = backbone.image_size
    t_load = time.time()
    train = load_corpus(data, "train", size)
    if len(train) < cfg.batch:
        raise XModalError(f"--batch {cfg.batch}: larger than the corpus ({len(train)} images in {train_file})")
    held_out = load_corpus(data, "test", size) if (data / "test.jsonl").is_file() else None
    flat_caps = [c for caps in train.captions for c in caps]
    tokens_all = trim_tokens(torch.cat([backbone.tokenize(flat_caps[i:i + 4096])
                                        for i in range(0, len(flat_caps), 4096)]))
    offsets = np.cumsum([0] + [len(c) for c in train.captions])
    echo(f"loaded {len(train)} training images, {len(flat_caps)} captions (max {tokens_all.shape[1]} tokens), "
         f"{len(held_out) if held_out else 0} held-out images in {time.time() - t_load:.1f} s")

    optimizer = torch.optim.AdamW(param_groups(clip, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    fingerprint = file_sha256(train_file)
    run_state = {"config": asdict(cfg), "data_sha256": fingerprint, "train_seconds": 0.0, "sessions": []}
    start = 0
    log_path = out / "train_log.jsonl"
    if cfg.resume and pointer.is_file():
        saved = load_checkpoint(out, clip, optimizer)
        diffs = [f"{k}: checkpoint {saved['config'][k]!r} vs now {getattr(cfg, k)!r}" for k in _RESUME_FIELDS
                 if saved["config"].get(k) != getattr(cfg, k)]
        if saved.get("data_sha256") != fingerprint:
            diffs.append(f"data: {train_file} differs from the corpus the checkpoint was trained on")
        if diffs:
            raise CheckpointMismatchError(f"--resume {pointer}: run settings differ: " + "; ".join(diffs))
        start = int(saved["step"])
        run_state.update({k: saved[k] for k in ("train_seconds", "sessions") if k in saved})
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
            if log_path.is_file() else []
        atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= start).encode())
        echo(f"resumed from step {start} ({pointer})")
    elif log_path.exists():
        log_path.unlink()
    log = _Log(log_path, echo)
    run_state["sessions"].append({"start_step": start, "command": command, "device": cfg.device,
                                  "threads": torch.get_num_threads()})

    mean, std = normalisation(clip)
    mean, std = mean.to(cfg.device), std.to(cfg.device)
    perm_cache: Dict[int, np.ndarray] = {}
    stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    window: List[Tuple[float, float]] = []
    t_session = time.time()
    t_window = time.time()
    step = start
    for step in range(start, stop):
        rng = np.random.default_rng([cfg.seed, 13, step])
        idx = _batch_indices(step, len(train), cfg.batch, cfg.seed, perm_cache)
        images = train.images[torch.from_numpy(idx)]
        images = augment(images, rng) if cfg.augment else images.float()
        pick = offsets[idx] + rng.integers(0, np.diff(offsets)[idx])
        tokens = trim_tokens(tokens_all[torch.from_numpy(pick)]).to(cfg.device)
        pixels = ((images.to(cfg.device) / 255.0) - mean) / std
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and cfg.device.startswith("cuda")):
            loss, acc = contrastive_loss(clip.encode_image(pixels), encode_text_trimmed(clip, tokens),
                                         clip.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        if not math.isfinite(loss.item()):
            raise XModalError(f"loss became {loss.item()} at step {step + 1}; lower --lr (now {cfg.lr})")
        window.append((loss.item(), acc.item()))
        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            dt = (time.time() - t_window) / len(window)
            row = {"step": done, "loss": float(np.mean([w[0] for w in window])),
                   "batch_acc": float(np.mean([w[1] for w in window])), "lr": lr,
                   "logit_scale": float(clip.logit_scale.detach().exp()), "sec_per_step": dt}
            eta = dt * (cfg.steps - done)
            log.add(row, f"step {done}/{cfg.steps} loss {row['loss']:.4f} acc {row['batch_acc']:.3f} "
                         f"lr {lr:.2e} scale {row['logit_scale']:.1f} {dt:.2f} s/step eta {eta / 60:.1f} min")
            window, t_window = [], time.time()
        if cfg.eval_every and held_out is not None and done % cfg.eval_every == 0 and done < cfg.steps:
            m = zero_shot(clip, backbone.tokenize, held_out, cfg.device, limit=cfg.eval_max)
            log.add({"step": done, "eval": m}, f"step {done} held-out R@1 t2i {m['t2v/R@1']:.1f} "
                                               f"i2t {m['v2t/R@1']:.1f} (chance {m['chance/R@1']:.2f})")
            t_window = time.time()
        if done % cfg.save_every == 0 or done == stop:
            run_state["train_seconds"] += time.time() - t_session
            t_session = time.time()
            save_checkpoint(out, done, clip, optimizer, run_state)

    finished_step = max(stop, start)
    if finished_step < cfg.steps:
        echo(f"stopped at step {finished_step}/{cfg.steps}; continue with --resume")
        return {"finished": False, "step": finished_step}
    return _release(cfg, clip, backbone, held_out, train, run_state, log.rows, command, echo)


def _release(cfg: PretrainConfig, clip, backbone, held_out: Optional[Corpus], train: Corpus, run_state: Dict,
             history: List[Dict], command: Optional[str], echo) -> Dict:
    """Write model.safetensors (fp16), evaluate exactly those weights, write summary and card."""
    out = Path(cfg.out)
    state = export_state(clip, torch.float16)
    from xmodal.backbones.weights import ACTIVATION_META, uses_quick_gelu

    acts = set(uses_quick_gelu(clip).values())
    meta = {"format": "pt", "xmodal.architecture": cfg.arch, "arch": cfg.arch, "steps": str(cfg.steps),
            "seed": str(cfg.seed), "producer": "xmodal pretrain"}
    if len(acts) == 1:  # tells the loader which MLP activation the weights were trained with
        meta[ACTIVATION_META] = "quick_gelu" if acts.pop() else "gelu"
    write_safetensors(out / "model.safetensors", state, meta)
    # evaluate the released fp16 weights, not the fp32 training copy
    clip.load_state_dict({k: v.to(clip.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    metrics = zero_shot(clip, backbone.tokenize, held_out, cfg.device, limit=cfg.eval_max) if held_out else {}
    if metrics:
        echo(f"held-out zero-shot ({metrics['items']} images, {metrics['texts']} captions): "
             f"R@1 text->image {metrics['t2v/R@1']:.1f}%, image->text {metrics['v2t/R@1']:.1f}% "
             f"(chance {metrics['chance/R@1']:.2f}%)")
    log_file = out / "train_log.jsonl"  # the whole run, across resumed sessions
    if log_file.is_file():
        history = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    loss_rows = [r for r in history if "loss" in r]
    synth_info = {}
    if (Path(cfg.data) / "synth.json").is_file():
        synth_info = json.loads((Path(cfg.data) / "synth.json").read_text())
    summary = {
        "finished": True,
        "arch": cfg.arch,
        "parameters": int(sum(p.numel() for p in clip.parameters())),
        "model_file": "model.safetensors",
        "model_bytes": (out / "model.safetensors").stat().st_size,
        "config": asdict(cfg),
        "command": command,
        "data": {"folder": str(cfg.data), "train_items": len(train),
                 "train_captions": sum(len(c) for c in train.captions),
                 "held_out_items": len(held_out) if held_out else 0, "train_sha256": run_state["data_sha256"],
                 "synth": synth_info},
        "samples_seen": cfg.steps * cfg.batch,
        "epochs": cfg.steps * cfg.batch / len(train),
        "train_seconds": round(run_state["train_seconds"], 1),
        "sec_per_step": run_state["train_seconds"] / max(cfg.steps, 1),
        "sessions": run_state["sessions"],
        "device": cfg.device if not cfg.device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "first_loss": loss_rows[0]["loss"] if loss_rows else None,
        "final_loss": loss_rows[-1]["loss"] if loss_rows else None,
        "zero_shot": metrics,
        "history": history,
    }
    _atomic_json(out / "pretrain_summary.json", summary)
    atomic_write_bytes(out / "MODEL_CARD.md", model_card(summary).encode("utf-8"))
    echo(f"wrote {out / 'model.safetensors'} ({summary['model_bytes'] / 1e6:.1f} MB), MODEL_CARD.md, "
         f"pretrain_summary.json")
    return summary


# ------------------------------------------------------------------------- model card
def model_card(s: Dict) -> str:
    """A human-readable card: what the weights are, how they were made, what they can do."""
    cfg, data, m = s["config"], s["data"], s["zero_shot"]
    synth = data.get("synth") or {}
    lines = [
        f"# {s['arch']} pretrained on the xmodal synthetic world",
        "",
        "The project's own small CLIP-style dual encoder: an OpenCLIP architecture trained from random "
        "initialisation by `xmodal pretrain` on an image-caption corpus generated by `xmodal synth images`. "
        "It exists so that xmodal runs end to end without downloadable CLIP weights; it knows only the "
        "generated world (coloured, textured shapes on a 3x3 grid) and is not a general-purpose model.",
        "",
        "## Weights",
        f"- file: `{s['model_file']}`, float16 safetensors, OpenCLIP state-dict key names, "
        f"{s['model_bytes'] / 1e6:.1f} MB, {s['parameters'] / 1e6:.2f} M parameters",
        f"- architecture: `{s['arch']}` (`src/xmodal/model_configs/{s['arch']}.json`)",
        f"- load: `create_backbone(\"{s['arch']}\", pretrained=\"path/to/{s['model_file']}\")` or "
        f"`--backbone {s['arch']} --pretrained path/to/{s['model_file']}`",
        "",
        "## Data",
        f"- training: {data['train_items']} images, {data['train_captions']} captions "
        f"(`train.jsonl`, sha256 `{data['train_sha256'][:16]}...`)",
        f"- held out: {data['held_out_items']} images (`test.jsonl`); held-out scenes (attributes + positions) "
        "never occur in training",
    ]
    if synth:
        lines.append(f"- generated by: `{synth.get('command', 'xmodal synth images')}` (seed {synth.get('seed')}, "
                     f"generator version {synth.get('generator_version')})")
    lines += [
        "- content: 1-3 objects per 64 px image (9 colours, 6 shapes, 2 sizes, 3 textures, 9 grid positions) "
        "on plain dark backgrounds; captions list every object with its attributes and position in varied "
        "word order",
        "",
        "## Training",
        "- objective: symmetric InfoNCE with a learnable logit scale (clamped at 100)",
        f"- optimiser: AdamW (betas 0.9/0.98, eps 1e-6), lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g} "
        f"on matrices, {cfg['warmup']} warm-up steps then cosine to {cfg['min_lr']:g}",
        f"- steps {cfg['steps']}, batch {cfg['batch']} ({s['samples_seen']} samples, {s['epochs']:.1f} epochs), "
        f"seed {cfg['seed']}, augmentation: {'shifts of up to 2 px and brightness x0.85-1.15' if cfg['augment'] else 'none'}",
        f"- device: {s['device']} ({s['cpu']}), {s['threads']} threads, torch {s['torch']}; training time "
        f"{s['train_seconds'] / 60:.1f} min ({s['sec_per_step']:.2f} s/step)"
        + (f", in {len(s['sessions'])} sessions (resumed)" if len(s["sessions"]) > 1 else ""),
        f"- loss: {s['first_loss']:.3f} (first logged window) -> {s['final_loss']:.3f} (last)"
        if s.get("first_loss") is not None else "- loss: not logged",
        "",
        "Exact command:",
        "",
        "```bash",
        s["command"] or "(called from Python)",
        "```",
        "",
    ]
    if m:
        lines += [
            f"## Zero-shot retrieval on the held-out split ({m['items']} images, {m['texts']} captions)",
            "",
            "Evaluated on the released float16 weights. Recall in %, ranks 1-based (ties: expected rank under random tie-breaking).",
            "",
            "| direction | R@1 | R@5 | R@10 | MdR | MnR | chance R@1 |",
            "|---|---|---|---|---|---|---|",
            f"| text -> image | {m['t2v/R@1']:.1f} | {m['t2v/R@5']:.1f} | {m['t2v/R@10']:.1f} | {m['t2v/MdR']:.0f} "
            f"| {m['t2v/MnR']:.1f} | {m['chance/R@1']:.2f} |",
            f"| image -> text | {m['v2t/R@1']:.1f} | {m['v2t/R@5']:.1f} | {m['v2t/R@10']:.1f} | {m['v2t/MdR']:.0f} "
            f"| {m['v2t/MnR']:.1f} | {m['chance/R@1']:.2f} |",
            "",
            f"R@1 text->image is {m['t2v/R@1'] / m['chance/R@1']:.0f}x chance.",
            "",
        ]
    lines += [
        "## Limitations",
        "- Vocabulary and visuals are those of the generated world only; motion, event order, synonyms and "
        "new backgrounds (the downstream video and shifted sets) were never seen: that gap is what the "
        "parameter-efficient methods are measured on.",
        "- Small model, short CPU training budget: attribute binding in multi-object scenes is imperfect.",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "PretrainConfig", "Corpus", "load_corpus", "trim_tokens", "encode_text_trimmed", "augment", "lr_at",
    "param_groups", "contrastive_loss", "retrieval_metrics", "zero_shot", "save_checkpoint", "load_checkpoint",
    "export_state", "pretrain", "model_card",
]
