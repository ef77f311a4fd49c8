"""Training-state checkpoints: the adapter plus everything needed to resume exactly, crash-safe.

A checkpoint directory holds
- `adapter_config.json` + `adapter_model.safetensors` (the adapter-only checkpoint, so
  `xmodal eval --adapter RUN/last` works on it directly),
- `optimizer.safetensors` (every state tensor, keyed `state.<param>.<name>`) and
  `optimizer.json` (param groups' hyperparameters, parameter names and non-tensor state),
- `rng.safetensors` + `rng.json` (torch CPU/CUDA, numpy and python RNG states of every rank),
- `trainer_state.json` (epoch, global step, schedule, loss scale, sampler, best score, ...),
- `checkpoint.json`, the manifest: size and SHA-256 of every other file. It is written last, so
  a directory is *complete* iff its manifest exists and every listed file has its size
  (resume also checks the hashes: a truncated or edited file is an error, never loaded).
No pickle anywhere.

Write protocol for `D` (`save_training_checkpoint`), with fixed sibling names:
    recover(D); write .D.tmp/ (files, then manifest)      <- commit point: .D.tmp is complete
    rename D -> .D.old; rename .D.tmp -> D; discard .D.old
A directory is discarded by renaming it to `.D.trash-*` first (atomic) and deleting it after, so
no complete directory is ever half-deleted under a name that recovery looks at. At any instant
the newest complete copy is, by construction, the first complete one of (.D.tmp, D, .D.old):
`find_checkpoint` picks it (read-only) and `recover_checkpoint` moves it to D, deleting a
copy only while a newer complete one exists. `tests/test_checkpoint_faults.py` kills the
process at every step of both sequences and checks that a complete checkpoint always loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from xmodal.atomic import WriteError, atomic_write_text, describe_write_error, ensure_dir, file_mode
from xmodal.errors import CheckpointMismatchError, XModalError
from xmodal.safetensors_file import save_safetensors

OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
RNG_META = "rng.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = 1
REQUIRED = (TRAINER_STATE, "adapter_config.json", "adapter_model.safetensors")  # + what the manifest lists


class CheckpointError(XModalError):
    """A training checkpoint is missing, incomplete, truncated or does not fit the run."""


# fault injection for tests/test_checkpoint_faults.py: called with a step name between every
# file operation of the write and recovery sequences (None in normal runs)
FAULT_HOOK: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


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
    saved = meta.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(current) or any(
            not isinstance(a, dict) or len(a.get("params", ())) != len(b["params"]) for a, b in zip(saved, current)):
        raise CheckpointMismatchError(f"{source}: optimizer parameter groups differ from the model's")
    for a, b in zip(saved, current):
        if "param_names" in a and "param_names" in b and a["param_names"] != b["param_names"]:
            raise CheckpointMismatchError(f"{source}: optimizer parameter names differ from the model's")
    # every state tensor must belong to a parameter and have its shape (a forged file would
    # otherwise fail, or silently broadcast, inside the first optimizer step)
    params = {i: p for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    saved_ids = [i for a in saved for i in a["params"]]
    by_id = dict(zip(saved_ids, params.values()))
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in by_id:
            raise CheckpointMismatchError(f"{source}: unexpected optimizer tensor {key!r}")
        idx, name = int(parts[1]), parts[2]
        p = by_id[idx]
        if name != "step" and tuple(value.shape) != tuple(p.shape):
            raise CheckpointMismatchError(f"{source}: optimizer tensor {key!r} has shape {tuple(value.shape)}, "
                                          f"its parameter {tuple(p.shape)}")
        state.setdefault(idx, {})[name] = value
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


def restore_rng(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], device: Optional[torch.device] = None,
                source: str = "") -> None:
    try:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
        if device is not None and device.type == "cuda" and "cuda" in tensors:
            torch.cuda.set_rng_state(tensors["cuda"].to(torch.uint8), device)
        n = meta["numpy"]
        np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: invalid RNG state ({type(exc).__name__}: {exc}); "
                              f"the checkpoint is damaged, resume from another one or start over") from None


# --------------------------------------------------------------- file helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_safetensors(tensors, path)
        os.chmod(path, file_mode())  # safetensors creates 0600; checkpoints follow the umask like every output
        with path.open("rb") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        raise WriteError(describe_write_error(exc, path)) from None


def _read_json(path: Path) -> Any:
    from xmodal.folder_files import file_inside, read_json_file

    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a training checkpoint holds {TRAINER_STATE}, {OPTIM_META}, "
                              f"{OPTIM_TENSORS}, {RNG_META} and {RNG_TENSORS}")
    return read_json_file(file_inside(path.parent, path.name), "a training-checkpoint file")


def _load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from xmodal.folder_files import file_inside

    file_inside(path.parent, path.name)  # a link leaving the checkpoint folder is refused
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); "
                              f"the checkpoint is truncated or damaged") from None


# -------------------------------------------------------------- names / state
def _names(directory: Path) -> Tuple[Path, Path, Path]:
    """(staged, final, previous) for a checkpoint directory."""
    return (directory.with_name(f".{directory.name}.tmp"), directory,
            directory.with_name(f".{directory.name}.old"))


def _manifest(directory: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def incomplete_reason(directory: str | os.PathLike) -> Optional[str]:
    """None if `directory` is a complete checkpoint (manifest + every file at its size), else why not."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: not found"
    manifest = _manifest(directory)
    if manifest is None:
        if (directory / TRAINER_STATE).is_file():
            return (f"{directory / MANIFEST}: missing (written by an older xmodal, or the write was interrupted); "
                    f"the checkpoint cannot be verified")
        return f"{directory / MANIFEST}: missing; the checkpoint write was interrupted"
    files = manifest["files"]
    for name in REQUIRED:
        if name not in files:
            return f"{directory / MANIFEST}: does not list {name}"
    from xmodal.folder_files import FolderFileError, file_inside

    for name, entry in files.items():
        try:
            path = file_inside(directory, name)
        except FolderFileError as exc:
            return str(exc)
        if not path.is_file():
            return f"{path}: missing; the checkpoint is incomplete"
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes"):
            return f"{path}: {path.stat().st_size} bytes, the manifest says {entry.get('bytes') if isinstance(entry, dict) else entry}; the file is truncated or was replaced"
    return None


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Complete, and every file has the SHA-256 the manifest recorded (else CheckpointError)."""
    directory = Path(directory)
    reason = incomplete_reason(directory)
    if reason:
        raise CheckpointError(reason)
    for name, entry in _manifest(directory)["files"].items():
        if _sha256(directory / name) != entry.get("sha256"):
            raise CheckpointError(f"{directory / name}: its SHA-256 differs from {directory / MANIFEST}; the file "
                                  f"was modified or damaged after it was written; resume from another checkpoint "
                                  f"or start over")


def find_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint for `directory` (itself, or a copy a crash left beside it).

    Read-only: by the write protocol a complete `.D.tmp` is newer than D, and D newer than `.D.old`.
    """
    for candidate in _names(Path(directory)):
        if incomplete_reason(candidate) is None:
            return candidate
    return None


def describe_missing(directory: str | os.PathLike) -> str:
    """Why no complete checkpoint exists for `directory` (for error messages)."""
    reasons = [incomplete_reason(c) for c in _names(Path(directory)) if c.exists()]
    return "; ".join(r for r in reasons if r) or f"{directory}: not found"


def _discard(path: Path, final: Path) -> None:
    """Rename aside (atomic), then delete: a half-deleted folder never keeps a name recovery reads."""
    if not path.exists():
        return
    trash = final.with_name(f".{final.name}.trash-{uuid.uuid4().hex[:8]}")
    _step(f"discard {path.name}: rename")
    os.replace(path, trash)
    _step(f"discard {path.name}: delete")
    shutil.rmtree(trash, ignore_errors=True)


def _trash_of(directory: Path) -> List[Path]:
    prefix = f".{directory.name}.trash-"
    if not directory.parent.is_dir():
        return []
    return [p for p in directory.parent.iterdir() if p.name.startswith(prefix)]


def recover_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """Finish or roll back an interrupted write so that `directory` holds the newest complete
    checkpoint; return it (None when no complete copy exists). Idempotent, and safe to kill at
    any step: a copy is deleted only while a newer complete one exists under a recovery name."""
    staged, final, previous = _names(Path(directory))
    for t in _trash_of(final):
        _step("recover: delete trash")
        shutil.rmtree(t, ignore_errors=True)
    best = find_checkpoint(final)
    if best is None:
        if staged.exists():
            _discard(staged, final)  # an interrupted write, and nothing complete to protect it from
        return None
    if best == staged:
        _discard(previous, final)             # older than final, and staged is complete
        if final.exists():
            _step("recover: rename final -> previous")
            os.replace(final, previous)
        _step("recover: rename staged -> final")
        os.replace(staged, final)
        _fsync_dir(final.parent)
        _discard(previous, final)
    elif best == final:
        _discard(staged, final)
        _discard(previous, final)
    else:  # only the previous copy is complete: the crash hit between the two renames
        _discard(staged, final)
        _discard(final, final)
        _step("recover: rename previous -> final")
        os.replace(previous, final)
        _fsync_dir(final.parent)
    return final


# ------------------------------------------------------------------- write/read
def _finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def save_training_checkpoint(
    directory: str | os.PathLike,
    model,
    optimizer: Optional[torch.optim.Optimizer],
    trainer_state: Dict[str, Any],
    rng_states: Optional[List[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]] = None,
) -> Path:
    """Write adapter + optimizer + RNG (+ `trainer_state`) to `directory` by the protocol above.

    `rng_states` has one (tensors, meta) entry per rank, in rank order. Refuses (CheckpointError)
    to write non-finite weights or optimizer state: a checkpoint is always a state to resume from.
    A full disk is a one-line WriteError; the staged folder is removed and `directory` untouched.
    """
    from xmodal.methods.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    directory = Path(directory)
    ensure_dir(directory.parent)
    staged, final, previous = _names(directory)
    weights = {k: v.detach() for k, v in model.method.trainable_state(model.backbone).items()} \
        if getattr(model, "method", None) is not None else {}
    opt_tensors, opt_meta = flatten_optimizer(optimizer) if optimizer is not None else ({}, None)
    bad = _finite(weights) or _finite(opt_tensors)
    if bad:
        raise CheckpointError(f"{directory}: refusing to write a checkpoint with non-finite values in {bad!r}; "
                              f"the last complete checkpoint is kept")
    recover_checkpoint(directory)
    _step("write: start")
    try:
        if staged.exists():
            _discard(staged, final)
        ensure_dir(staged)
        # the adapter files: save_adapter stages its own folder inside ours, so whatever a crash
        # leaves of it is removed with ours
        model.save_adapter(staged / "adapter")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(staged / "adapter" / name, staged / name)
        shutil.rmtree(staged / "adapter", ignore_errors=True)
        _step("write: adapter")
        if opt_meta is not None:
            _save_tensors(opt_tensors, staged / OPTIM_TENSORS)
            _step("write: optimizer tensors")
            _write_json(staged / OPTIM_META, opt_meta)
            _step("write: optimizer meta")
        if rng_states:
            flat: Dict[str, torch.Tensor] = {}
            metas = []
            for r, (tensors, meta) in enumerate(rng_states):
                flat.update({f"rank{r}.{k}": v.contiguous().cpu() for k, v in tensors.items()})
                metas.append(meta)
            _save_tensors(flat, staged / RNG_TENSORS)
            _step("write: rng tensors")
            _write_json(staged / RNG_META, {"world_size": len(rng_states), "ranks": metas})
            _step("write: rng meta")
        _write_json(staged / TRAINER_STATE, trainer_state)
        _step("write: trainer state")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(staged.iterdir()) if p.is_file() and not p.name.startswith(".")}
        _write_json(staged / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})
        _fsync_dir(staged)
        _step("write: manifest (commit point)")
        if final.exists():
            _discard(previous, final)
            os.replace(final, previous)
            _step("write: rename final -> previous")
        os.replace(staged, final)
        _fsync_dir(final.parent)
        _step("write: rename staged -> final")
        _discard(previous, final)
        _step("write: done")
    except OSError as exc:
        _cleanup_failed_write(staged)
        raise WriteError(describe_write_error(exc, staged)) from None
    except XModalError:
        _cleanup_failed_write(staged)
        raise
    return final


def _cleanup_failed_write(staged: Path) -> None:
    """After a failed (not killed) write: drop the staged folder unless it is complete (then it
    is the newest checkpoint and recovery will move it into place)."""
    if staged.exists() and incomplete_reason(staged) is not None:
        shutil.rmtree(staged, ignore_errors=True)


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
    verify: bool = True,
) -> Dict[str, Any]:
    """Verify the checkpoint, load adapter weights and optimizer state into the built objects;
    restore this rank's RNG; return the trainer state (schedule, scaler, epoch, ...)."""
    from xmodal.methods.checkpoint import WEIGHTS_NAME

    directory = Path(directory)
    if verify:
        verify_checkpoint(directory)
    state = _read_json(directory / TRAINER_STATE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory / TRAINER_STATE}: expected a JSON object")
    weights = directory / WEIGHTS_NAME
    if model.method is None:
        raise XModalError(f"{directory}: the model has no active method to load the checkpoint into")
    ref = next(iter(model.backbone.parameters()))
    tensors = {k: v.to(ref.device) for k, v in _load_tensors(weights).items()}
    bad = _finite(tensors)
    if bad:
        raise CheckpointError(f"{weights}: tensor {bad!r} holds NaN/inf; not a state to resume from")
    model.load_trainable_state(tensors, source=str(weights))  # method + a trained head (seq_transformer)
    if optimizer is not None:
        meta = _read_json(directory / OPTIM_META)
        unflatten_optimizer(optimizer, _load_tensors(directory / OPTIM_TENSORS), meta, str(directory / OPTIM_META))
    if restore_rng_state:
        restore_rank_rng(directory, rank, world_size, device)
    return state


def restore_rank_rng(directory: str | os.PathLike, rank: int = 0, world_size: int = 1,
                     device: Optional[torch.device] = None) -> None:
    """Set this process's RNGs to what rank `rank` saved (same number of processes required)."""
    directory = Path(directory)
    rng_meta = _read_json(directory / RNG_META)
    if not isinstance(rng_meta, dict) or not isinstance(rng_meta.get("ranks"), list):
        raise CheckpointError(f"{directory / RNG_META}: expected {{'world_size': N, 'ranks': [...]}}")
    if rng_meta.get("world_size") != world_size or len(rng_meta["ranks"]) != world_size:
        raise CheckpointMismatchError(
            f"{directory / RNG_META}: saved by {rng_meta.get('world_size')} processes, resuming with {world_size}; "
            f"exact resume needs the same number of processes")
    flat = _load_tensors(directory / RNG_TENSORS)
    prefix = f"rank{rank}."
    mine = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    restore_rng(mine, rng_meta["ranks"][rank], device, source=str(directory / RNG_TENSORS))
