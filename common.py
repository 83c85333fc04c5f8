"""Helpers every script shares, each in one place: device and dtype resolution, atomic writes of files and
folders, and the one-line text of an error."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from config import UserError

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------------------------
# Device and dtype

# torch is imported where it is used: the text and data scripts use this module's file helpers and never need it
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # common.DTYPES: {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return {n: torch_dtype(n) for n in DTYPE_NAMES}
    raise AttributeError(f"module 'common' has no attribute {name!r}")


def resolve_device(name: str, local_rank: int = 0) -> "torch.device":
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device; under torchrun 'cuda' means this rank's GPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device '{name}'; use cpu, cuda, cuda:N or auto")
    return device


def resolve_dtype(name: str, device: "torch.device") -> str:
    """'auto' -> bf16 on GPUs that support it and fp32 elsewhere (bf16 matmuls are far slower than fp32 on most
    CPUs); other names are returned as they are after a check."""
    import torch

    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype '{name}'; use one of auto, {', '.join(DTYPE_NAMES)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --dtype fp16 or fp32")
    return name


def autocast_context(dtype: str, device: "torch.device") -> contextlib.AbstractContextManager:
    """Mixed precision for a compute dtype name: nothing for fp32, torch.autocast otherwise."""
    import torch

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(dtype))


# ----------------------------------------------------------------------------------------------------------------
# Errors


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters: the part
    of a library's error that fits into a one-line report."""
    text = getattr(error, "strerror", None) if isinstance(error, OSError) else None
    text = text or str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:limit]


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a rerun after a crash) never sees a partial file or folder under its final name


def fsync_dir(path: Path | str) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path | str, data: bytes | str | Callable[[IO[bytes]], Any], flag: str = "") -> None:
    """Write `data` (bytes, text, or a function that writes to a binary file) to `path` through a temporary file
    in the same folder: fsync the file, rename it into place, fsync the folder. A failing disk (full,
    read-only) is a one-line UserError naming `flag`, the option that chose the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError):
            hint = f"free some space or choose another {flag}" if flag else "free some space or choose another path"
            raise UserError(f"cannot write '{path}' ({first_line(error)}); {hint}") from None
        raise


def fsync_tree(folder: Path | str) -> None:
    """fsync every file below `folder`, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


TMP_PREFIX = ".tmp_"


@contextlib.contextmanager
def atomic_folder(final: Path | str, flag: str = "") -> Iterator[Path]:
    """Build a folder under a temporary name beside `final`, then publish it with one rename once the block has
    finished: a crash leaves only a `.tmp_*` folder, never a partial `final`. An existing `final` is replaced only
    then (moved aside, renamed over, removed). A failing disk is a one-line UserError naming `flag`."""
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}_{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            trash = final.parent / f"{TMP_PREFIX}old_{final.name}_{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as error:
        hint = f"free some space or choose another {flag}" if flag else "free some space or choose another path"
        raise UserError(f"cannot write '{final}' ({first_line(error)}); {hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_destination(final: Path | str, flag: str) -> None:
    """Before any long work: the folder `final` that atomic_folder will write is not a file, and the nearest
    existing folder above it is writable. Creates nothing; a problem is a one-line UserError naming `flag`."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"{flag} '{final}' is a file, not a folder; choose another path")
    parent = final.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to '{parent}' (where {flag} '{final}' would go); choose a writable {flag}")


def recover_atomic_folder(final: Path | str) -> None:
    """Clean up after an atomic_folder(final) whose process was killed: remove its partial `.tmp_*` folder and,
    should it have died between its two renames (final moved aside, the new one not yet in place), move the old
    folder back. Folders of live processes are left alone."""
    import re

    final = Path(final)
    if not final.parent.is_dir():
        return
    pattern = re.compile(rf"{re.escape(TMP_PREFIX)}(old_)?{re.escape(final.name)}_(\d+)")
    for path in sorted(final.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or pid_alive(int(match.group(2))):
            continue
        if match.group(1) and not final.exists():
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (used to tell a live writer's temporary files from a
    dead one's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
