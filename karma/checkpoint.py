"""Atomic save / load / resume of a training run's state.

A checkpoint is a directory:

    model.safetensors   every tensor of the (unwrapped) KarmaModel's state_dict: all that
                        inference needs
    state.pt            step, optimizer, scheduler, RNG states (python, numpy, torch, cuda), the
                        training objective's own tensors (the temperature) and extra; plain
                        containers and tensors only (`torch.load(weights_only=True)`)
    config.yaml         the resolved config the model was built from

Usage:

    save_checkpoint(ckpt_dir, model, optimizer, scheduler, step, cfg, extra, objective=objective)
    state = load_checkpoint(ckpt_dir, model, optimizer, scheduler, objective=objective)  # resume
    model, cfg = load_model(ckpt_dir, overrides=["eval.split=valid"])    # eval, export, analyze

This module is the one save / load path for karma weights: training, evaluation, export, analysis
and serving all go through it.

Saving writes everything into a sibling `<name>.tmp-<pid>` directory and renames it into place, so
a crash mid-save never leaves a half-written checkpoint where a reader looks: either the old
checkpoint or the new one is there. Replacing an existing checkpoint renames the old one away
(`<name>.old-<pid>`), renames the new one in, then deletes the old one; a crash between the two
renames is repaired by the next load.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as _load_safetensors_model
from safetensors.torch import save_model as _save_safetensors_model

from karma.config import Config, apply_overrides, load_config, save_config
from karma.errors import KarmaError

if TYPE_CHECKING:
    from karma.model import KarmaModel

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
# 2: the temperature moved from model.safetensors to state.pt with the training objective.
FORMAT_VERSION = 2
# A trained checkpoint's weights fix these sections; every other key may be overridden.
FIXED_SECTIONS = ("model", "loss")


class CheckpointError(KarmaError):
    """A checkpoint directory that is missing, incomplete or does not match the model."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel, else `model` itself."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as weights_only-safe containers."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        # random.getstate() is (version, tuple of 625 ints, gauss): tuples of ints load safely.
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            # uint32 keys as int64: ndarrays are not allowed by the weights_only unpickler.
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `get_rng_state`; CUDA states are restored only where CUDA is in use."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every filesystem allows opening a directory.
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


def _recover(ckpt_dir: Path) -> None:
    """Repair a crash between 'rename old away' and 'rename new in': put the old one back."""
    if ckpt_dir.exists():
        return
    olds = sorted(ckpt_dir.parent.glob(f"{ckpt_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in olds if (p / MODEL_FILE).exists() and (p / STATE_FILE).exists()]
    if complete:
        os.replace(complete[-1], ckpt_dir)


def save_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    config: Config,
    extra: dict[str, Any] | None = None,
    objective: torch.nn.Module | None = None,
) -> Path:
    """Write model, optimizer, scheduler, step, RNG states and config to `ckpt_dir` atomically.

    `extra` must hold only weights_only-safe values (str, int, float, bool, None, lists, dicts,
    tensors); the training loop keeps its best validation score and log state there.
    `objective` (a `karma.objective.KarmaObjective`, possibly DDP-wrapped): its tensors outside
    the model (the learnable temperature) go to state.pt.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f"{ckpt_dir.name}.tmp-{os.getpid()}"
    old = ckpt_dir.parent / f"{ckpt_dir.name}.old-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": get_rng_state(),
        "objective": _objective_state(objective) if objective is not None else {},
        "extra": extra or {},
    }
    try:
        tmp.mkdir()
        # save_model (not save_file) drops the duplicates of tied tensors (embeddings / LM head).
        _save_safetensors_model(unwrap_model(model), str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        save_config(config, tmp / CONFIG_FILE)
        for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _recover(ckpt_dir)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, ckpt_dir)
    _fsync_dir(ckpt_dir.parent)
    # Leftovers of saves that crashed in an earlier process: the new checkpoint supersedes them.
    for pattern in (f"{ckpt_dir.name}.tmp-*", f"{ckpt_dir.name}.old-*"):
        for stale in ckpt_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    return ckpt_dir


def _objective_state(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The objective's tensors that are not the model's (those go to model.safetensors)."""
    state = unwrap_model(objective).state_dict()
    return {k: v for k, v in state.items() if not k.startswith("model.")}


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The `state.pt` of a checkpoint (step, optimizer, scheduler, rng, extra), on CPU."""
    ckpt_dir = Path(ckpt_dir)
    _recover(ckpt_dir)
    path = ckpt_dir / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (not a karma checkpoint directory?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from exc


def load_weights(ckpt_dir: str | Path, model: torch.nn.Module) -> None:
    """Load `model.safetensors` into `model` (strict: every key must match)."""
    ckpt_dir = Path(ckpt_dir)
    _recover(ckpt_dir)
    path = ckpt_dir / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (not a karma checkpoint directory?)")
    target = unwrap_model(model)
    device = next(target.parameters()).device
    try:
        _load_safetensors_model(target, str(path), strict=True, device=str(device))
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path}: damaged or truncated weights file ({exc}); restore it or train again"
        ) from exc
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: does not match the model built from the config: {exc}"
        ) from exc


def load_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    objective: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Restore a run from `ckpt_dir` in place; returns {"step", "extra"} of the saved state."""
    state = read_state(ckpt_dir)
    load_weights(ckpt_dir, model)
    if objective is not None:
        path = Path(ckpt_dir) / STATE_FILE
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {state.get('format_version')}, this karma reads "
                f"{FORMAT_VERSION} (the temperature moved to state.pt); retrain to resume"
            )
        missing, unexpected = unwrap_model(objective).load_state_dict(
            state["objective"], strict=False
        )
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: objective state does not match: missing {missing}, "
                f"unexpected {unexpected}"
            )
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{Path(ckpt_dir) / STATE_FILE}: key 'optimizer' is empty")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": int(state["step"]), "extra": state["extra"]}


def apply_checkpoint_overrides(cfg: Config, overrides: Sequence[str] | None) -> Config:
    """`cfg` with dotted overrides applied, refusing keys the trained weights fix.

    model.* and loss.* describe what was trained; every other section (eval, data, analysis,
    serve, train.device, ...) may change when a checkpoint is evaluated, exported or analyzed.
    """
    overrides = list(overrides or [])
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.split(".", 1)[0] in FIXED_SECTIONS:
            raise KarmaError(
                f"override '{text}': config key '{key}' is fixed by the checkpoint's weights "
                f"({' and '.join(s + '.*' for s in FIXED_SECTIONS)} cannot change after "
                "training); only other keys such as eval.*, data.*, analysis.* or train.device "
                "can be overridden"
            )
    return apply_overrides(cfg, overrides)


def load_model(
    ckpt_dir: str | Path,
    overrides: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> tuple[KarmaModel, Config]:
    """Rebuild the model from the checkpoint's config.yaml, load its weights, eval mode.

    `overrides` go through `apply_checkpoint_overrides`. The device is `device` when given, else
    `train.device` when the overrides set it, else "auto" (CUDA when available): the device a
    model was trained on says nothing about where it is evaluated.
    """
    from karma.distributed import resolve_device
    from karma.model import build_model

    ckpt_dir = Path(ckpt_dir)
    _recover(ckpt_dir)
    config_path = ckpt_dir / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: no such file (not a karma checkpoint directory?)")
    cfg = apply_checkpoint_overrides(load_config(config_path), overrides)
    if device is None:
        asked = any(o.split("=", 1)[0].strip() == "train.device" for o in overrides or [])
        device = resolve_device(cfg.train.device if asked else "auto")
    model = build_model(cfg).to(device)
    load_weights(ckpt_dir, model)
    model.eval()
    return model, cfg
