"""train_tokenizer.py: the text budget, the written folder (tokenizer.json and its metadata as one unit), refusing
to replace a tokenizer without --overwrite, option bounds, and a kill -9 mid-run (nothing lost, rerun cleans up)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tokenizer import TRAINED_SPECIAL_TOKENS
import tokenizers

import train_tokenizer as tt
from conftest import ROOT, run_script
from tokenizer import METADATA_FILE, TOKENIZER_FILE, compute_fingerprint


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Fixed pseudo-English text (seeded), one document per paragraph."""
    rng = np.random.default_rng(0)
    words = "the of and to in is was for on that with as by at from this be are or an it not which".split() + \
        [f"word{i}" for i in range(60)]
    paragraphs = [" ".join(rng.choice(words, size=int(rng.integers(20, 80)))) + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def train(text_file: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script("train_tokenizer.py", "--dataset_path_huggingface", str(text_file), "--vocab_size", "350",
                      "--output_path", str(out), *args, timeout=300)


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "error:" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp") or ".tmp-" in p.name)


def test_limited_documents_stops_at_the_character_budget() -> None:
    docs = ["abcd", "efghij", "klm", "nop"]
    assert list(tt.limited_documents(iter(docs), 7)) == ["abcd", "efg"]
    assert list(tt.limited_documents(iter(docs), 100)) == docs
    assert list(tt.limited_documents(iter(docs), 4)) == ["abcd"]


def test_written_folder_is_one_consistent_unit(tmp_path, text_file) -> None:
    result = train(text_file, tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([TOKENIZER_FILE, METADATA_FILE])
    meta = json.loads((tmp_path / "tok" / METADATA_FILE).read_text())
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / TOKENIZER_FILE))
    assert meta["fingerprint"] == compute_fingerprint(backend) and meta["vocab_size"] == 350
    text = text_file.read_text()
    assert meta["train_chars"] == len(text) - 2 * text.count("\n\n")  # every paragraph, without separators
    assert litter(tmp_path) == []


def test_an_existing_tokenizer_is_replaced_only_with_overwrite(tmp_path, text_file) -> None:
    out = tmp_path / "tok"
    assert train(text_file, out).returncode == 0
    before = folder_bytes(out)
    message = one_line_error(train(text_file, out, "--vocab_size", "300"))
    assert "already holds a tokenizer" in message and "--overwrite" in message
    assert folder_bytes(out) == before
    result = train(text_file, out, "--vocab_size", "300", "--overwrite")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["vocab_size"] == 300 and folder_bytes(out) != before and litter(tmp_path) == []
    # a folder holding other files is never emptied to make room
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    assert "notes.txt" in one_line_error(train(text_file, tmp_path / "mixed", "--overwrite"))
    assert (tmp_path / "mixed" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, expected", [
    (("--min_frequency", "-3"), "--min_frequency must be >= 1 (got -3)"),
    (("--vocab_size", "100"), "--vocab_size 100 is too small"),
    (("--vocab_size", "260"), f"at least {256 + len(TRAINED_SPECIAL_TOKENS)}"),
    (("--tokenizer_train_shard_size", "0"), "--tokenizer_train_shard_size must be >= 1"),
    (("--overwrite", "perhaps"), "expected a boolean"),
])
def test_bad_options_are_one_line_errors(tmp_path, text_file, args, expected) -> None:
    assert expected in one_line_error(train(text_file, tmp_path / "tok", *args))
    assert not (tmp_path / "tok").exists() and litter(tmp_path) == []


def test_bad_input_is_a_one_line_error(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert "is a file" in one_line_error(run_script("train_tokenizer.py", "--output_path", str(blocker),
                                                    timeout=300))
    assert "does not exist" in one_line_error(run_script(
        "train_tokenizer.py", "--dataset_path_huggingface", str(tmp_path / "missing.txt"), "--output_path",
        str(tmp_path / "tok"), timeout=300))
    assert blocker.read_text() == "not a folder" and not (tmp_path / "tok").exists() and litter(tmp_path) == []


@pytest.mark.slow
def test_kill_9_mid_run_loses_nothing_and_the_rerun_cleans_up(tmp_path, text_file) -> None:
    out = tmp_path / "tok"
    assert train(text_file, out).returncode == 0
    before = folder_bytes(out)
    process = subprocess.Popen([sys.executable, str(ROOT / "train_tokenizer.py"), "--vocab_size", "4096",
                                "--tokenizer_train_shard_size", "3000000", "--output_path", str(out), "--overwrite"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".tmp_tok_{process.pid}"
    deadline = time.monotonic() + 120
    while process.poll() is None and not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # into reading the text
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert folder_bytes(out) == before and partial.is_dir()
    result = train(text_file, out, "--vocab_size", "300", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / METADATA_FILE).read_text())["vocab_size"] == 300 and litter(tmp_path) == []
