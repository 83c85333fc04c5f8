"""Shared test setup: the project root on sys.path, small thread counts, helpers to run scripts, and the shared
fixtures (a tokenized corpus, one torch thread)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """A 1024-token BPE trained on the built-in corpus and the whole corpus tokenized into shards (built once per
    session: the training and the parallel tests share it)."""
    root = tmp_path_factory.mktemp("train_corpus")
    tok, data = root / "tokenizer", root / "data"
    r = run_script("train_tokenizer.py", "--vocab_size", "1024", "--tokenizer_train_shard_size", "300000",
                   "--output_path", str(tok))
    assert r.returncode == 0, r.stderr
    r = run_script("tokenize_data.py", "--tokenizer_path", str(tok), "--data_file_name", str(data),
                   "--encoded_dataset_shard_size", "200000", "--val_tokens", "30000")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(root=root, tokenizer=tok, data=data)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and never spins against the other tests' processes (two OpenMP threads
    on a busy 2-core machine made each tiny float64 matmul wait for a scheduler slice: ~10 s per decode test).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
