"""Experiment trackers beside metrics.csv: TensorBoard (built in) and Weights & Biases (optional extra).

A tracker receives the same rows as metrics.csv (`log(values)`), the run's provenance once
(`set_provenance`) and the final metrics (`finish(final)`). W&B runs in OFFLINE mode unless the
user asks otherwise (`train.wandb.mode: online`), so a run never needs the network and never
fails because there is none; `wandb sync DIR` uploads it later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from xmodal.errors import XModalError

WANDB_KEYS = {"project", "run_name", "mode", "entity", "tags", "dir"}
WANDB_MODES = {"offline", "online", "disabled"}


def _scalars(values: Mapping[str, Any]) -> Dict[str, float]:
    prefix = "train" if values.get("kind") == "step" else "eval"
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if k not in ("kind", "epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, log_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, values: Mapping[str, Any]) -> None:
        step = int(values["step"])
        for k, v in _scalars(values).items():
            self.writer.add_scalar(k, v, step)

    def set_provenance(self, run: Mapping[str, Any]) -> None:
        import json

        self.writer.add_text("run", "```json\n" + json.dumps(run, indent=2, default=str) + "\n```")

    def finish(self, final: Optional[Mapping[str, Any]] = None) -> None:
        self.writer.close()


def check_wandb_config(cfg: Optional[Mapping[str, Any]], where: str = "train.wandb") -> Optional[Dict[str, Any]]:
    """Validate `train.wandb` ({project, run_name, mode, entity, tags, dir}); None/empty = off."""
    if not cfg:
        return None
    if not isinstance(cfg, Mapping):
        raise XModalError(f"{where}: expected a mapping like {{project: NAME, run_name: NAME}}, got {cfg!r}")
    unknown = set(cfg) - WANDB_KEYS
    if unknown:
        raise XModalError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(WANDB_KEYS)}")
    if not cfg.get("project"):
        raise XModalError(f"{where}.project: required (the W&B project name)")
    mode = cfg.get("mode", "offline")
    if mode not in WANDB_MODES:
        raise XModalError(f"{where}.mode: expected one of {sorted(WANDB_MODES)}, got {mode!r}")
    return {**cfg, "mode": mode}


class WandbTracker:
    """Weights & Biases, offline by default (`pip install xmodal[wandb]`)."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, config: Optional[Mapping[str, Any]] = None):
        cfg = check_wandb_config(cfg)
        try:
            import wandb
        except ImportError:
            raise XModalError("train.wandb is set but the wandb package is not installed: "
                              "pip install 'xmodal[wandb]' (or remove train.wandb)") from None
        self._wandb = wandb
        self.run = wandb.init(project=cfg["project"], name=cfg.get("run_name"), entity=cfg.get("entity"),
                              tags=cfg.get("tags"), mode=cfg["mode"], dir=str(cfg.get("dir") or run_dir),
                              config=dict(config or {}), reinit="finish_previous")

    def log(self, values: Mapping[str, Any]) -> None:
        self.run.log(_scalars(values), step=int(values["step"]))

    def set_provenance(self, run: Mapping[str, Any]) -> None:
        self.run.config.update({"run": dict(run)}, allow_val_change=True)

    def finish(self, final: Optional[Mapping[str, Any]] = None) -> None:
        for k, v in (final or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.run.summary[k] = v
        self.run.finish()


def build_trackers(run_dir: Path, tensorboard: bool, wandb_cfg: Optional[Mapping[str, Any]] = None,
                   config: Optional[Mapping[str, Any]] = None, purge_step: Optional[int] = None) -> List[Any]:
    trackers: List[Any] = []
    if tensorboard:
        try:
            trackers.append(TensorBoardTracker(run_dir / "tb", purge_step=purge_step))
        except ImportError:  # tensorboard is optional at run time
            pass
    if check_wandb_config(wandb_cfg):
        trackers.append(WandbTracker(wandb_cfg, run_dir, config=config))
    return trackers
