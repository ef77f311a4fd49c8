"""Run configuration: YAML file + command-line overrides -> validated dataclasses.

A config has six sections (data, model, method, head, train, eval) plus `output_dir`.
Every key is checked against the schema below: an unknown key or a value of the wrong type
raises XModalError naming the key and the file (or the override) it came from. `method`
is free-form here (its fields belong to the method's own config class) and is validated by
the method registry. Overrides are `dotted.key=value` with YAML-typed values
(`train.lr=1e-4 method.r=16 data.options={fps: 1}`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from xmodal.atomic import atomic_write_text
from xmodal.errors import XModalError


@dataclass
class DataConfig:
    dataset: str = "jsonl"                 # reader name (xmodal.data.readers)
    root: str = ""                         # dataset root / annotation file
    train_split: str = "train"
    eval_split: str = "test"
    num_frames: int = 12                   # frames per clip (1 for images)
    max_words: int = 32                    # CLIP4Clip token budget, SOT/EOT included
    fps: float = 1.0                       # frames are sampled at this rate, then uniformly
    num_workers: int = 2
    frame_cache: Optional[str] = None      # directory written by `xmodal extract-frames`
    unfold_captions: bool = False          # every (item, caption) pair per epoch, not one caption
    strict_media: bool = False             # unreadable media: raise (true) or skip the sample
    options: Dict[str, Any] = field(default_factory=dict)   # extra reader options
    max_train_items: Optional[int] = None  # cap for quick runs
    max_eval_items: Optional[int] = None


@dataclass
class ModelConfig:
    backbone: str = "ViT-B-32"
    pretrained: Optional[str] = None
    cache_dir: Optional[str] = None


@dataclass
class HeadConfig:
    pooling: str = "text_conditioned"      # mean | text_conditioned
    temperature: float = 5.0               # tau of the text-conditioned softmax
    normalize: bool = False                # L2-normalise before alpha (official code: no)
    max_bytes: int = 256 * 2**20           # cap of the chunked evaluation similarity


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128                  # global batch (all ranks, all accumulation steps)
    lr: float = 1e-5
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0                 # max gradient norm, 0 disables
    grad_accum: int = 1
    precision: str = "auto"                # auto | fp32 | bf16 | fp16
    device: str = "auto"                   # auto | cpu | cuda
    grad_checkpoint_frozen: bool = False   # recompute the towers' blocks in backward
    grad_checkpoint_scope: str = "all"     # all blocks | frozen: only blocks without a trainable site (cheaper)
    compile: Optional[bool] = None         # torch.compile each tower whole, adapters traced in (None: device default)
    fused_adapters: Optional[bool] = None  # one autograd node per adapter site (None: device default)
    bf16_frozen_weights: Optional[bool] = None  # store frozen weights in bf16 under bf16 autocast (exact)
    cuda_graphs: Optional[bool] = None     # capture the training step once, replay it (CUDA, fixed shapes)
    cache_frozen_prefix: bool = False      # CPU: reuse the output of the blocks below the lowest adapted one
    seed: int = 42
    max_steps_per_epoch: Optional[int] = None
    log_every: int = 10                    # host sync (metrics rows, console line, divergence check) every N updates
    save_every_steps: int = 0              # also checkpoint RUN/last every N updates (0: at epoch ends only)
    progress: bool = True
    tensorboard: bool = True
    wandb: Optional[Dict[str, Any]] = None  # {project, run_name, mode (offline default), entity, tags, dir}
    eval_every: int = 1                    # epochs between evaluations (0: only after the last)
    best_metric: str = "t2v/R@1+v2t/R@1"   # '+'-joined metric keys, higher is better
    find_unused_parameters: bool = False


@dataclass
class EvalConfig:
    batch_size: int = 16                   # visual items per encoding batch
    text_batch_size: int = 256
    dual_softmax: bool = False


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "cross_modal_adapter"})
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def method_config(self, source: str = "config"):
        """The method's own validated config dataclass."""
        from xmodal.methods.base import config_from_dict

        opts = dict(self.method)
        name = opts.pop("name", None)
        if not name:
            raise XModalError(f"{source}: method.name is required (see `xmodal methods`)")
        return config_from_dict({"method": name, **opts}, source=f"{source}: method")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "head": HeadConfig, "train": TrainConfig, "eval": EvalConfig}


# ---------------------------------------------------------------------- values
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Coerce/validate one value against a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise XModalError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise XModalError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-5" as a string
        raise XModalError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise XModalError(f"{where}: expected a string, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise XModalError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise XModalError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build_section(cls, data: Any, section: str, source: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise XModalError(f"{source}: section '{section}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise XModalError(f"{source}: unknown key '{section}.{key}'; expected one of {known}")
    values = {k: _check_value(v, hints[k], f"{source}: {section}.{k}") for k, v in data.items()}
    return cls(**values)


def from_dict(data: Dict[str, Any], source: str = "config") -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise XModalError(f"{source}: expected a mapping of sections at the top level")
    known = list(SECTIONS) + ["method", "output_dir"]
    for key in data:
        if key not in known:
            raise XModalError(f"{source}: unknown key '{key}'; expected one of {known}")
    sections = {name: _build_section(cls, data.get(name), name, source) for name, cls in SECTIONS.items()}
    method = data.get("method", {"name": "cross_modal_adapter"})
    if not isinstance(method, dict) or not method.get("name"):
        raise XModalError(f"{source}: 'method' must be a mapping with a 'name' (e.g. cross_modal_adapter)")
    out = data.get("output_dir")
    cfg = RunConfig(method=dict(method), output_dir=None if out is None else str(out), **sections)
    validate(cfg, source)
    return cfg


def validate(cfg: RunConfig, source: str = "config") -> None:
    """Cross-field checks that a dataclass cannot express."""
    from xmodal.engine.heads import POOLINGS
    from xmodal.engine.optim import PRECISIONS

    t = cfg.train
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (len(t.betas) == 2, "train.betas must be two numbers"),
        (t.precision in PRECISIONS, f"train.precision must be one of {list(PRECISIONS)}"),
        (t.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
        (t.eval_every >= 0, "train.eval_every must be >= 0"),
        (cfg.head.pooling in POOLINGS, f"head.pooling must be one of {list(POOLINGS)}"),
        (cfg.head.temperature > 0, "head.temperature must be > 0"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.grad_checkpoint_scope in ("all", "frozen"), "train.grad_checkpoint_scope must be 'all' or 'frozen'"),
        (t.save_every_steps >= 0, "train.save_every_steps must be >= 0 (0: checkpoint at epoch ends only)"),
        (cfg.data.num_frames >= 1, "data.num_frames must be >= 1"),
        (cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers}: expected >= 0 "
                                    f"(0 loads in the main process)"),
        (cfg.data.fps > 0, f"data.fps={cfg.data.fps}: expected a frame rate > 0 (frames sampled per second)"),
        (cfg.data.max_words >= 2, "data.max_words must be >= 2"),
        (cfg.eval.batch_size >= 1 and cfg.eval.text_batch_size >= 1, "eval batch sizes must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise XModalError(f"{source}: {msg}")
    from xmodal.engine.trackers import check_wandb_config

    check_wandb_config(t.wandb, where=f"{source}: train.wandb")
    if t.batch_size % t.grad_accum:
        raise XModalError(f"{source}: train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}")
    keys = [k.strip() for k in t.best_metric.split("+") if k.strip()]
    bad = [k for k in keys if not re.match(r"^(t2v|v2t)/(R@\d+|MdR|MnR)$", k)]
    if not keys or bad:
        raise XModalError(f"{source}: train.best_metric={t.best_metric!r}: expected keys like 't2v/R@1+v2t/R@1'")


# -------------------------------------------------------------------- overrides
def parse_override(text: str) -> Tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4); the value is read as YAML."""
    if "=" not in text:
        raise XModalError(f"override {text!r}: expected key=value (e.g. train.lr=1e-4)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise XModalError(f"override {text!r}: the key must be dotted names like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise XModalError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    data = dict(data or {})
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise XModalError(f"override {item!r}: '{part}' is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise XModalError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise XModalError(f"{path}: invalid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise XModalError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    data = load_yaml(path) if path else {}
    source = str(path) if path else "defaults"
    if path and not data and not any(parse_override(o)[0] == "data.root" for o in overrides):
        raise XModalError(f"{path}: the config file is empty, so data.root is unset; give at least data.root "
                          f"(dataset root or annotation file) and method.name (see configs/ for examples)")
    if overrides:
        # report an unknown key as coming from the override, not the file
        for item in overrides:
            key, _ = parse_override(item)
            section, _, rest = key.partition(".")
            if section in SECTIONS:
                fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
                top = rest.split(".")[0]
                if rest and top not in fields:
                    raise XModalError(f"override {item!r} (on {source}): unknown key '{section}.{top}'; "
                                      f"expected one of {fields}")
        source = f"{source} (with overrides {list(overrides)})"
    data = apply_overrides(data, overrides)
    return from_dict(data, source)


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

