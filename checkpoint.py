"""Checkpoints: one folder per step, written atomically, shared by train.py, generate.py and hf_interop.py.

    <root>/step_000500/
        model.safetensors   weights of the raw module (never the compiled or DDP wrapper)
        meta.json           model_args, tokenizer {kind, fingerprint, vocab_size}, train_config, step
        optimizer.pt        optimizer state
        train_state.pt      data-loader position, RNG states, anything else needed to resume exactly

A step folder is first written under a temporary name and renamed into place when complete, so a crash never
leaves a folder that looks like a checkpoint but is not: `latest_checkpoint` only ever sees finished ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from config import ModelArgs, UserError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAIN_STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one name per storage and record the
    others as aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    unique, aliases = _unique_tensors(state_dict)
    save_file(unique, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (memory-mapped on CPU), restoring tied-weight aliases."""
    from safetensors import safe_open

    state_dict = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        state_dict[name] = state_dict[target]
    return state_dict


def save_checkpoint(root: Path | str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], train_state: dict[str, Any], keep: int = 3) -> Path:
    """Write root/step_{step:06d} atomically and prune to the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / WEIGHTS_FILE, model.state_dict())
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(train_state, tmp / TRAIN_STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    for file in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        trash = root / f".old_step_{step:06d}_{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path | str) -> list[Path]:
    """Complete step folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / META_FILE).exists()
             and (p / WEIGHTS_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path | str) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint root (its newest step) or a step folder -> the step folder."""
    path = Path(path)
    if (path / META_FILE).exists() and (path / WEIGHTS_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        where = f"'{path}' does not exist" if not path.exists() else f"no checkpoint found in '{path}'"
        raise UserError(f"{where}; train a model first (python train.py --save_file_name {path}) or pass "
                        f"--save_file_name pointing to a checkpoint folder")
    return latest


def read_meta(step_dir: Path | str) -> dict[str, Any]:
    try:
        return json.loads((Path(step_dir) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint '{step_dir}' has an unreadable {META_FILE} ({e}); it is damaged") from e


def load_model(path: Path | str, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint's stored config and load its weights (memory-mapped on CPU).
    Returns (model in eval mode, meta). HF model folders: hf_interop.load_any_model."""
    from model import Transformer

    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device(device):
        model = Transformer(args)
    try:
        state_dict = load_weights(step_dir / WEIGHTS_FILE, device=device)
        # assign=True keeps the memory-mapped tensors instead of copying them into freshly allocated ones
        model.load_state_dict(state_dict, strict=True, assign=dtype is None)
    except (RuntimeError, OSError) as e:
        raise UserError(f"could not load weights from '{step_dir}' ({str(e).splitlines()[0][:200]}); "
                        f"the checkpoint is damaged or was written by an incompatible version") from e
    if dtype is not None:
        model.to(dtype)
    return model.eval(), meta


def load_train_state(step_dir: Path | str, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore a training run in place: weights into `model`, state into `optimizer`. Returns (meta, train_state)."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    model.load_state_dict(load_weights(step_dir / WEIGHTS_FILE, device="cpu"), strict=True)
    if optimizer is not None and (step_dir / OPTIMIZER_FILE).exists():
        optimizer.load_state_dict(torch.load(step_dir / OPTIMIZER_FILE, map_location="cpu", weights_only=False))
    train_state = torch.load(step_dir / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    return meta, train_state
