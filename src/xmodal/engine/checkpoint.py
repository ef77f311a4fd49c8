"""Training-state checkpoints: the adapter plus everything needed to resume exactly.

A checkpoint directory holds
- `adapter_config.json` + `adapter_model.safetensors` (the adapter-only checkpoint, so
  `xmodal eval --adapter RUN/last` works on it directly),
- `optimizer.safetensors` (every state tensor, keyed `state.<param>.<name>`) and
  `optimizer.json` (param groups' hyperparameters, parameter names and non-tensor state),
- `rng.safetensors` + `rng.json` (torch CPU/CUDA, numpy and python RNG states of every rank),
- `trainer_state.json` (epoch, global step, schedule, GradScaler, best score, ...).
No pickle anywhere. The directory is staged under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xmodal.errors import CheckpointMismatchError, XModalError

OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
RNG_META = "rng.json"
TRAINER_STATE = "trainer_state.json"


# ------------------------------------------------------------------ optimizer
def flatten_optimizer(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """optimizer.state_dict() -> (tensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    meta = {"param_groups": groups, "state_scalars": scalars, "type": type(optimizer).__name__}
    return tensors, meta


def unflatten_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any],
                        source: str = "") -> None:
    if meta.get("type") != type(optimizer).__name__:
        raise CheckpointMismatchError(f"{source}: optimizer {meta.get('type')!r} in the checkpoint, "
                                      f"{type(optimizer).__name__!r} configured")
    current = optimizer.state_dict()["param_groups"]
    saved = meta["param_groups"]
    if len(saved) != len(current) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, current)):
        raise CheckpointMismatchError(f"{source}: optimizer parameter groups differ from the model's "
                                      f"({[len(g['params']) for g in saved]} vs {[len(g['params']) for g in current]})")
    for a, b in zip(saved, current):
        if "param_names" in a and "param_names" in b and a["param_names"] != b["param_names"]:
            raise CheckpointMismatchError(f"{source}: optimizer parameter names differ from the model's")
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in saved:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------ RNG
def capture_rng(device: Optional[torch.device] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """This process's torch / CUDA / numpy / python RNG states as (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, pstate, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(pstate), "gauss_next": gauss_next}}
    return tensors, meta


def restore_rng(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(tensors["torch"].to(torch.uint8))
    if device is not None and device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"].to(torch.uint8), device)
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------- write/read
def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise XModalError(f"{path}: not found; a training checkpoint holds {TRAINER_STATE}, {OPTIM_META}, "
                          f"{OPTIM_TENSORS}, {RNG_META} and {RNG_TENSORS}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise XModalError(f"{path}: invalid JSON ({exc})") from None


def replace_dir(staged: Path, target: Path) -> None:
    """Move a fully written directory into place (the old one is removed after the swap)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def save_training_checkpoint(
    directory: str | os.PathLike,
    model,
    optimizer: Optional[torch.optim.Optimizer],
    trainer_state: Dict[str, Any],
    rng_states: Optional[List[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]] = None,
) -> Path:
    """Write adapter + optimizer + RNG (+ `trainer_state`) to `directory`, atomically.

    `rng_states` has one (tensors, meta) entry per rank, in rank order.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        model.save_adapter(staged)
        if optimizer is not None:
            tensors, meta = flatten_optimizer(optimizer)
            save_file(tensors, str(staged / OPTIM_TENSORS))
            _write_json(staged / OPTIM_META, meta)
        if rng_states:
            flat: Dict[str, torch.Tensor] = {}
            metas = []
            for r, (tensors, meta) in enumerate(rng_states):
                flat.update({f"rank{r}.{k}": v.contiguous().cpu() for k, v in tensors.items()})
                metas.append(meta)
            save_file(flat, str(staged / RNG_TENSORS))
            _write_json(staged / RNG_META, {"world_size": len(rng_states), "ranks": metas})
        _write_json(staged / TRAINER_STATE, trainer_state)
        replace_dir(staged, directory)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return directory


def find_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """`directory`, or the previous copy left by a crash in the middle of a swap."""
    directory = Path(directory)
    if (directory / TRAINER_STATE).is_file():
        return directory
    old = directory.with_name(f".{directory.name}.old")
    if (old / TRAINER_STATE).is_file():
        return old
    return None


def read_trainer_state(directory: str | os.PathLike) -> Dict[str, Any]:
    return _read_json(Path(directory) / TRAINER_STATE)


def load_training_checkpoint(
    directory: str | os.PathLike,
    model,
    optimizer: Optional[torch.optim.Optimizer],
    rank: int = 0,
    world_size: int = 1,
    device: Optional[torch.device] = None,
    restore_rng_state: bool = True,
) -> Dict[str, Any]:
    """Load adapter weights and optimizer state into the built objects; restore this rank's
    RNG; return the trainer state (schedule, scaler, epoch, ...)."""
    from xmodal.methods.checkpoint import WEIGHTS_NAME

    directory = Path(directory)
    state = _read_json(directory / TRAINER_STATE)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise XModalError(f"{weights}: not found")
    if model.method is None:
        raise XModalError(f"{directory}: the model has no active method to load the checkpoint into")
    ref = next(iter(model.backbone.parameters()))
    tensors = {k: v.to(ref.device) for k, v in load_file(str(weights)).items()}
    model.method.load_trainable_state(tensors, model.backbone, source=str(weights))
    if optimizer is not None:
        meta = _read_json(directory / OPTIM_META)
        unflatten_optimizer(optimizer, load_file(str(directory / OPTIM_TENSORS)), meta, str(directory / OPTIM_META))
    if restore_rng_state:
        restore_rank_rng(directory, rank, world_size, device)
    return state


def restore_rank_rng(directory: str | os.PathLike, rank: int = 0, world_size: int = 1,
                     device: Optional[torch.device] = None) -> None:
    """Set this process's RNGs to what rank `rank` saved (same number of processes required)."""
    directory = Path(directory)
    rng_meta = _read_json(directory / RNG_META)
    if rng_meta.get("world_size") != world_size:
        raise CheckpointMismatchError(
            f"{directory / RNG_META}: saved by {rng_meta.get('world_size')} processes, resuming with {world_size}; "
            f"exact resume needs the same number of processes")
    flat = load_file(str(directory / RNG_TENSORS))
    prefix = f"rank{rank}."
    mine = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    restore_rng(mine, rng_meta["ranks"][rank], device)
