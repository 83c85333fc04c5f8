"""common.py: device/dtype resolution, atomic writes of files and folders (nothing partial under the final name,
nothing left behind), one-line error text."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from config import UserError


def test_device_and_dtype_resolution() -> None:
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("foo", "cuda:x", "meta"):
        with pytest.raises(UserError) as e:
            common.resolve_device(bad)
        assert "--device" in str(e.value) and "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            common.resolve_device("cuda")
    cpu = torch.device("cpu")
    assert common.resolve_dtype("auto", cpu) == "fp32"
    assert [common.resolve_dtype(n, cpu) for n in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(UserError):
        common.resolve_dtype("fp8", cpu)
    x = torch.ones(2, 2)
    with common.autocast_context("bf16", cpu):
        assert (x @ x).dtype == torch.bfloat16
    with common.autocast_context("fp32", cpu):
        assert (x @ x).dtype == torch.float32


def test_first_line() -> None:
    assert common.first_line(ValueError("one\ntwo")) == "one"
    assert common.first_line(ValueError("")) == "ValueError"
    assert common.first_line(OSError(errno.ENOSPC, "No space left on device", "f")) == "No space left on device"
    assert len(common.first_line(ValueError("x" * 500), limit=50)) == 50


def test_atomic_write_text_bytes_and_callback(tmp_path: Path) -> None:
    common.atomic_write(tmp_path / "a.txt", "héllo")
    common.atomic_write(tmp_path / "b.bin", b"\x00\x01")
    common.atomic_write(tmp_path / "c.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" and (tmp_path / "c.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.json"
    target.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as e:
        common.atomic_write(target, fail, "--output_path")
    assert "No space left" in str(e.value) and "--output_path" in str(e.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.json"]
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(target, lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_atomic_folder_publishes_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with common.atomic_folder(final) as tmp:
        (tmp / "x").write_text("1")
        assert not final.exists()
    assert (final / "x").read_text() == "1"
    with pytest.raises(RuntimeError):
        with common.atomic_folder(final) as tmp:
            (tmp / "x").write_text("2")
            raise RuntimeError("boom")
    assert (final / "x").read_text() == "1"  # the old folder is untouched by the failed replacement
    with common.atomic_folder(final) as tmp:
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_killed_midway_leaves_only_a_temporary(tmp_path: Path) -> None:
    code = ("import os, sys, common\n"
            "with common.atomic_folder(sys.argv[1]) as tmp:\n"
            "    (tmp / 'part').write_text('x')\n"
            "    os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=Path(common.__file__).parent)
    assert r.returncode == -9
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(n.startswith(common.TMP_PREFIX) for n in names)  # never a partial 'out'


def test_pid_alive() -> None:
    assert common.pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not common.pid_alive(proc.pid) and not common.pid_alive(0)
