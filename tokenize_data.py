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
tests/test_data.py checks them on the whole built-in corpus. Each document is encoded independently, so the
output does not depend on the chunking or on --num_workers (threads).

Splits: the validation split is the first documents of the stream, whole documents only, up to
--encoded_dataset_shard_size tokens (i.e. the first shard) or up to --val_tokens when given; every later document
is training data. When the whole dataset fits in the first shard (and --val_tokens is 0) the first ~10% of its
tokens become the validation split instead, so the training split is never empty.

Output folder (--data_file_name):
    val_000000.npy, train_000000.npy, ...   1-D token arrays; a document may continue into the next shard
    <shard>.idx.npy                         int64 offsets (within the shard) of the documents that start in it
    metadata.json                           tokenizer (kind, fingerprint, vocab_size), dtype, framing, source,
                                            per-shard split/tokens/documents/max_token/crc32, split totals
Every file is written under a temporary name and renamed into place; metadata.json is written last, so a folder
without it is an incomplete run. The output is deterministic: the same input and tokenizer give byte-identical
files whatever --num_workers is.
"""
from __future__ import annotations

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

from config import (TokenizeDataConfig, UserError, make_writable_folder, parse_config, remove_new_folder_on_failure,
                    run_main)

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 19          # characters of text per encode_batch call (~100k tokens)
CHUNK_DOCUMENTS = 8192         # ... or this many documents, whichever comes first
IN_FLIGHT = 2                  # chunks being encoded ahead of the writer
SMALL_DATASET_VAL_FRACTION = 0.1
SELF_CHECK_DOCUMENTS, SELF_CHECK_CHARS = 200, 1 << 16  # text encoded by both engines before tiktoken is used

Encoder = Callable[[Sequence[str]], "tuple[np.ndarray, np.ndarray]"]


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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


def chunk_documents(documents: Iterable[str], max_documents: int = 0, chunk_chars: int = CHUNK_CHARS,
                    chunk_documents: int = CHUNK_DOCUMENTS) -> Iterator[list[str]]:
    """Group the document stream into chunks of about chunk_chars characters (order kept)."""
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


def encoded_chunks(documents: Iterable[str], encode: Encoder, prefix: Sequence[int], suffix: Sequence[int],
                   dtype: np.dtype, max_documents: int = 0, chunk_chars: int = CHUNK_CHARS
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Framed (tokens, per-document lengths) per chunk, in order. Encoding runs in a background thread (the Rust
    encoder releases the GIL and uses every core) while the caller consumes the previous chunk."""
    def work(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        flat, lengths = encode(texts)
        return frame(flat, lengths, prefix, suffix, dtype)

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


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename into place (never a partial file
    under the final name). A failing disk (full, read-only) is a one-line UserError."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write '{path}' ({type(error).__name__}: {error.strerror or error}); free "
                            f"some space or choose another --data_file_name") from None
        raise


def _atomic_save(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class SplitWriter:
    """Cuts one split's token stream into shards of shard_size tokens. A full buffer is written only when more
    tokens arrive (or at close), so a split that fits in one shard stays in memory until it is complete."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, dtype: np.dtype) -> None:
        self.out_dir, self.split, self.shard_size, self.dtype = out_dir, split, shard_size, dtype
        self.buffer = np.empty(shard_size, dtype=dtype)
        self.filled = 0
        self.doc_starts: list[np.ndarray] = []  # offsets within the current buffer
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents (tokens = their framed tokens back to back, lengths = per document)."""
        if len(lengths) == 0:
            return
        starts = np.cumsum(lengths) - lengths  # document starts relative to `tokens`
        self.documents += len(lengths)
        self.tokens += tokens.shape[0]
        pos = 0
        while pos < tokens.shape[0]:
            if self.filled == self.shard_size:
                self._flush()
            take = min(self.shard_size - self.filled, tokens.shape[0] - pos)
            self.buffer[self.filled:self.filled + take] = tokens[pos:pos + take]
            lo, hi = np.searchsorted(starts, [pos, pos + take])
            if hi > lo:
                self.doc_starts.append(starts[lo:hi] - pos + self.filled)
            self.filled += take
            pos += take

    def buffered(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens, lengths) of the whole split when nothing has been written yet, else None."""
        if self.shards:
            return None
        starts = np.concatenate(self.doc_starts) if self.doc_starts else np.zeros(0, np.int64)
        lengths = np.diff(np.append(starts, self.filled))
        return self.buffer[:self.filled].copy(), lengths

    def _flush(self) -> None:
        if self.filled == 0:
            return
        index = len(self.shards)
        name = f"{self.split}_{index:06d}.npy"
        data = self.buffer[:self.filled]
        starts = (np.concatenate(self.doc_starts) if self.doc_starts else np.zeros(0)).astype(np.int64)
        _atomic_save(self.out_dir / name, data)
        idx_name = name[:-4] + ".idx.npy"
        _atomic_save(self.out_dir / idx_name, starts)
        self.shards.append({"file": name, "doc_index": idx_name, "split": self.split, "index": index,
                            "tokens": int(self.filled), "documents": int(starts.shape[0]),
                            "max_token": int(data.max()), "crc32": zlib.crc32(data.tobytes())})
        self.filled = 0
        self.doc_starts = []

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.shards


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def _split_point(lengths: np.ndarray, budget: int) -> int:
    """How many leading documents form a split of at most `budget` tokens (at least one document)."""
    cumulative = np.cumsum(lengths)
    return max(1, int(np.searchsorted(cumulative, budget, side="right")))


def tokenize_documents(documents: Iterable[str], tokenizer, out_dir: str | os.PathLike, shard_size: int,
                       val_tokens: int = 0, max_tokens: int = 0, max_documents: int = 0, source: str = "",
                       progress: bool = True, encode: Encoder | None = None, extra: dict | None = None
                       ) -> dict[str, Any]:
    """Encode `documents` and write shards + metadata.json into out_dir (which must exist). Returns the metadata."""
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    prefix, suffix = document_framing(tokenizer)
    encode = encode or tokenizers_encoder(tokenizer)
    val_budget = val_tokens if val_tokens > 0 else shard_size
    writers = {split: SplitWriter(out_dir, split, shard_size, dtype) for split in ("val", "train")}
    in_val = True  # still filling the validation split (a prefix of the stream)
    total_tokens = total_docs = 0
    started = time.perf_counter()

    from tqdm import tqdm
    bar = tqdm(total=max_tokens or None, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        for tokens, lengths in encoded_chunks(documents, encode, prefix, suffix, dtype, max_documents):
            if max_tokens > 0 and total_tokens + tokens.shape[0] >= max_tokens:
                # keep whole documents until the total reaches max_tokens (the last one may cross it)
                keep = min(len(lengths), int(np.searchsorted(np.cumsum(lengths), max_tokens - total_tokens)) + 1)
                tokens, lengths = tokens[:int(lengths[:keep].sum())], lengths[:keep]
            chunk_tokens = int(tokens.shape[0])
            if in_val:
                room = val_budget - writers["val"].tokens
                n_val = int(np.searchsorted(np.cumsum(lengths), room, side="right")) if room > 0 else 0
                if writers["val"].documents == 0:
                    n_val = max(n_val, 1)
                if n_val < len(lengths):
                    in_val = False
                cut = int(lengths[:n_val].sum())
                writers["val"].add(tokens[:cut], lengths[:n_val])
                tokens, lengths = tokens[cut:], lengths[n_val:]
                total_docs += n_val
            writers["train"].add(tokens, lengths)
            total_tokens += chunk_tokens
            total_docs += len(lengths)
            bar.update(chunk_tokens)
            if max_tokens > 0 and total_tokens >= max_tokens:
                break
    finally:
        bar.close()

    if total_docs == 0:
        raise UserError(f"the dataset ({source or 'given'}) has no documents (no non-empty text); check the "
                        f"path, --dataset_split and --text_column")
    notes = []
    if writers["train"].documents == 0:
        buffered = writers["val"].buffered() if val_tokens <= 0 else None
        if buffered is None or len(buffered[1]) < 2:
            raise UserError(f"the dataset has only {total_tokens} tokens in {total_docs} document(s), all taken "
                            f"by the validation split; lower --val_tokens or use more data")
        tokens, lengths = buffered
        n_val = _split_point(lengths, int(total_tokens * SMALL_DATASET_VAL_FRACTION))
        n_val = min(n_val, len(lengths) - 1)
        cut = int(lengths[:n_val].sum())
        writers["val"] = SplitWriter(out_dir, "val", shard_size, dtype)
        writers["val"].add(tokens[:cut], lengths[:n_val])
        writers["train"].add(tokens[cut:], lengths[n_val:])
        notes.append(f"the dataset fits in one shard ({total_tokens} tokens <= --encoded_dataset_shard_size "
                     f"{shard_size}), so its first {n_val} documents ({cut} tokens) are the validation split")
    shards = writers["val"].close() + writers["train"].close()
    elapsed = time.perf_counter() - started
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size},
        "dtype": dtype.name,
        "framing": {"prefix": prefix, "suffix": suffix},
        "shard_size": shard_size,
        "source": source,
        "limits": {"val_tokens": val_tokens, "max_tokens": max_tokens, "max_documents": max_documents},
        "splits": {split: {"tokens": w.tokens, "documents": w.documents, "shards": len(w.shards)}
                   for split, w in writers.items()},
        "total_tokens": total_tokens,
        "total_documents": total_docs,
        "notes": notes,
        "shards": shards,
        **(extra or {}),
    }
    _atomic_write_text(out_dir / METADATA_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    meta["elapsed_s"] = elapsed
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _is_our_file(name: str) -> bool:
    return name == METADATA_FILE or (name.startswith(("train_", "val_", ".train_", ".val_", f".{METADATA_FILE}"))
                                     and (name.endswith(".npy") or ".tmp-" in name))


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Create the output folder (or check it can be replaced) and make sure it is writable; deletes nothing."""
    make_writable_folder(out_dir, "--data_file_name")
    existing = sorted(p.name for p in out_dir.iterdir())
    if existing and not overwrite:
        raise UserError(f"the output folder '{out_dir}' is not empty ({len(existing)} files, e.g. {existing[0]}); "
                        f"pass --overwrite to replace its shards or choose another --data_file_name")


def clear_output(out_dir: Path) -> None:
    """Remove the files of a previous run (metadata first, so a half-cleared folder is never taken as valid)."""
    (out_dir / METADATA_FILE).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if path.is_file() and _is_our_file(path.name):
            path.unlink()


def _peek(documents: Iterator[str]) -> tuple[str | None, Iterator[str]]:
    first = next(documents, None)
    return first, (itertools.chain([first], documents) if first is not None else iter(()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg: TokenizeDataConfig = parse_config(TokenizeDataConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.encoded_dataset_shard_size < 1:
        raise UserError(f"--encoded_dataset_shard_size must be positive (got {cfg.encoded_dataset_shard_size})")
    for name in ("val_tokens", "max_tokens", "max_documents", "num_workers"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    workers = cfg.num_workers or os.cpu_count() or 1
    # the Rust thread pool reads these when it starts (on the first encode); the result does not depend on them
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"

    out_dir = Path(cfg.data_file_name).expanduser()
    with remove_new_folder_on_failure(out_dir):
        return _tokenize(cfg, out_dir, workers)


def _tokenize(cfg: TokenizeDataConfig, out_dir: Path, workers: int) -> dict[str, Any]:
    import corpus
    from tokenizer import load_tokenizer

    prepare_output(out_dir, cfg.overwrite)
    tokenizer = load_tokenizer(cfg)
    source = corpus.describe_source(cfg)
    first, documents = _peek(iter(corpus.iter_documents(cfg)))
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
    clear_output(out_dir)
    print(f"tokenizing {source} with the {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}, "
          f"{tokenizer.fingerprint}, {encode.engine} engine) on {workers} thread(s) into {out_dir}", flush=True)
    meta = tokenize_documents(
        documents, tokenizer, out_dir, cfg.encoded_dataset_shard_size, val_tokens=cfg.val_tokens,
        max_tokens=cfg.max_tokens, max_documents=cfg.max_documents, source=source, encode=encode,
        extra={"encoder": encode.engine, "dataset": {"path": cfg.dataset_path_huggingface, "sub_set": cfg.dataset_sub_set,
                           "split": cfg.dataset_split, "text_column": cfg.text_column}})
    for note in meta["notes"]:
        print(f"note: {note}")
    splits = meta["splits"]
    rate = meta["total_tokens"] / max(meta["elapsed_s"], 1e-9)
    print(f"wrote {meta['total_tokens']:,} tokens ({meta['total_documents']:,} documents, {meta['dtype']}) in "
          f"{len(meta['shards'])} shard(s) to {out_dir}: val {splits['val']['tokens']:,} tokens in "
          f"{splits['val']['shards']} shard(s), train {splits['train']['tokens']:,} tokens in "
          f"{splits['train']['shards']} shard(s); {meta['elapsed_s']:.1f} s, {rate:,.0f} tokens/s", flush=True)
    return meta


if __name__ == "__main__":
    run_main(main)
