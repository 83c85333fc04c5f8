"""data_loader.py on synthetic shards: the loader against a naive concatenate-then-slice reference (rank split,
shuffle, resume), the fixed evaluation set for any world size, checksums checked at first read, bytes_per_token,
and one-line errors for damaged folders."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import data_loader as dl
from config import UserError
from conftest import run_script


def write_synthetic(out: Path, shard_sizes: dict[str, list[int]], vocab_size: int = 1 << 20,
                    fingerprint: str = "synthetic0000000", seed: int = 0, split_bytes: dict | None = None
                    ) -> dict[str, np.ndarray]:
    """Shards of distinct token values (so every window is identifiable), in the documented metadata format."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, streams, offset = [], {}, 0
    for split, sizes in shard_sizes.items():
        pieces = []
        for index, size in enumerate(sizes):
            data = (np.arange(offset, offset + size) % vocab_size).astype(np.uint32)
            offset += size
            name = dl.shard_file(split, index)
            np.save(out / name, data)
            starts = np.sort(rng.choice(size, size=min(3, size), replace=False)).astype(np.int64)
            if index == 0:
                starts[0] = 0
            np.save(out / dl.doc_index_file(name), starts)
            shards.append({"file": name, "doc_index": dl.doc_index_file(name), "split": split, "index": index,
                           "tokens": size, "documents": len(starts), "max_token": int(data.max()),
                           "crc32": zlib.crc32(data.tobytes())})
            pieces.append(data)
        streams[split] = np.concatenate(pieces).astype(np.int64)
    meta = {"format": 1, "tokenizer": {"kind": "trained", "fingerprint": fingerprint, "vocab_size": vocab_size},
            "dtype": "uint32", "shards": shards, "total_tokens": offset}
    if split_bytes is not None:
        meta["splits"] = {s: {"tokens": int(len(streams[s])), "bytes": b} for s, b in split_bytes.items()}
    (out / dl.METADATA_FILE).write_text(json.dumps(meta))
    return streams


def naive_batches(stream: np.ndarray, batch: int, seq: int, rank: int, world: int, steps: int,
                  order_of_epoch=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reference: the global window stream, sliced per rank by plain indexing into the concatenated split."""
    num_windows = (len(stream) - 1) // seq
    out = []
    for step in range(steps):
        rows = []
        for i in range(batch):
            p = step * batch * world + rank * batch + i
            epoch, k = divmod(p, num_windows)
            w = order_of_epoch(epoch)[k] if order_of_epoch else k
            rows.append(stream[w * seq: w * seq + seq + 1])
        rows = np.stack(rows)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def test_loader_matches_naive_reference_across_shards(tmp_path) -> None:
    streams = write_synthetic(tmp_path, {"val": [40], "train": [37, 50, 13, 61, 5]})
    loader = dl.ShardedLoader(tmp_path, "train", batch_size=3, seq_len=7, vocab_size=1 << 20)
    assert loader.tokens == 166 and loader.num_windows == 165 // 7
    assert all(isinstance(a.base, np.memmap) for a in loader._open.values())  # memory-mapped, never read whole
    steps = 20  # 60 windows: more than two epochs of 23, batches straddle epoch ends
    expected = naive_batches(streams["train"], 3, 7, 0, 1, steps)
    for (x, y), (ex, ey) in zip((loader.next_batch() for _ in range(steps)), expected):
        assert x.dtype == torch.long and x.shape == (3, 7) and x.is_contiguous() and y.is_contiguous()
        assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey)
    assert loader.epoch == 60 // 23


def test_loader_random_configurations_match_reference(tmp_path) -> None:
    """Random (seeded) shard layouts, sequence lengths, batch sizes and world sizes: every rank's batches equal
    the naive reference over a few epochs, with and without shuffling."""
    rng = np.random.default_rng(2024)
    for trial in range(12):
        out = tmp_path / str(trial)
        sizes = rng.integers(1, 60, size=int(rng.integers(1, 6))).tolist()
        seq = int(rng.integers(1, 12))
        if sum(sizes) < seq + 1:
            sizes.append(seq + 1)
        streams = write_synthetic(out, {"val": [5], "train": sizes}, seed=trial)
        batch, world, shuffle = int(rng.integers(1, 5)), int(rng.integers(1, 4)), bool(rng.integers(0, 2))
        num_windows = (len(streams["train"]) - 1) // seq
        order = lambda e: np.random.default_rng([3, e]).permutation(num_windows)  # noqa: E731
        steps = max(2, 3 * num_windows // (batch * world) + 1)
        for rank in range(world):
            loader = dl.ShardedLoader(out, "train", batch, seq, rank=rank, world_size=world, shuffle=shuffle, seed=3)
            for x, (ex, ey) in zip((loader.next_batch() for _ in range(steps)),
                                   naive_batches(streams["train"], batch, seq, rank, world, steps,
                                                 order if shuffle else None)):
                assert np.array_equal(x[0].numpy(), ex) and np.array_equal(x[1].numpy(), ey), \
                    (sizes, seq, batch, world, shuffle, rank)


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_are_disjoint_and_cover_an_epoch(tmp_path, shuffle: bool) -> None:
    streams = write_synthetic(tmp_path, {"val": [30], "train": [100, 77, 144]})
    seq, batch, world = 8, 2, 2
    loaders = [dl.ShardedLoader(tmp_path, "train", batch, seq, rank=r, world_size=world, shuffle=shuffle, seed=5)
               for r in range(world)]
    num_windows = loaders[0].num_windows
    assert num_windows == (321 - 1) // seq == 40 and num_windows % (batch * world) == 0
    seen = [[], []]
    for _ in range(num_windows // (batch * world)):
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            assert torch.equal(y, x + 1)  # targets are the next tokens (synthetic tokens count up)
            seen[r] += ((x[:, 0] - int(streams["train"][0])) // seq).tolist()  # window index of each row
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(num_windows))
    if shuffle:
        assert seen[0] + seen[1] != sorted(seen[0] + seen[1])  # a new epoch reshuffles; the same seed gives the same order
        order = lambda e: np.random.default_rng([5, e]).permutation(num_windows)  # noqa: E731
        ref = naive_batches(streams["train"], batch, seq, 1, world, 15, order)
        again = dl.ShardedLoader(tmp_path, "train", batch, seq, rank=1, world_size=world, shuffle=True, seed=5)
        for ex, _ in ref:
            assert np.array_equal(again.next_batch()[0].numpy(), ex)
        assert loaders[0].epoch == 1
        epochs = [[loaders[0].window_index(e * num_windows + k) for k in range(num_windows)] for e in (0, 1)]
        assert epochs[0] != epochs[1] and sorted(epochs[1]) == list(range(num_windows))


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_continues_with_the_exact_next_batch(tmp_path, shuffle: bool) -> None:
    write_synthetic(tmp_path, {"val": [30], "train": [53, 71, 29]})
    make = lambda r=0, w=2: dl.ShardedLoader(tmp_path, "train", 3, 6, rank=r, world_size=w,  # noqa: E731
                                             shuffle=shuffle, seed=11)
    uninterrupted = make()
    reference = [uninterrupted.next_batch() for _ in range(12)]
    first = make()
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON/torch.save round trip
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.step == 5
    for x, y in reference[5:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    # the same stream position under one rank with twice the batch: rank 0's rows come first
    single = dl.ShardedLoader(tmp_path, "train", 6, 6, shuffle=shuffle, seed=11)
    single.load_state_dict(state)
    rank1 = make(r=1)
    rank1.load_state_dict(state)
    assert torch.equal(single.next_batch()[0], torch.cat([reference[5][0], rank1.next_batch()[0]]))
    with pytest.raises(UserError, match="seq_len"):
        dl.ShardedLoader(tmp_path, "train", 3, 5, world_size=2).load_state_dict(state)
    other = dl.ShardedLoader(tmp_path, "train", 4, 6, shuffle=shuffle, seed=11)  # 30 windows taken, step of 4
    other.load_state_dict(state)
    assert other.position == 32  # rounded up to the next whole step


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the same windows whatever the world size


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_eval_batches_cover_the_same_windows_for_any_world_size(tmp_path, world: int) -> None:
    """Ranks together read exactly the same steps x batch_size windows, spread evenly over the split, each once,
    so a loss averaged by rows over the ranks is the same for every world size (3 does not divide 5 x 2)."""
    streams = write_synthetic(tmp_path, {"val": [33, 40], "train": [20]})
    steps, batch, seq = 5, 2, 6
    val = streams["val"]
    seen, rows_per_rank = [], []
    for rank in range(world):
        loader = dl.ShardedLoader(tmp_path, "val", batch, seq, rank=rank, world_size=world)
        rows = 0
        for x, y in loader.eval_batches(steps):
            assert 1 <= x.shape[0] <= batch and torch.equal(y[:, :-1], x[:, 1:])
            for row_x, row_y in zip(x.numpy(), y.numpy()):
                w = (int(row_x[0]) - int(val[0])) // seq
                assert np.array_equal(row_x, val[w * seq:w * seq + seq])  # independent slicing reference
                assert np.array_equal(row_y, val[w * seq + 1:w * seq + seq + 1])
                seen.append(w)
            rows += x.shape[0]
        rows_per_rank.append(rows)
        assert loader.position == 0  # evaluation changes no state
        assert loader.eval_windows(steps).tolist() == [k * 12 // 10 for k in range(10)][rank::world]
    expected = [k * 12 // 10 for k in range(10)]  # 12 windows in the split, 10 evaluated: 0, 1, 2, 3, 4, 6, 7...
    assert loader.num_windows == 12 and sorted(seen) == expected
    assert max(rows_per_rank) - min(rows_per_rank) <= 1
    # the old signature (no rank/world arguments) uses the loader's own rank; explicit arguments override it
    loader = dl.ShardedLoader(tmp_path, "val", batch, seq)
    assert [x.tolist() for x, _ in loader.eval_batches(steps, rank=1, world_size=2)] == \
        [x.tolist() for x, _ in dl.ShardedLoader(tmp_path, "val", batch, seq, rank=1, world_size=2).eval_batches(steps)]


def test_eval_batches_never_repeat_a_window(tmp_path) -> None:
    """More steps than the split holds: every window once (no double counting); steps <= 0 means all."""
    write_synthetic(tmp_path, {"val": [25], "train": [20]})
    loader = dl.ShardedLoader(tmp_path, "val", 2, 4)
    assert loader.num_windows == 6
    for steps in (0, -1, 3, 100):
        windows = [int(x[0]) // 4 for batch, _ in loader.eval_batches(steps) for x in batch]
        assert windows == list(range(6)), steps
    assert [len(b) for b, _ in loader.eval_batches(2)] == [2, 2]
    assert [int(x[0]) // 4 for b, _ in loader.eval_batches(1) for x in b] == [0, 3]  # the start and the middle
    with pytest.raises(UserError, match="outside world_size"):
        list(loader.eval_batches(2, rank=2, world_size=2))


# ----------------------------------------------------------------------------------------------------------------
# Checksums and bytes per token


def test_corrupted_tokens_fail_at_first_read_of_their_shard(tmp_path) -> None:
    """Tokens changed to other valid ids (same size, headers intact): the loader opens the folder, and the
    first batch that reads the damaged shard is a one-line UserError naming it and `data_loader.py --verify`;
    batches from intact shards still work."""
    write_synthetic(tmp_path, {"val": [20], "train": [40, 40, 40]}, vocab_size=1000)
    shard = tmp_path / "train_000002.npy"
    data = np.load(shard)
    data[5] = (data[5] + 1) % 1000
    np.save(shard, data)
    loader = dl.ShardedLoader(tmp_path, "train", 2, 4, vocab_size=1000)
    loader.next_batch()  # windows 0, 1: shard 0 only
    loader.position = 12  # windows 12, 13 (tokens 48..57): shard 1
    loader.next_batch()
    loader.position = 22
    with pytest.raises(UserError) as error:
        loader.next_batch()
    message = str(error.value)
    assert "train_000002.npy" in message and "python data_loader.py" in message and "--verify" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="train_000002.npy"):
        dl.ShardedLoader(tmp_path, "train", 2, 4).verify()
    unchecked = dl.ShardedLoader(tmp_path, "train", 2, 4, verify_checksums=False)
    unchecked.position = 22
    unchecked.next_batch()
    result = run_script("data_loader.py", "--data_file_name", str(tmp_path), "--verify", timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "train_000002.npy" in result.stderr
    assert run_script("data_loader.py", "--data_file_name", str(tmp_path), timeout=120).returncode == 0


def test_each_shard_is_checksummed_once(tmp_path, monkeypatch) -> None:
    write_synthetic(tmp_path, {"val": [20], "train": [30, 30, 30]})
    calls = []
    real = dl.shard_checksum
    monkeypatch.setattr(dl, "shard_checksum", lambda a, *k: calls.append(a.shape[0]) or real(a, *k))
    loader = dl.ShardedLoader(tmp_path, "train", 4, 5, shuffle=True, seed=1)
    assert calls == []  # opening checks headers only
    for _ in range(10):  # two epochs of 17 windows
        loader.next_batch()
    assert sorted(calls) == [30, 30, 30]


def test_bytes_per_token(tmp_path) -> None:
    write_synthetic(tmp_path / "new", {"val": [20], "train": [30]}, split_bytes={"val": 50, "train": 90})
    assert dl.bytes_per_token(tmp_path / "new", "val") == 50 / 20
    assert dl.bytes_per_token(tmp_path / "new", "train") == 90 / 30
    write_synthetic(tmp_path / "old", {"val": [20], "train": [30]})  # written before byte counts existed
    assert dl.bytes_per_token(tmp_path / "old", "val") is None
    # bits per byte from a loss in nats: loss x tokens / (ln 2 x bytes)
    assert dl.bits_per_byte(2.0, 2.5) == pytest.approx(2.0 * 20 / (math.log(2) * 50))


# ----------------------------------------------------------------------------------------------------------------
# Damaged folders and bad input: one-line errors


def test_loader_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        dl.ShardedLoader(tmp_path / "missing", "train", 2, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        dl.ShardedLoader(tmp_path / "empty", "train", 2, 4)
    write_synthetic(tmp_path / "d", {"val": [20], "train": [50, 50]}, vocab_size=1000, fingerprint="aaaa")
    with pytest.raises(UserError, match="fewer than one sequence"):
        dl.ShardedLoader(tmp_path / "d", "val", 2, 20)
    with pytest.raises(UserError, match="another tokenizer"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4, tokenizer_fingerprint="bbbb")
    with pytest.raises(UserError, match="vocab_size"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4, vocab_size=99)
    shard = tmp_path / "d" / "train_000001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(UserError, match="truncated or corrupted"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4)
    shard.write_bytes(good + b"\0" * 8)
    with pytest.raises(UserError, match="truncated or padded"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4)
    shard.write_bytes(b"garbage" * 40)
    with pytest.raises(UserError, match="truncated or corrupted"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4)
    np.save(shard, np.arange(50, dtype=np.uint16))
    with pytest.raises(UserError, match="expected a 1-D uint32"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4)
    data = np.frombuffer(good[-200:], dtype=np.uint32).copy()
    shard.write_bytes(good[:-200] + np.full_like(data, 5000).tobytes())  # same size, ids out of range
    loader = dl.ShardedLoader(tmp_path / "d", "train", 25, 4, verify_checksums=False)
    with pytest.raises(UserError, match=">= vocab_size"):
        loader.next_batch()
    (tmp_path / "d" / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupted"):
        dl.read_metadata(tmp_path / "d")


def test_command_line_bad_input_is_one_line(tmp_path) -> None:
    for args, expected in [(("--data_file_name", str(tmp_path / "nowhere")), "does not exist"),
                           (("--seq_len", "0"), "--seq_len must be >= 1"),
                           (("--verify", "maybe"), "expected a boolean")]:
        result = run_script("data_loader.py", *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    help_text = run_script("data_loader.py", "--help", timeout=120)
    assert help_text.returncode == 0 and "--verify" in help_text.stdout


def test_format_names(tmp_path) -> None:
    assert dl.shard_file("train", 3) == "train_000003.npy" and dl.doc_index_file("val_000001.npy") == \
        "val_000001.idx.npy"
    assert dl.token_dtype(65536) == np.uint16 and dl.token_dtype(65537) == np.uint32
    assert all(dl.is_format_file(n) for n in ("metadata.json", "train_000000.npy", "val_000002.idx.npy"))
    assert not any(dl.is_format_file(n) for n in ("notes.txt", "train.py", ".tmp_x", "model.npy"))


def test_kill_9_while_verifying_changes_nothing(tmp_path) -> None:
    """data_loader.py only reads: a kill -9 in the middle of --verify leaves the folder as it was, and a rerun
    works."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    write_synthetic(tmp_path / "d", {"val": [2000], "train": [300_000] * 8})
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    process = subprocess.Popen([sys.executable, str(ROOT / "data_loader.py"), "--data_file_name", str(tmp_path / "d"),
                                "--verify"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    result = run_script("data_loader.py", "--data_file_name", str(tmp_path / "d"), "--verify", timeout=120)
    assert result.returncode == 0 and "checksums ok" in result.stdout, result.stderr
