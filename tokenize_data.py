"""Tokenize a dataset into fixed-size .npy token shards for training.

    python tokenize_data.py --dataset_path_huggingface builtin --tokenizer_path tokenizer --data_file_name data
    python tokenize_data.py --dataset_path_huggingface HuggingFaceFW/fineweb-edu --dataset_sub_set sample-10BT \\
        --load_mistral_tokenizer --data_file_name data_nemo --max_tokens 100000000

Documents are streamed from the source (corpus.iter_documents), encoded in parallel on every core by the
tokenizer's Rust `encode_batch` (chunks of documents, in order, while the main thread reads the next documents
and writes the previous chunk), and framed as the tokenizer frames a document (tokenizer.encode_document:
bos + text + eos). The token stream is cut into shards of --encoded_dataset_shard_size tokens, uint16 when the
vocabulary fits and uint32 otherwise. For Mistral's tekken vocabulary the encoder is tiktoken by default
(--encoder auto): the same byte-level BPE by rank, as mistral_common itself runs it, 2-4x faster than
`tokenizers` here; its ids are checked against the tokenizer's on the first documents of every run, and
tests/test_tokenize_data.py checks them on the whole built-in corpus. Each document is encoded independently, so the
output does not depend on the chunking or on --num_workers (threads).

Splits: every document gets a key, the splitmix64 hash of (--val_seed, its position in the source); the validation
split is the documents with the smallest keys that together fit in --val_tokens tokens (by default --val_fraction
of all tokens, at most one shard), so it is a seeded sample spread over the whole source, whatever order the
source is in. The selection runs while streaming: the candidates (at most that many tokens) wait in memory, a
candidate pushed out by documents with smaller keys goes to the training split, and the validation split is
written, in source order, at the end. The training split keeps the source order except for those documents.

Output folder (--data_file_name), in the format data_loader.py owns:
    val_000000.npy, train_000000.npy, ...   1-D token arrays; a document may continue into the next shard
    <shard>.idx.npy                         int64 offsets (within the shard) of the documents that start in it
    metadata.json                           tokenizer (kind, fingerprint, vocab_size), dtype, framing, source,
                                            per-shard split/tokens/documents/max_token/crc32, per-split
                                            tokens/documents/UTF-8 bytes of text
The folder is built under a temporary name beside --data_file_name and renamed into place once complete
(common.atomic_folder): a failed or killed run never leaves a partial dataset, and with --overwrite the old one
stays until the new one is done (a killed run's temporary folder is removed by the next run). The output is
deterministic: the same input and tokenizer give byte-identical files whatever --num_workers is.
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from common import atomic_folder, atomic_write, check_destination, recover_atomic_folder
from config import TokenizeDataConfig, UserError, parse_config, remove_new_folder_on_failure, run_main
from data_loader import FORMAT_VERSION, METADATA_FILE, doc_index_file, is_format_file, shard_file, token_dtype

CHUNK_CHARS = 1 << 19          # characters of text per encode_batch call (~100k tokens)
CHUNK_DOCUMENTS = 8192         # ... or this many documents, whichever comes first
IN_FLIGHT = 2                  # chunks being encoded ahead of the writer
SELF_CHECK_DOCUMENTS, SELF_CHECK_CHARS = 200, 1 << 16  # text encoded by both engines before tiktoken is used

Encoder = Callable[[Sequence[str]], "tuple[np.ndarray, np.ndarray]"]


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def document_framing(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens tokenizer.encode_document puts before and after a document's text (e.g. [bos], [eos])."""
    for probe in ("framing probe", "a", "x y z"):
        inner, framed = tokenizer.encode(probe), tokenizer.encode_document(probe)
        for start in range(len(framed) - len(inner) + 1):
            if inner and framed[start:start + len(inner)] == inner:
                return list(framed[:start]), list(framed[start + len(inner):])
    raise RuntimeError("tokenizer.encode_document does not contain tokenizer.encode of the same text")


def tokenizers_encoder(tokenizer) -> Encoder:
    """Text -> (flat uint32 ids of every document, int64 length per document), via the Rust encode_batch."""
    def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = tokenizer.encode_batch(list(texts))
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths
    return encode


def tiktoken_encoding(tokenizer) -> tuple[Any, int]:
    """A tiktoken Encoding with the same byte-level BPE as `tokenizer`, and the id offset of its ranks.

    Applies to tokenizers laid out like Mistral's tekken (tokenizer.tekken_to_hf): no normalizer, a Split(regex)
    + ByteLevel pre-tokenizer, a BPE model with ignore_merges whose byte tokens have ids num_special + rank, and
    the special tokens at ids [0, num_special). tiktoken applies the same regex and then merges by rank, which is
    what mistral_common does with the same file. Raises ValueError when the tokenizer is not of this form."""
    import tiktoken
    from tokenizer import bytes_to_unicode

    backend = tokenizer.backend
    if backend.normalizer is not None:
        raise ValueError("the tokenizer has a normalizer")
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    steps = pre.get("pretokenizers", [])
    if (pre.get("type") != "Sequence" or len(steps) != 2 or steps[0].get("type") != "Split"
            or "Regex" not in steps[0].get("pattern", {}) or steps[0].get("behavior") != "Isolated"
            or steps[0].get("invert") or steps[1].get("type") != "ByteLevel" or steps[1].get("add_prefix_space")
            or steps[1].get("use_regex")):
        raise ValueError("the pre-tokenizer is not Split(regex) + ByteLevel")
    if not getattr(backend.model, "ignore_merges", False):
        raise ValueError("the BPE model does not ignore merges for whole-vocabulary pre-tokens")
    specials = sorted(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    num_special = len(specials)
    if specials != list(range(num_special)):
        raise ValueError("the special tokens are not ids [0, num_special)")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        if token_id >= num_special:
            try:
                ranks[bytes(byte_of[c] for c in token)] = token_id - num_special
            except KeyError:
                raise ValueError(f"token {token_id} is not a byte-level token") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) + num_special != tokenizer.vocab_size:
        raise ValueError("the byte tokens' ids are not contiguous after the special tokens")
    encoding = tiktoken.Encoding(name=f"{tokenizer.kind}-{tokenizer.fingerprint}", pat_str=steps[0]["pattern"]["Regex"],
                                 mergeable_ranks=ranks, special_tokens={})
    return encoding, num_special


def tiktoken_encoder(tokenizer, workers: int) -> Encoder:
    """Like tokenizers_encoder, with tiktoken (see tiktoken_encoding) on `workers` threads: each thread encodes a
    contiguous slice of the chunk straight into numpy (tiktoken releases the GIL), results are kept in order."""
    encoding, offset = tiktoken_encoding(tokenizer)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiktoken")

    def encode_slice(texts: Sequence[str]) -> list[np.ndarray]:
        return [encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]

    def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, -(-len(texts) // (workers * 4)))
        arrays = [a for part in pool.map(encode_slice, [texts[i:i + step] for i in range(0, len(texts), step)])
                  for a in part]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        flat = flat.astype(np.uint32, copy=False)
        flat += np.uint32(offset)
        return flat, lengths

    encode.engine = "tiktoken"  # type: ignore[attr-defined]
    return encode


def make_encoder(tokenizer, engine: str = "auto", workers: int = 1, sample: Sequence[str] = ()) -> Encoder:
    """The encoder for `engine`; auto picks tiktoken for Mistral's tokenizer when it applies and agrees with the
    tokenizer on `sample` (else the tokenizer's own encode_batch)."""
    reference = tokenizers_encoder(tokenizer)
    reference.engine = "tokenizers"  # type: ignore[attr-defined]
    if engine == "tokenizers" or (engine == "auto" and tokenizer.kind != "mistral"):
        return reference
    try:
        fast = tiktoken_encoder(tokenizer, workers)
    except (ImportError, ValueError) as error:
        if engine == "tiktoken":
            raise UserError(f"--encoder tiktoken does not apply to this tokenizer ({error}); use --encoder "
                            f"tokenizers") from None
        return reference
    if sample:
        got, expected = fast(list(sample)), reference(list(sample))
        if not (np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])):
            if engine == "tiktoken":
                raise UserError("tiktoken's ids differ from the tokenizer's on the first documents; use "
                                "--encoder tokenizers")
            print("warning: tiktoken's ids differ from the tokenizer's on the first documents; using the "
                  "tokenizer's own encode_batch", file=sys.stderr)
            return reference
    return fast


def frame(flat: np.ndarray, lengths: np.ndarray, prefix: Sequence[int], suffix: Sequence[int],
          dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Insert each document's prefix/suffix tokens: returns (framed tokens, framed length per document)."""
    p, s = len(prefix), len(suffix)
    framed_lengths = lengths + (p + s)
    ends = np.cumsum(framed_lengths)
    starts = ends - framed_lengths
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_text = np.ones(out.shape[0], dtype=bool)
    for k, token in enumerate(prefix):
        out[starts + k] = token
        is_text[starts + k] = False
    for k, token in enumerate(suffix):
        out[ends - s + k] = token
        is_text[ends - s + k] = False
    out[is_text] = flat
    return out, framed_lengths


def chunk_documents(documents: Iterable[str], max_documents: int = 0, chunk_chars: int | None = None,
                    chunk_documents: int | None = None) -> Iterator[list[str]]:
    """Group the document stream into chunks of about chunk_chars characters (order kept); the sizes default to
    the module's CHUNK_CHARS / CHUNK_DOCUMENTS at call time."""
    chunk_chars = chunk_chars or CHUNK_CHARS
    chunk_documents = chunk_documents or CHUNK_DOCUMENTS
    if max_documents > 0:
        documents = itertools.islice(documents, max_documents)
    chunk: list[str] = []
    chars = 0
    for text in documents:
        chunk.append(text)
        chars += len(text)
        if chars >= chunk_chars or len(chunk) >= chunk_documents:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def utf8_lengths(texts: Sequence[str]) -> np.ndarray:
    """UTF-8 bytes of each text (int64)."""
    return np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts), dtype=np.int64,
                       count=len(texts))


def encoded_chunks(documents: Iterable[str], encode: Encoder, prefix: Sequence[int], suffix: Sequence[int],
                   dtype: np.dtype, max_documents: int = 0, chunk_chars: int | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Framed (tokens, per-document lengths, per-document UTF-8 bytes of text) per chunk, in order. Encoding runs
    in a background thread (the Rust encoder releases the GIL and uses every core) while the caller consumes the
    previous chunk."""
    def work(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat, lengths = encode(texts)
        return (*frame(flat, lengths, prefix, suffix, dtype), utf8_lengths(texts))

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        try:
            for texts in chunk_documents(documents, max_documents, chunk_chars):
                pending.append(pool.submit(work, texts))
                if len(pending) > IN_FLIGHT:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: Path, data: Any) -> None:

    atomic_write(path, data, "--data_file_name")


def _save(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


class SplitWriter:
    """Cuts one split's token stream into shards of shard_size tokens, written as soon as they are full."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, dtype: np.dtype) -> None:
        self.out_dir, self.split, self.shard_size, self.dtype = out_dir, split, shard_size, dtype
        self.buffer = np.empty(shard_size, dtype=dtype)
        self.filled = 0
        self.doc_starts: list[np.ndarray] = []  # offsets within the current buffer
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: int) -> None:
        """Append whole documents (tokens = their framed tokens back to back, lengths = per document)."""
        if len(lengths) == 0:
            return
        starts = np.cumsum(lengths) - lengths  # document starts relative to `tokens`
        self.documents += len(lengths)
        self.tokens += tokens.shape[0]
        self.bytes += int(text_bytes)
        pos = 0
        while pos < tokens.shape[0]:
            take = min(self.shard_size - self.filled, tokens.shape[0] - pos)
            self.buffer[self.filled:self.filled + take] = tokens[pos:pos + take]
            lo, hi = np.searchsorted(starts, [pos, pos + take])
            if hi > lo:
                self.doc_starts.append(starts[lo:hi] - pos + self.filled)
            self.filled += take
            pos += take
            if self.filled == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        index = len(self.shards)
        name = shard_file(self.split, index)
        data = self.buffer[:self.filled]
        starts = (np.concatenate(self.doc_starts) if self.doc_starts else np.zeros(0)).astype(np.int64)
        _save(self.out_dir / name, data)
        _save(self.out_dir / doc_index_file(name), starts)
        self.shards.append({"file": name, "doc_index": doc_index_file(name), "split": self.split, "index": index,
                            "tokens": int(self.filled), "documents": int(starts.shape[0]),
                            "max_token": int(data.max()), "crc32": zlib.crc32(data.tobytes())})
        self.filled = 0
        self.doc_starts = []

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.shards

    def summary(self) -> dict[str, int]:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": len(self.shards)}


# ----------------------------------------------------------------------------------------------------------------
# The validation split

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def document_keys(first_index: int, count: int, seed: int) -> np.ndarray:
    """uint64 keys of documents first_index .. first_index+count-1: output i of splitmix64 seeded with `seed` is
    the key of document i. Uniform, independent of chunking; the smallest keys form the validation split."""
    with np.errstate(over="ignore"):
        index = np.arange(first_index + 1, first_index + count + 1, dtype=np.uint64)
        z = np.uint64(seed & _MASK64) + index * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class ValidationPicker:
    """Streaming choice of the validation split: the documents with the smallest keys whose tokens fit in
    `budget` (at least the one with the smallest key). The candidates wait in a max-heap by key; when they exceed
    the budget the largest key is pushed out (to the training split) and becomes the threshold: later documents
    with a larger key go straight to training, so the kept set is always a prefix in key order."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.heap: list[tuple[int, int, np.ndarray, int]] = []  # (-key, index, framed tokens, text bytes)
        self.tokens = 0
        self.threshold = 1 << 64  # keys at or above it never enter

    def offer(self, first_index: int, keys: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
              text_bytes: np.ndarray) -> tuple[np.ndarray, list[tuple[int, list[tuple[int, np.ndarray, int]]]]]:
        """Take this chunk's candidates. Returns (mask of the chunk's documents that go straight to training,
        [(i, documents that the chunk's document i pushed out, as (index, tokens, text bytes))]): a pushed-out
        document enters the training stream right after the document that pushed it out, which keeps the output
        independent of how the stream is cut into chunks."""
        to_train = np.ones(len(lengths), dtype=bool)
        pushed_by: list[tuple[int, list[tuple[int, np.ndarray, int]]]] = []
        ends = np.cumsum(lengths)
        for i in np.flatnonzero(keys < np.uint64(min(self.threshold, _MASK64))).tolist():
            key = int(keys[i])
            if key >= self.threshold:
                continue
            to_train[i] = False
            start = int(ends[i] - lengths[i])
            heapq.heappush(self.heap, (-key, first_index + i, tokens[start:int(ends[i])].copy(), int(text_bytes[i])))
            self.tokens += int(lengths[i])
            pushed = self.shrink(self.budget)
            if pushed:
                pushed_by.append((i, pushed))
        return to_train, pushed_by

    def shrink(self, budget: int) -> list[tuple[int, np.ndarray, int]]:
        """Push out the largest keys until the candidates fit in `budget` tokens (one always stays)."""
        pushed = []
        while self.tokens > budget and len(self.heap) > 1:
            neg_key, index, tokens, text_bytes = heapq.heappop(self.heap)
            self.threshold = -neg_key
            self.tokens -= tokens.shape[0]
            pushed.append((index, tokens, text_bytes))
        return pushed

    def chosen(self) -> list[tuple[int, np.ndarray, int]]:
        """The validation documents in source order."""
        return sorted(((index, tokens, text_bytes) for _, index, tokens, text_bytes in self.heap),
                      key=lambda d: d[0])


def _add_documents(writer: SplitWriter, documents: list[tuple[int, np.ndarray, int]]) -> None:
    if documents:
        writer.add(np.concatenate([d[1] for d in documents]), np.array([d[1].shape[0] for d in documents]),
                   sum(d[2] for d in documents))


def _add_chunk_range(writer: SplitWriter, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray,
                     keep: np.ndarray, a: int, b: int) -> None:
    """Append the chunk's documents a..b-1 where `keep` is set."""
    starts = np.cumsum(lengths) - lengths
    lo, hi = int(starts[a]), int(starts[b - 1] + lengths[b - 1])
    keep = keep[a:b]
    if keep.all():
        writer.add(tokens[lo:hi], lengths[a:b], int(text_bytes[a:b].sum()))
    elif keep.any():
        writer.add(tokens[lo:hi][np.repeat(keep, lengths[a:b])], lengths[a:b][keep], int(text_bytes[a:b][keep].sum()))


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def tokenize_documents(documents: Iterable[str], tokenizer, out_dir: str | os.PathLike, shard_size: int,
                       val_tokens: int = 0, max_tokens: int = 0, max_documents: int = 0, source: str = "",
                       progress: bool = True, encode: Encoder | None = None, extra: dict | None = None,
                       val_fraction: float = 0.1, val_seed: int = 0) -> dict[str, Any]:
    """Encode `documents` and write shards + metadata.json into out_dir (which must exist). Returns the metadata.
    The validation split: the smallest-key documents (document_keys) within val_tokens tokens, or when val_tokens
    is 0 within val_fraction of all tokens and at most one shard."""
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    prefix, suffix = document_framing(tokenizer)
    encode = encode or tokenizers_encoder(tokenizer)
    train = SplitWriter(out_dir, "train", shard_size, dtype)
    picker = ValidationPicker(val_tokens if val_tokens > 0 else shard_size)
    total_tokens = total_docs = total_bytes = 0
    started = time.perf_counter()

    from tqdm import tqdm
    bar = tqdm(total=max_tokens or None, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        for tokens, lengths, text_bytes in encoded_chunks(documents, encode, prefix, suffix, dtype, max_documents):
            if max_tokens > 0 and total_tokens + tokens.shape[0] >= max_tokens:
                # keep whole documents until the total reaches max_tokens (the last one may cross it)
                keep = min(len(lengths), int(np.searchsorted(np.cumsum(lengths), max_tokens - total_tokens)) + 1)
                tokens, lengths, text_bytes = tokens[:int(lengths[:keep].sum())], lengths[:keep], text_bytes[:keep]
            keys = document_keys(total_docs, len(lengths), val_seed)
            to_train, pushed_by = picker.offer(total_docs, keys, tokens, lengths, text_bytes)
            done = 0  # the chunk's documents before `done` have been handled
            for i, pushed in pushed_by + [(len(lengths) - 1, [])]:
                if done <= i:
                    _add_chunk_range(train, tokens, lengths, text_bytes, to_train, done, i + 1)
                _add_documents(train, pushed)
                done = i + 1
            total_tokens += int(tokens.shape[0])
            total_docs += len(lengths)
            total_bytes += int(text_bytes.sum())
            bar.update(int(tokens.shape[0]))
            if max_tokens > 0 and total_tokens >= max_tokens:
                break
    finally:
        bar.close()

    if total_docs == 0:
        raise UserError(f"the dataset ({source or 'given'}) has no documents (no non-empty text); check the "
                        f"path, --dataset_split and --text_column")
    if val_tokens <= 0:
        _add_documents(train, sorted(picker.shrink(min(shard_size, int(val_fraction * total_tokens))),
                                     key=lambda d: d[0]))
    if train.documents == 0:
        raise UserError(f"the dataset has only {total_tokens} tokens in {total_docs} document(s), all taken by the "
                        f"validation split; lower --val_tokens or use more data")
    val = SplitWriter(out_dir, "val", shard_size, dtype)
    _add_documents(val, picker.chosen())
    shards = val.close() + train.close()
    elapsed = time.perf_counter() - started
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size},
        "dtype": dtype.name,
        "framing": {"prefix": prefix, "suffix": suffix},
        "shard_size": shard_size,
        "source": source,
        "limits": {"val_tokens": val_tokens, "val_fraction": val_fraction, "max_tokens": max_tokens,
                   "max_documents": max_documents},
        "validation": {"selection": "smallest splitmix64(seed, document position) keys within the budget",
                       "seed": val_seed, "budget_tokens": picker.budget if val_tokens > 0 else
                       min(shard_size, int(val_fraction * total_tokens))},
        "splits": {"val": val.summary(), "train": train.summary()},
        "total_tokens": total_tokens,
        "total_documents": total_docs,
        "total_bytes": total_bytes,
        "shards": shards,
        **(extra or {}),
    }
    _atomic_write(out_dir / METADATA_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    meta["elapsed_s"] = elapsed
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Command line


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be (re)placed, before any work; creates and deletes nothing."""

    check_destination(out_dir, "--data_file_name")
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"the output folder '{out_dir}' is not empty ({len(existing)} files, e.g. {existing[0]}); "
                        f"pass --overwrite to replace its shards or choose another --data_file_name")
    foreign = [name for name in existing if not is_format_file(name)]
    if foreign:
        raise UserError(f"the output folder '{out_dir}' holds files tokenize_data.py did not write (e.g. "
                        f"{foreign[0]}) that --overwrite would delete; move them or choose another --data_file_name")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _peek(documents: Iterator[str]) -> tuple[str | None, Iterator[str]]:
    first = next(documents, None)
    return first, (itertools.chain([first], documents) if first is not None else iter(()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg: TokenizeDataConfig = parse_config(TokenizeDataConfig, argv, description=__doc__.split("\n\n")[0])
    workers = cfg.num_workers or usable_cpus()
    # the Rust thread pool reads these when it starts (on the first encode); the result does not depend on them
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"


    out_dir = Path(cfg.data_file_name).expanduser()
    check_output(out_dir, cfg.overwrite)
    recover_atomic_folder(out_dir)
    return _tokenize(cfg, out_dir, workers)


def _tokenize(cfg: TokenizeDataConfig, out_dir: Path, workers: int) -> dict[str, Any]:
    import corpus
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    source = corpus.describe_source(cfg)
    skipped: dict[str, int] = {}
    first, documents = _peek(iter(corpus.iter_documents(cfg, skipped)))
    if first is None:
        raise UserError(f"the dataset ({source}) has no documents (no non-empty text); check the path, "
                        f"--dataset_split and --text_column")
    sample: list[str] = []
    for text in documents:  # the first documents (up to ~64k characters) check the tiktoken engine
        sample.append(text)
        if len(sample) >= SELF_CHECK_DOCUMENTS or sum(map(len, sample)) >= SELF_CHECK_CHARS:
            break
    documents = itertools.chain(sample, documents)
    encode = make_encoder(tokenizer, cfg.encoder, workers, sample)
    print(f"tokenizing {source} with the {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}, "
          f"{tokenizer.fingerprint}, {encode.engine} engine) on {workers} thread(s) into {out_dir}", flush=True)
    dataset = {"path": cfg.dataset_path_huggingface, "sub_set": cfg.dataset_sub_set, "split": cfg.dataset_split,
               "text_column": cfg.text_column}
    with remove_new_folder_on_failure(out_dir.parent), atomic_folder(out_dir, "--data_file_name") as tmp:
        meta = tokenize_documents(
            documents, tokenizer, tmp, cfg.encoded_dataset_shard_size, val_tokens=cfg.val_tokens,
            max_tokens=cfg.max_tokens, max_documents=cfg.max_documents, source=source, encode=encode,
            val_fraction=cfg.val_fraction, val_seed=cfg.val_seed,
            extra={"encoder": encode.engine, "dataset": dataset, "skipped_rows": skipped})
    splits = meta["splits"]
    rate = meta["total_tokens"] / max(meta["elapsed_s"], 1e-9)
    print(f"wrote {meta['total_tokens']:,} tokens ({meta['total_documents']:,} documents, {meta['dtype']}) in "
          f"{len(meta['shards'])} shard(s) to {out_dir}: val {splits['val']['tokens']:,} tokens "
          f"({splits['val']['documents']:,} documents spread over the source) in {splits['val']['shards']} "
          f"shard(s), train {splits['train']['tokens']:,} tokens in {splits['train']['shards']} shard(s); "
          f"{meta['elapsed_s']:.1f} s, {rate:,.0f} tokens/s", flush=True)
    return meta


if __name__ == "__main__":
    run_main(main)
