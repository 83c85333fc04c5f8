"""tokenize_data.py and data_loader.py: round trips, determinism, the loader's rank split / shuffle / resume, and
one-line errors for bad inputs. References are independent: per-document tokenizer.encode_document and decode,
and a naive concatenate-then-slice loader."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data_loader as dl
import tokenize_data as td
from config import TokenizerOptions, UserError
from conftest import run_script
from corpus import builtin_corpus_documents
from tokenizer import load_tokenizer

UNICODE_DOCS = [
    "Ünïcödé façade — naïve café; Straße, ĳ, ǅ, ﬁ ligature, Å vs Å (combining ring)",
    "日本語のテキスト、漢字とひらがな。中文句子：你好，世界！한국어 문장도 있습니다.",
    "Emoji: 👩‍👩‍👧‍👦 family ZWJ, flags 🇫🇷🇯🇵, skin tones 👍🏽, keycap 1️⃣, 🧑‍🚀 in space",
    "RTL: שלום עולם and مرحبا بالعالم with LRM\u200e and RLM\u200f marks",
    "Devanagari नमस्ते दुनिया, Thai สวัสดีชาวโลก, Tamil வணக்கம், Georgian გამარჯობა",
    "control-looking text <|bos|> <|eos|> <|pad|> <s> </s> [INST] must stay plain text",
    "whitespace:\ttabs\t\tand\n\nnewlines\r\nCRLF   trailing   \u00a0nbsp\u2003em-space\u3000ideographic",
    "math 𝔸𝕓𝖼 ∀x∈ℝ: x²≥0, ∑ₖ 1/k² = π²/6 ≈ 1.6449, ½ ¾ ⅞, ⁂ ※",
    "zero width: a\u200bb\u200cc\u200dd\ufeffe, variation selectors ︎☺︎ ☺️, replacement \ufffd",
    "old scripts 𐌰𐌱𐌲 (Gothic) 𓀀𓀁 (hieroglyphs) and Cherokee ᏣᎳᎩ",
] * 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A small tokenizer trained by the teammate's train_tokenizer.py on part of the built-in corpus."""
    import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")  # in-process: shares the built-in corpus with the other tests
    train_tokenizer.main(["--vocab_size", "1024", "--tokenizer_train_shard_size", "400000", "--output_path",
                          str(out)])
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(TokenizerOptions(tokenizer_path=str(tok_dir)))


@pytest.fixture(scope="module")
def unicode_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unicode") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in UNICODE_DOCS),
                    encoding="utf-8")
    return path


def tokenize(tok_dir: Path, out: Path, *args: str) -> None:
    result = run_script("tokenize_data.py", "--tokenizer_path", str(tok_dir), "--data_file_name", str(out), *args,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def assert_round_trip(out: Path, tok, texts: list[str]) -> None:
    documents = list(dl.read_documents(out))
    assert len(documents) == len(texts)
    meta = dl.read_metadata(out)
    assert meta["total_documents"] == len(texts)
    assert meta["total_tokens"] == sum(d.size for d in documents)
    for tokens, text in zip(documents, texts):
        assert tokens.tolist() == tok.encode_document(text)   # independent per-document reference
        assert tok.decode(tokens.tolist()) == text


# ----------------------------------------------------------------------------------------------------------------
# tokenize_data.py


@pytest.mark.slow
def test_builtin_round_trip_and_worker_determinism(tmp_path, tok_dir, tok) -> None:
    """Decoding each document's span gives back the original text; 1 and 2 workers write byte-identical files.
    Shards are small, so documents cross shard boundaries."""
    args = ("--max_documents", "1200", "--encoded_dataset_shard_size", "7000")
    tokenize(tok_dir, tmp_path / "w1", "--num_workers", "1", *args)
    tokenize(tok_dir, tmp_path / "w2", "--num_workers", "2", *args)
    texts = list(builtin_corpus_documents()[:1200])
    assert_round_trip(tmp_path / "w1", tok, texts)
    files1 = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files1 == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len([f for f in files1 if f.endswith(".npy") and not f.endswith(".idx.npy")]) > 10
    for name in files1:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    meta = dl.read_metadata(tmp_path / "w1")
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tok.describe()
    val = [s for s in meta["shards"] if s["split"] == "val"]
    assert len(val) == 1 and val[0]["tokens"] <= 7000 and meta["shards"][0] is not None
    assert all(s["tokens"] == 7000 for s in meta["shards"][1:-1] if s["split"] == "train")
    for shard in meta["shards"]:  # counts in the metadata agree with the data
        data = np.load(tmp_path / "w1" / shard["file"])
        assert data.shape[0] == shard["tokens"] and int(data.max()) == shard["max_token"]
        assert int((data == tok.bos_id).sum()) == shard["documents"]


def test_unicode_file_round_trip(tmp_path, tok_dir, tok, unicode_file) -> None:
    tokenize(tok_dir, tmp_path / "u", "--dataset_path_huggingface", str(unicode_file),
             "--encoded_dataset_shard_size", "64", "--val_tokens", "100")
    assert_round_trip(tmp_path / "u", tok, UNICODE_DOCS)
    meta = dl.read_metadata(tmp_path / "u")
    # control tokens appear only as framing: the literal "<|bos|>" inside a document is text
    assert sum(s["documents"] for s in meta["shards"]) == len(UNICODE_DOCS)
    assert meta["splits"]["val"]["tokens"] <= 100 and meta["splits"]["val"]["documents"] >= 1


def test_in_process_determinism_and_limits(tmp_path, tok) -> None:
    """Chunking never changes the bytes; --max_documents / --max_tokens keep whole documents; the small-dataset
    fallback keeps a training split."""
    texts = list(builtin_corpus_documents()[:300]) + UNICODE_DOCS
    metas = []
    for i, chunk_chars in enumerate((1, 5000, 1 << 22)):
        old = td.CHUNK_CHARS
        td.CHUNK_CHARS = chunk_chars
        try:
            (tmp_path / str(i)).mkdir()
            metas.append(td.tokenize_documents(iter(texts), tok, tmp_path / str(i), 5000, progress=False))
        finally:
            td.CHUNK_CHARS = old
    for name in sorted(p.name for p in (tmp_path / "0").iterdir()):
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes() == \
            (tmp_path / "2" / name).read_bytes()
    assert_round_trip(tmp_path / "0", tok, texts)

    framed = [len(tok.encode_document(t)) for t in texts]
    (tmp_path / "cap").mkdir()
    meta = td.tokenize_documents(iter(texts), tok, tmp_path / "cap", 5000, max_tokens=20000, progress=False)
    n = int(np.searchsorted(np.cumsum(framed), 20000)) + 1  # whole documents until the total reaches the cap
    assert meta["total_documents"] == n and meta["total_tokens"] == sum(framed[:n]) >= 20000
    (tmp_path / "docs").mkdir()
    meta = td.tokenize_documents(iter(texts), tok, tmp_path / "docs", 5000, max_documents=7, progress=False)
    assert meta["total_documents"] == 7 and meta["total_tokens"] == sum(framed[:7])

    (tmp_path / "small").mkdir()  # everything fits in one shard: ~10% becomes validation, the rest training
    meta = td.tokenize_documents(iter(texts[:50]), tok, tmp_path / "small", 10 ** 7, progress=False)
    assert meta["splits"]["train"]["documents"] > 0 and meta["splits"]["val"]["documents"] > 0
    assert meta["splits"]["val"]["tokens"] <= 0.1 * meta["total_tokens"] + max(framed[:50])
    assert_round_trip(tmp_path / "small", tok, texts[:50])


def test_framing_matches_encode_document(tok) -> None:
    prefix, suffix = td.document_framing(tok)
    assert prefix == [tok.bos_id] and suffix == [tok.eos_id]
    flat, lengths = td.tokenizers_encoder(tok)(["hello world", "", "x"])
    tokens, framed = td.frame(flat, lengths, prefix, suffix, np.dtype(np.uint16))
    expected = [i for t in ["hello world", "", "x"] for i in tok.encode_document(t)]
    assert tokens.tolist() == expected and framed.tolist() == [len(tok.encode_document(t)) for t in
                                                               ["hello world", "", "x"]]


# ----------------------------------------------------------------------------------------------------------------
# data_loader.py on synthetic shards


def write_synthetic(out: Path, shard_sizes: dict[str, list[int]], vocab_size: int = 1 << 20,
                    fingerprint: str = "synthetic0000000", seed: int = 0) -> dict[str, np.ndarray]:
    """Shards of distinct token values (so every window is identifiable), in the documented metadata format."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, streams, offset = [], {}, 0
    for split, sizes in shard_sizes.items():
        pieces = []
        for index, size in enumerate(sizes):
            data = (np.arange(offset, offset + size) % vocab_size).astype(np.uint32)
            offset += size
            name = f"{split}_{index:06d}.npy"
            np.save(out / name, data)
            starts = np.sort(rng.choice(size, size=min(3, size), replace=False)).astype(np.int64)
            if index == 0:
                starts[0] = 0
            np.save(out / (name[:-4] + ".idx.npy"), starts)
            shards.append({"file": name, "doc_index": name[:-4] + ".idx.npy", "split": split, "index": index,
                           "tokens": size, "documents": len(starts), "max_token": int(data.max())})
            pieces.append(data)
        streams[split] = np.concatenate(pieces).astype(np.int64)
    meta = {"format": 1, "tokenizer": {"kind": "trained", "fingerprint": fingerprint, "vocab_size": vocab_size},
            "dtype": "uint32", "shards": shards, "total_tokens": offset}
    (out / "metadata.json").write_text(json.dumps(meta))
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
    val = dl.ShardedLoader(tmp_path, "val", batch_size=2, seq_len=5)
    first = [b[0].numpy().copy() for b in val.eval_batches(3)]
    assert [b[0].numpy().tolist() for b in val.eval_batches(3)] == [f.tolist() for f in first]
    assert np.array_equal(first[0], naive_batches(streams["val"], 2, 5, 0, 1, 1)[0][0]) and val.position == 0


def test_loader_random_configurations_match_reference(tmp_path) -> None:
    """Fresh random shard layouts, sequence lengths, batch sizes and world sizes: every rank's batches equal the
    naive reference over a few epochs, with and without shuffling."""
    rng = np.random.default_rng()
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
    assert other.position == 32 and not other.resumed_exactly and resumed.resumed_exactly


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
    meta = json.loads((tmp_path / "d" / "metadata.json").read_text())
    meta["shards"][2]["crc32"] = 0
    (tmp_path / "d" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="checksum"):
        dl.ShardedLoader(tmp_path / "d", "train", 2, 4, verify_checksums=True)
    loader = dl.ShardedLoader(tmp_path / "d", "train", 25, 4)
    with pytest.raises(UserError, match=">= vocab_size"):
        loader.next_batch()
    (tmp_path / "d" / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupted"):
        dl.read_metadata(tmp_path / "d")


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs from the command line: non-zero exit and one line on stderr


def one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_command_line_errors(tmp_path, tok_dir, tok, unicode_file) -> None:
    run = lambda *a: run_script("tokenize_data.py", "--tokenizer_path", str(tok_dir), *a, timeout=120)  # noqa
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    assert "no documents" in one_line_error(run("--dataset_path_huggingface", str(tmp_path / "empty.jsonl"),
                                                "--data_file_name", str(tmp_path / "o1")))
    (tmp_path / "a_file").write_text("x")
    assert "cannot write" in one_line_error(run("--dataset_path_huggingface", str(unicode_file),
                                                "--data_file_name", str(tmp_path / "a_file" / "data")))
    assert "tokenizer" in one_line_error(run_script(
        "tokenize_data.py", "--tokenizer_path", str(tmp_path / "no_tokenizer"), "--data_file_name",
        str(tmp_path / "o2"), timeout=120))
    out = tmp_path / "data"
    out.mkdir()
    td.tokenize_documents(iter(UNICODE_DOCS), tok, out, 200, progress=False)
    assert "--overwrite" in one_line_error(run("--dataset_path_huggingface", str(unicode_file),
                                               "--data_file_name", str(out)))
    check = lambda *a: run_script("data_loader.py", "--data_file_name", str(out), *a, timeout=120)  # noqa
    # shards written with another tokenizer: the same files, but two vocabulary entries swapped
    other = tmp_path / "other_tok"
    shutil.copytree(tok_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (500, 501)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert "another tokenizer" in one_line_error(check("--check_tokenizer", "--tokenizer_path", str(other)))
    shard = out / "train_000000.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    assert "truncated" in one_line_error(check())


# ----------------------------------------------------------------------------------------------------------------
# Mistral's tokenizer (tekken file shipped with mistral-common) and the tiktoken engine


@pytest.mark.slow
def test_tiktoken_engine_gives_identical_ids_on_the_whole_corpus(tmp_path) -> None:
    """The tiktoken engine tokenize_data.py uses for Mistral's vocabulary must give exactly the ids of the
    tokenizer's own encode_batch: checked on every document of the built-in corpus plus unicode-heavy text, and
    against mistral_common's Tekkenizer (the reference implementation) on a slice."""
    tekken = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")
    path = Path(tekken.__file__).resolve().parents[2] / "data" / "tekken_240718.json"
    tok = load_tokenizer(TokenizerOptions(load_mistral_tokenizer=True, mistral_tokenizer_path=str(path)))
    texts = list(builtin_corpus_documents()) + UNICODE_DOCS
    fast = td.make_encoder(tok, "tiktoken", workers=2)
    assert fast.engine == "tiktoken"
    got_flat, got_lengths = fast(texts)
    want_flat, want_lengths = td.tokenizers_encoder(tok)(texts)
    assert np.array_equal(got_lengths, want_lengths) and np.array_equal(got_flat, want_flat)
    assert got_flat.size > 400_000
    reference = tekken.Tekkenizer.from_file(str(path))
    pos = 0
    for text, n in zip(texts, got_lengths.tolist()):
        if text in UNICODE_DOCS[:10] or pos < 60_000:
            assert got_flat[pos:pos + n].tolist() == reference.encode(text, bos=False, eos=False)
        pos += n
    # whole pipeline: uint32 shards, same bytes with either engine, round trip
    for engine in ("tiktoken", "tokenizers"):
        (tmp_path / engine).mkdir()
        td.tokenize_documents(iter(texts[-400:]), tok, tmp_path / engine, 20_000, progress=False,
                              encode=td.make_encoder(tok, engine, workers=2))
    for name in sorted(p.name for p in (tmp_path / "tiktoken").iterdir()):
        assert (tmp_path / "tiktoken" / name).read_bytes() == (tmp_path / "tokenizers" / name).read_bytes()
    assert dl.read_metadata(tmp_path / "tiktoken")["dtype"] == "uint32"
    assert_round_trip(tmp_path / "tiktoken", tok, texts[-400:])
