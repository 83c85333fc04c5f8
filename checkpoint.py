"""Checkpoints and run folders, shared by every training script, generate.py and hf_interop.py.

    <run folder>/
        run.json              which run owns the folder (run_id); a new run never prunes another run's steps
        .lock                 advisory lock held by the training process (its pid inside)
        log.jsonl             one record per step of this run
        step_000500/
            model.safetensors   weights of the raw module (never the compiled, DDP or FSDP wrapper)
            optimizer.pt        optimizer state: tensors and plain containers only (loaded with weights_only=True)
            train_state.pt      data-loader positions, RNG states (as tensors), step: likewise
            dcp/                instead of model.safetensors and optimizer.pt under --parallel fsdp: both as DCP
                                shards, one file per rank (parallel.py)
            tokenizer.json      a copy of the tokenizer file, so a moved run folder still finds its tokenizer
            meta.json           model_args, tokenizer {kind, fingerprint, vocab_size, file}, train_config, step,
                                run_id, and the size and sha256 of every other file (checked before use)

A step folder is built under a temporary name and renamed into place when complete (common.atomic_folder), so a
crash never leaves a folder that looks like a checkpoint but is not. Nothing here unpickles arbitrary objects: weights
are safetensors, the rest JSON or torch.load(weights_only=True).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from common import TMP_PREFIX, atomic_folder, atomic_write, first_line
from config import ModelArgs, UserError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAIN_STATE_FILE = "train_state.pt"
DCP_DIR = "dcp"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------------------------
# Weights


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


def _sort_safetensors_header(path: Path) -> None:
    """Rewrite the JSON header of a safetensors file with sorted keys, in place. The Rust writer emits the
    metadata map in hash order, so two saves of identical weights would otherwise differ byte for byte."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" in header:  # the tensor entries' own key order is fixed already
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:
            f.seek(8)
            f.write(text + b" " * (length - len(text)))


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    unique, aliases = _unique_tensors(state_dict)
    save_file(unique, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)})
    _sort_safetensors_header(path)


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (memory-mapped on CPU), restoring tied-weight aliases. For a sharded (FSDP)
    checkpoint's missing model.safetensors, the full weights are read from its DCP shards instead (on CPU)."""
    from safetensors import safe_open

    path = Path(path)
    if path.name == WEIGHTS_FILE and not path.exists() and is_sharded(path.parent):
        return load_sharded_weights(path.parent)

    state_dict = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        state_dict[name] = state_dict[target]
    return state_dict


def is_sharded(step_dir: Path | str) -> bool:
    """A step folder written by train.py --parallel fsdp: model and optimizer state as DCP shards in dcp/ (see
    parallel.py); DCP writes its .metadata last."""
    return (Path(step_dir) / DCP_DIR / ".metadata").is_file()


def load_sharded_weights(step_dir: Path | str) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read in this process without a process group, on CPU.
    Only DCP's own reader touches the files (no pickle is loaded)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from model import Transformer

    args = ModelArgs.from_dict(read_meta(step_dir)["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    state = {name: torch.empty_like(t, device="cpu") for name, t in model.state_dict().items()}
    if args.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    try:
        with warnings.catch_warnings():  # DCP warns on every load without a process group, even with no_dist
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(Path(step_dir) / DCP_DIR)),
                     no_dist=True)
    except Exception as e:  # DCP wraps reader failures in its own exception types
        raise UserError(f"could not read the sharded checkpoint '{step_dir}' ({first_line(e)}); it is damaged or "
                        f"was written by an incompatible version") from None
    return state


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def save_checkpoint(root: Path | str, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any] | None, meta: dict[str, Any],
                    train_state: dict[str, Any], keep: int = 3, run_id: str | None = None,
                    tokenizer_file: str | Path | None = None, flag: str = "--save_file_name",
                    name: str | None = None) -> Path:
    """Write root/step_NNNNNN (or root/<name>) atomically, then prune this run's step checkpoints to the newest
    `keep` (other runs' step folders are never touched). A failing disk is a one-line UserError; the previous
    checkpoints stay."""
    root = Path(root)
    final = root / (name or step_name(step))
    state_dict = model.state_dict() if isinstance(model, torch.nn.Module) else model
    with atomic_folder(final, flag) as tmp:
        write_step_files(tmp, step, state_dict, optimizer, meta, train_state, run_id, tokenizer_file)
    if name is None:
        prune(root, run_id, keep)
    return final


def write_step_files(tmp: Path, step: int, state_dict: dict[str, torch.Tensor] | None,
                     optimizer: torch.optim.Optimizer | dict[str, Any] | None, meta: dict[str, Any],
                     train_state: dict[str, Any], run_id: str | None = None,
                     tokenizer_file: str | Path | None = None) -> None:
    """The files of a step folder, into the folder being built; meta.json last, with the size and sha256 of every
    file below the folder (a sharded checkpoint passes state_dict=None: parallel.py has written its dcp/ there)."""
    meta = {**meta, "step": step, "run_id": run_id}
    if state_dict is not None:
        save_weights(tmp / WEIGHTS_FILE, state_dict)
    if optimizer is not None:
        state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        torch.save(state, tmp / OPTIMIZER_FILE)
    torch.save(train_state, tmp / TRAIN_STATE_FILE)
    if tokenizer_file and Path(tokenizer_file).is_file():
        name = Path(tokenizer_file).name
        shutil.copyfile(tokenizer_file, tmp / name)
        meta["tokenizer"] = {**meta.get("tokenizer", {}), "file": name}
    meta["files"] = {p.relative_to(tmp).as_posix(): _file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def prune(root: Path | str, run_id: str | None, keep: int) -> None:
    """Keep this run's newest `keep` checkpoints (other runs' step folders are never touched)."""
    if keep > 0:
        for old in list_checkpoints(root, run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Finding and checking checkpoints


def list_checkpoints(root: Path | str, run_id: str | None = None) -> list[Path]:
    """Step folders under root (of run `run_id` when given), oldest first. Their files are not checked here: see
    verify_checkpoint."""
    return [p for p in step_folders(root) if run_id is None or _meta_or_none(p).get("run_id") == run_id]


def step_folders(root: Path | str) -> list[Path]:
    """Every step_NNNNNN folder under root, intact or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _meta_or_none(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def verify_checkpoint(step_dir: Path | str, deep: bool = False) -> str | None:
    """What is wrong with a step folder, or None when it is intact: meta.json readable, every file it lists present
    with its recorded size (and sha256 with deep=True). Checkpoints from before sizes were recorded need their
    weights file only."""
    step_dir = Path(step_dir)
    if not (step_dir / META_FILE).is_file():
        return f"{META_FILE} is missing"
    try:
        meta = json.loads((step_dir / META_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{META_FILE} is unreadable ({first_line(e, 80)})"
    files = meta.get("files") or {WEIGHTS_FILE: {}}
    for name, record in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if "bytes" in record and path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {record['bytes']} were written"
        if deep and "sha256" in record and _file_record(path)["sha256"] != record["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_checkpoint(root: Path | str, run_id: str | None = None, deep: bool = False) -> Path | None:
    """The newest intact step folder under root (of run `run_id` when given). Damaged newer ones are named in a
    warning and skipped; when step folders exist but none is intact, that is a UserError (never a silent restart
    from scratch)."""
    root = Path(root)
    candidates = [p for p in step_folders(root) if run_id is None or _meta_or_none(p).get("run_id") in (run_id, None)]
    skipped = []
    for step_dir in reversed(candidates):
        problem = verify_checkpoint(step_dir, deep)
        if problem is None:
            for damaged, why in skipped:
                warn(f"skipping the damaged checkpoint '{damaged}': {why}")
            return step_dir
        skipped.append((step_dir, problem))
    if candidates:
        raise UserError(f"every checkpoint in '{root}' is damaged (newest, {candidates[-1].name}: {skipped[0][1]}); "
                        f"move them away or choose another folder")
    return None


def resolve_checkpoint(path: Path | str) -> Path:
    """A run folder (its newest intact step) or a step folder -> the step folder; damaged ones are a UserError."""
    path = Path(path)
    if _STEP_DIR.match(path.name) or (path / META_FILE).exists():
        problem = verify_checkpoint(path)
        if problem:
            raise UserError(f"the checkpoint '{path}' is damaged: {problem}; pass its run folder to use the newest "
                            f"intact checkpoint")
        return path
    latest = find_checkpoint(path) if path.is_dir() else None
    if latest is None:
        where = f"'{path}' does not exist" if not path.exists() else f"no checkpoint found in '{path}'"
        raise UserError(f"{where}; train a model first (python train.py --save_file_name {path}) or pass "
                        f"--save_file_name pointing to a checkpoint folder")
    return latest


def read_meta(step_dir: Path | str) -> dict[str, Any]:
    """A checkpoint's meta.json. When the folder holds its tokenizer's copy, the recorded tokenizer path points
    there, so a moved or copied run folder still finds its tokenizer."""
    step_dir = Path(step_dir)
    try:
        meta = json.loads((step_dir / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint '{step_dir}' has an unreadable {META_FILE} ({first_line(e)}); it is "
                        f"damaged") from None
    tok = meta.get("tokenizer") or {}
    if tok.get("file") and (step_dir / tok["file"]).is_file():
        meta["tokenizer"] = {**tok, "path": str((step_dir / tok["file"]).resolve())}
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_model(path: Path | str, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint's stored config and load its weights (memory-mapped on CPU).
    Returns (model in eval mode, meta). HF folders: hf_interop.load_any_model."""
    from model import Transformer

    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device(device):
        model = Transformer(args)
    try:
        state_dict = load_weights(step_dir / WEIGHTS_FILE, device=device)
        if not (step_dir / WEIGHTS_FILE).is_file():  # a sharded checkpoint, read on CPU: copy onto the device
            state_dict = {k: v.to(device) for k, v in state_dict.items()}
        # assign=True keeps the memory-mapped tensors instead of copying them into freshly allocated ones
        model.load_state_dict(state_dict, strict=True, assign=dtype is None)
        if args.tie_embeddings:  # assign=True replaced both parameters: share them again
            model.head.weight = model.embed.weight
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"could not load weights from '{step_dir}' ({first_line(e)}); the checkpoint is damaged "
                        f"or was written by an incompatible version") from None
    if dtype is not None:
        model.to(dtype)
    return model.eval(), meta


def safe_torch_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a file that holds anything else (a pickled object
    that could run code) is a UserError, and nothing from it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing; the checkpoint is incomplete") from None
    except Exception as e:  # UnpicklingError for a crafted pickle, RuntimeError for a truncated file
        raise UserError(f"refusing to load '{path}': it is not a plain tensor file ({first_line(e, 120)}); "
                        f"only checkpoints written by this toolkit can be resumed") from None


def load_train_state(step_dir: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(weights, optimizer state or None when the checkpoint has none, train state) of a checkpoint."""
    step_dir = Path(step_dir)
    try:
        weights = load_weights(step_dir / WEIGHTS_FILE, device="cpu")
    except Exception as e:
        raise UserError(f"could not load weights from '{step_dir}' ({first_line(e)}); the checkpoint is "
                        f"damaged") from None
    optimizer = safe_torch_load(step_dir / OPTIMIZER_FILE) if (step_dir / OPTIMIZER_FILE).exists() else None
    return weights, optimizer, safe_torch_load(step_dir / TRAIN_STATE_FILE)


# ----------------------------------------------------------------------------------------------------------------
# Run folders: ownership, lock, stale temporary folders


def read_run(root: Path | str) -> dict[str, Any] | None:
    """The run that owns a folder ({run_id, ...}), or None for a folder no run has used."""
    path = Path(root) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is unreadable ({first_line(e)}); restore it or choose another folder") from None


def new_run(root: Path | str, config: dict[str, Any]) -> str:
    """Claim a folder for a new run: a fresh run_id in run.json (written atomically)."""
    run_id = uuid.uuid4().hex[:12]
    atomic_write(Path(root) / RUN_FILE, json.dumps({"run_id": run_id, "config": config}, indent=2, sort_keys=True),
                 "--save_file_name")
    return run_id


@contextlib.contextmanager
def run_lock(root: Path | str) -> Iterator[None]:
    """An advisory lock on a run folder for the life of the block: a second process on the same folder gets a
    UserError naming the holder. Released when the process exits, however it exits."""
    import fcntl

    path = Path(root) / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"the run folder '{root}' is in use by {holder}; wait for it to finish or choose another "
                        f"--save_file_name") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def remove_stale_temporaries(root: Path | str) -> list[Path]:
    """Clean up what killed saves left in a run folder (call with the run lock held: no live process writes into
    the folder then): a step folder moved aside by a save that died before its replacement landed is put back,
    every other temporary folder is removed."""
    removed = []
    root = Path(root)
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not p.name.startswith(TMP_PREFIX):
            continue
        m = re.fullmatch(rf"{re.escape(TMP_PREFIX)}old_(step_\d+)_\d+", p.name)
        if m and not (root / m.group(1)).exists():
            os.replace(p, root / m.group(1))
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed