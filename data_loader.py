"""Read the token shards written by tokenize_data.py: a resumable, rank-aware, memory-mapped batch loader.

Layout of a data folder (see tokenize_data.py):
    metadata.json            tokenizer {kind, fingerprint, vocab_size}, dtype, per-shard token/document counts and
                             crc32, per-split token/document/UTF-8 byte counts
    val_000000.npy ...       1-D token arrays (uint16 or uint32), the validation split
    train_000000.npy ...     the training split
    <shard>.idx.npy          per shard: offsets (within the shard) of the documents that start in it

A split is the concatenation of its shards in order. The loader cuts it into windows of seq_len + 1 tokens that
overlap by one token (window w covers tokens [w*seq_len, (w+1)*seq_len]); x is a window's first seq_len tokens
and y the same window shifted by one. Windows cross shard boundaries freely.

Windows are consumed as one global stream shared by all DDP ranks: the batch of step s on rank r is the windows at
stream positions [s*B*W + r*B, s*B*W + (r+1)*B) (B = batch_size, W = world_size), so ranks always read disjoint
windows and together cover the split once per epoch. Stream position p belongs to epoch p // num_windows and reads
window order_e[p % num_windows], where order_e is the identity or, with shuffle, a permutation seeded by (seed, e).
Epochs wrap explicitly (a batch may straddle two epochs); nothing ever raises StopIteration. The whole state is the
stream position, so state_dict()/load_state_dict() resume with exactly the next batch, also under another
world_size or batch_size as long as the position divides evenly (else it is rounded up to the next step).

Evaluation (eval_batches) reads a fixed set of steps x batch_size windows spread evenly over the split, dealt
round-robin to the ranks, so the validation loss of given weights does not depend on the number of ranks.
Each shard's crc32 is checked the first time a batch reads from it (about one pass of crc32 over the data per
run); `python data_loader.py --verify` checks every shard at once.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

from common import first_line
from config import CheckDataConfig, UserError, parse_config, run_main

# ----------------------------------------------------------------------------------------------------------------
# The shard format (tokenize_data.py writes it with these names; this module is their one home)

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKEN_DTYPES = ("uint16", "uint32")
SHARD_SUFFIX, DOC_INDEX_SUFFIX = ".npy", ".idx.npy"
_MAX_OPEN_SHARDS = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_file(split: str, index: int) -> str:
    return f"{split}_{index:06d}{SHARD_SUFFIX}"


def doc_index_file(shard: str) -> str:
    return shard[:-len(SHARD_SUFFIX)] + DOC_INDEX_SUFFIX


def is_format_file(name: str) -> bool:
    """Whether a file name is one tokenize_data.py writes into a data folder."""
    return name == METADATA_FILE or (name.startswith(tuple(f"{s}_" for s in SPLITS)) and name.endswith(SHARD_SUFFIX))


def _rerun_hint(data_dir: Path) -> str:
    return f"re-run tokenize_data.py --data_file_name {data_dir} --overwrite"


def read_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata.json of a data folder written by tokenize_data.py (UserError when missing or invalid)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"data folder '{data_dir}' does not exist; create it with "
                        f"tokenize_data.py --data_file_name {data_dir}")
    if not data_dir.is_dir():
        raise UserError(f"'{data_dir}' is not a folder; pass the folder written by tokenize_data.py")
    path = data_dir / METADATA_FILE
    if not path.exists():
        what = "is empty" if not any(data_dir.iterdir()) else f"has no {METADATA_FILE} (incomplete or not " \
                                                               f"written by tokenize_data.py)"
        raise UserError(f"data folder '{data_dir}' {what}; {_rerun_hint(data_dir)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"'{path}' is unreadable or corrupted ({type(error).__name__}); "
                        f"{_rerun_hint(data_dir)}") from error
    required = ("tokenizer", "dtype", "shards")
    if not isinstance(meta, dict) or any(k not in meta for k in required) or \
            not isinstance(meta["shards"], list) or not isinstance(meta["tokenizer"], dict):
        raise UserError(f"'{path}' is not valid tokenize_data.py metadata; {_rerun_hint(data_dir)}")
    if meta.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"'{path}' has format {meta['format']}, newer than this code understands "
                        f"({FORMAT_VERSION}); update the code or {_rerun_hint(data_dir)}")
    if meta["dtype"] not in TOKEN_DTYPES:
        raise UserError(f"'{path}' names an unsupported token dtype '{meta['dtype']}'; {_rerun_hint(data_dir)}")
    return meta


def open_shard(data_dir: Path, shard: dict[str, Any], dtype: str) -> np.ndarray:
    """Memory-map one shard and check it against its metadata entry (header, dtype, length, file size)."""
    path = data_dir / shard["file"]
    hint = _rerun_hint(data_dir)
    if not path.is_file():
        raise UserError(f"shard '{path}' listed in {METADATA_FILE} is missing; {hint}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # a bad header or a truncated file raise several types

        raise UserError(f"shard '{path}' is truncated or corrupted ({type(error).__name__}: "
                        f"{first_line(error, 120)}); {hint}") from error
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != np.dtype(dtype):
        raise UserError(f"shard '{path}' is corrupted (expected a 1-D {dtype} array, found "
                        f"{getattr(array, 'dtype', '?')} of shape {getattr(array, 'shape', '?')}); {hint}")
    if array.shape[0] != shard["tokens"]:
        raise UserError(f"shard '{path}' holds {array.shape[0]} tokens but {METADATA_FILE} records "
                        f"{shard['tokens']} (truncated or replaced); {hint}")
    expected_size = array.offset + array.nbytes if isinstance(array, np.memmap) else None
    if expected_size is not None and path.stat().st_size != expected_size:
        raise UserError(f"shard '{path}' is {path.stat().st_size} bytes, expected {expected_size} "
                        f"(truncated or padded); {hint}")
    return array


def shard_checksum(array: np.ndarray, block: int = 1 << 22) -> int:
    """crc32 of a shard's token bytes, read block by block (never the whole shard at once)."""
    crc = 0
    for start in range(0, array.shape[0], block):
        crc = zlib.crc32(np.ascontiguousarray(array[start:start + block]).tobytes(), crc)
    return crc


def check_tokenizer(meta: dict[str, Any], data_dir: Path, vocab_size: int | None = None,
                    tokenizer_fingerprint: str | None = None) -> None:
    """UserError when the shards were written by another tokenizer or hold ids the model cannot embed."""
    tok = meta["tokenizer"]
    if tokenizer_fingerprint is not None and tok.get("fingerprint") != tokenizer_fingerprint:
        raise UserError(f"the shards in '{data_dir}' were written with another tokenizer ({tok.get('kind')} "
                        f"{tok.get('fingerprint')}, the current one is {tokenizer_fingerprint}); "
                        f"{_rerun_hint(data_dir)} with the current tokenizer")
    if vocab_size is not None:
        max_token = max((s.get("max_token", -1) for s in meta["shards"]), default=-1)
        if tok.get("vocab_size", 0) > vocab_size or max_token >= vocab_size:
            raise UserError(f"the shards in '{data_dir}' use a {tok.get('vocab_size')}-token vocabulary (largest "
                            f"id {max_token}) but the model's vocab_size is {vocab_size}; use the matching "
                            f"tokenizer/--vocab_size or re-tokenize the data")


def bytes_per_token(data_dir: str | os.PathLike, split: str) -> float | None:
    """UTF-8 bytes of text per token of a split (the framing tokens count as tokens without bytes), for
    validation bits per byte = loss / ln 2 / bytes_per_token. None for folders written before byte counts were
    recorded."""
    info = read_metadata(data_dir).get("splits", {}).get(split, {})
    text_bytes, tokens = info.get("bytes"), info.get("tokens")
    if not isinstance(text_bytes, int) or not isinstance(tokens, int) or tokens <= 0:
        return None
    return text_bytes / tokens


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Mean cross-entropy in nats per token -> bits per UTF-8 byte of text (comparable across tokenizers)."""
    return loss / math.log(2) / bytes_per_token


def read_documents(data_dir: str | os.PathLike, split: str | None = None) -> Iterator[np.ndarray]:
    """Each document's framed tokens (e.g. bos + text + eos), in stream order, from the shards' document indexes
    (a document may continue across shards). split None means every split (val first, then train)."""
    data_dir = Path(data_dir)
    meta = read_metadata(data_dir)
    for name in (SPLITS[::-1] if split is None else (split,)):
        shards = [s for s in meta["shards"] if s.get("split") == name]
        open_document: list[np.ndarray] = []  # pieces of a document that started in an earlier shard
        for shard in shards:
            tokens = open_shard(data_dir, shard, meta["dtype"])
            starts = np.load(data_dir / shard["doc_index"], allow_pickle=False).tolist()
            if len(starts) != shard["documents"]:
                raise UserError(f"the document index of '{data_dir / shard['file']}' lists {len(starts)} documents "
                                f"but {METADATA_FILE} says {shard['documents']}; {_rerun_hint(data_dir)}")
            if not starts:
                open_document.append(np.asarray(tokens))
                continue
            open_document.append(np.asarray(tokens[:starts[0]]))
            if sum(p.size for p in open_document):
                yield np.concatenate(open_document)
            for start, end in zip(starts, starts[1:]):
                yield np.asarray(tokens[start:end])
            open_document = [np.asarray(tokens[starts[-1]:])]
        if sum(p.size for p in open_document):
            yield np.concatenate(open_document)


class ShardedLoader:
    """Batches of (x, y) LongTensors [batch_size, seq_len] from one split of a tokenize_data.py folder."""

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = False, seed: int = 0, vocab_size: int | None = None,
                 tokenizer_fingerprint: str | None = None, verify_checksums: bool = True) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.meta = read_metadata(self.data_dir)
        check_tokenizer(self.meta, self.data_dir, vocab_size, tokenizer_fingerprint)
        self.vocab_size = vocab_size if vocab_size is not None else self.meta["tokenizer"].get("vocab_size")
        self.dtype = self.meta["dtype"]
        self.shards = [s for s in self.meta["shards"] if s.get("split") == split and s.get("tokens", 0) > 0]
        self.tokens = sum(s["tokens"] for s in self.shards)
        if self.tokens < seq_len + 1:
            raise UserError(f"the {split} split of '{self.data_dir}' has {self.tokens} tokens, fewer than one "
                            f"sequence of seq_len+1 = {seq_len + 1}; use a shorter --seq_len or more data"
                            + (" (--val_tokens)" if split == "val" else ""))
        # check every shard of the split now (header, dtype, size), so a bad file fails at start-up; the checksum
        # of a shard's tokens is checked when a batch first reads from it (verify_checksums), once per loader
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        for i in range(len(self.shards)):
            self._shard(i, check=False)
        self._starts = np.cumsum([0] + [s["tokens"] for s in self.shards], dtype=np.int64)
        self.num_windows = (self.tokens - 1) // seq_len
        self.position = 0  # global stream position (in windows) of the next batch of rank 0
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    # ------------------------------------------------------------------------------------------------------------
    def _shard(self, i: int, check: bool = True) -> np.ndarray:
        array = self._open.get(i)
        if check and self.verify_checksums and i not in self._verified:
            self.check_shard(i, array)
        if array is None:
            # a plain ndarray view of the memory map (its base): slicing it skips np.memmap's per-slice overhead
            array = open_shard(self.data_dir, self.shards[i], self.dtype).view(np.ndarray)
            self._open[i] = array
            if len(self._open) > _MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return array

    def check_shard(self, i: int, array: np.ndarray | None = None) -> None:
        """Compare shard i's tokens with the crc32 recorded in the metadata (folders without one pass)."""
        shard = self.shards[i]
        if "crc32" in shard:
            if array is None:
                array = open_shard(self.data_dir, shard, self.dtype)
            if shard_checksum(array) != shard["crc32"]:
                raise UserError(f"shard '{self.data_dir / shard['file']}' is corrupted (its tokens do not match the "
                                f"checksum in {METADATA_FILE}); check the folder with `python data_loader.py "
                                f"--data_file_name {self.data_dir} --verify` and {_rerun_hint(self.data_dir)}")
        self._verified.add(i)

    def verify(self) -> None:
        """Check every shard's checksum now (reads the whole split once)."""
        for i in range(len(self.shards)):
            if i not in self._verified:
                self.check_shard(i)

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            if self.num_windows < 1 << 32:
                order = order.astype(np.uint32)  # half the memory for large splits
            self._orders[epoch] = order
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return order

    def window_index(self, position: int) -> int:
        """The window read at a global stream position."""
        epoch, offset = divmod(position, self.num_windows)
        order = self._order(epoch)
        return int(order[offset]) if order is not None else offset

    def read_tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated split (crossing shards as needed), as int64."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < length:
            array = self._shard(shard)
            lo = start + filled - int(self._starts[shard])
            take = min(length - filled, array.shape[0] - lo)
            out[filled:filled + take] = array[lo:lo + take]
            filled += take
            shard += 1
        return out

    @property
    def epoch(self) -> int:
        """The epoch of the next window this rank reads."""
        return (self.position + self.rank * self.batch_size) // self.num_windows

    @property
    def step(self) -> int:
        """Batches taken so far (the same on every rank)."""
        return self.position // (self.batch_size * self.world_size)

    def batch_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch for the global stream position `position` (no state change)."""
        first = position + self.rank * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_windows)
        windows = offsets
        if self.shuffle:
            windows = np.empty_like(offsets)
            for epoch in np.unique(epochs).tolist():
                mask = epochs == epoch
                windows[mask] = self._order(epoch)[offsets[mask]]
        return self.rows_at(windows)

    def rows_at(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for these window indices, one row each."""
        length = self.seq_len + 1
        rows = np.empty((len(windows), length), dtype=np.int64)
        starts = np.asarray(windows, dtype=np.int64) * self.seq_len
        shard_of = np.searchsorted(self._starts, starts, side="right") - 1
        local = starts - self._starts[shard_of]
        for i, (shard, lo, start) in enumerate(zip(shard_of.tolist(), local.tolist(), starts.tolist())):
            array = self._shard(shard)
            if lo + length <= array.shape[0]:
                rows[i] = array[lo:lo + length]
            else:  # the window crosses into the next shard(s)
                rows[i] = self.read_tokens(start, length)
        if self.vocab_size is not None and rows.size and rows.max() >= self.vocab_size:
            raise UserError(f"a shard in '{self.data_dir}' holds token id {int(rows.max())} >= vocab_size "
                            f"{self.vocab_size} (corrupted data); {_rerun_hint(self.data_dir)}")
        import torch  # here, so that reading metadata and checking shards (the CLI) does not pay for importing torch

        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.position)
        self.position += self.batch_size * self.world_size
        return batch

    def reset(self) -> None:
        self.position = 0

    def eval_windows(self, steps: int, rank: int | None = None, world_size: int | None = None) -> np.ndarray:
        """The window indices eval_batches gives `rank` (see there)."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        total = self.num_windows if steps <= 0 else min(steps * self.batch_size, self.num_windows)
        spread = np.arange(total, dtype=np.int64) * self.num_windows // total  # evenly over the whole split
        return spread[rank::world_size]

    def eval_batches(self, steps: int, rank: int | None = None, world_size: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed evaluation set, the same whatever the number of ranks: steps x batch_size windows spread evenly
        over the split (window k * num_windows // N for k < N; the whole split when steps <= 0 or when it holds no
        more, so no window counts twice; the split's documents come from the whole source, in source order, so
        a short evaluation must not read just its start), dealt round-robin: `rank` (default: the loader's) of `world_size` (default: the loader's) gets
        windows rank, rank + world_size, ... in batches of at most batch_size rows. When world_size does not
        divide the number of windows, the first ranks get one window more, so ranks can get different numbers
        of batches (or none): average as sum(batch mean loss x rows) / sum(rows) over every rank. No state
        change."""
        windows = self.eval_windows(steps, rank, world_size)
        for start in range(0, len(windows), self.batch_size):
            yield self.rows_at(windows[start:start + self.batch_size])

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch": self.epoch, "step": self.step, "split": self.split,
                "seq_len": self.seq_len, "num_windows": self.num_windows, "tokens": self.tokens,
                "shuffle": self.shuffle, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "fingerprint": self.meta["tokenizer"].get("fingerprint")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state: the next batch is exactly the one the saved loader would have produced
        (also under a different world_size/batch_size when the saved position divides evenly; otherwise the
        position is rounded up to the next step)."""
        mismatches = [f"{key} {state.get(key)!r} -> {value!r}" for key, value in
                      (("split", self.split), ("seq_len", self.seq_len), ("tokens", self.tokens),
                       ("shuffle", self.shuffle), ("seed", self.seed))
                      if key in state and state[key] != value]
        if mismatches:
            raise UserError(f"cannot resume the data loader exactly: the saved state differs ({'; '.join(mismatches)}"
                            f"); use the same data, --seq_len, --shuffle and --seed, or start a fresh run")
        position = int(state["position"])
        per_step = self.batch_size * self.world_size
        # another batch_size/world_size whose step does not divide the position: round up to the next step, so
        # that every rank (all loading the same state) agrees; this skips fewer than one step's windows
        self.position = -(-position // per_step) * per_step

    def __repr__(self) -> str:
        return (f"ShardedLoader({self.data_dir}, split={self.split}, tokens={self.tokens}, "
                f"windows={self.num_windows}, batch={self.batch_size}x{self.seq_len}, rank={self.rank}/"
                f"{self.world_size}, shuffle={self.shuffle})")


# ----------------------------------------------------------------------------------------------------------------
# Command line: check a data folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg: CheckDataConfig = parse_config(CheckDataConfig, argv)
    data_dir = Path(cfg.data_file_name)
    meta = read_metadata(data_dir)
    vocab_size = fingerprint = None
    if cfg.check_tokenizer:
        from tokenizer import load_tokenizer
        tokenizer = load_tokenizer(cfg)
        vocab_size, fingerprint = tokenizer.vocab_size, tokenizer.fingerprint
    tok = meta["tokenizer"]
    print(f"{data_dir}: {meta.get('total_tokens', 0):,} tokens, {meta.get('total_documents', 0):,} documents, "
          f"{meta['dtype']}, {tok.get('kind')} tokenizer {tok.get('fingerprint')} (vocab {tok.get('vocab_size')}); "
          f"source: {meta.get('source', '?')}")
    for split in SPLITS:
        loader = ShardedLoader(data_dir, split, 1, cfg.seq_len, vocab_size=vocab_size,
                               tokenizer_fingerprint=fingerprint)
        if cfg.verify:
            loader.verify()
        per_token = bytes_per_token(data_dir, split)
        print(f"  {split}: {loader.tokens:,} tokens in {len(loader.shards)} shard(s), "
              f"{loader.num_windows:,} windows of {cfg.seq_len}+1 tokens"
              + (f", {per_token:.3f} UTF-8 bytes per token" if per_token else "")
              + (": checksums ok" if cfg.verify else ": ok"))
    return meta


if __name__ == "__main__":
    run_main(main)
