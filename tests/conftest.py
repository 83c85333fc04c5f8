"""Shared test setup: the project root on sys.path, small thread counts, and helpers to run scripts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would; returns the completed process (never raises on exit code)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def script():
    return run_script
