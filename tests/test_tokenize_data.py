"""tokenize_data.py: round trips against per-document tokenizer.encode_document / decode, byte-identical output
for any number of workers or chunking, the seeded validation selection against an independent splitmix64
reference (spread over the whole source), atomic writes and --overwrite under failures and kill -9, the tiktoken
engine (identical ids, and a mismatch detected), and one-line errors for bad input."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mistral_common.tokens.tokenizers import tekken

import data_loader as dl
import tokenize_data as td
from config import TokenizerOptions, UserError
from conftest import ROOT, run_script
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
TEKKEN = Path(tekken.__file__).resolve().parents[2] / "data" / "tekken_240718.json"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A small tokenizer trained by train_tokenizer.py on part of the built-in corpus (deterministic)."""
    import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")  # in-process: shares the built-in corpus with the other tests
    train_tokenizer.main(["--vocab_size", "1024", "--tokenizer_train_shard_size", "400000", "--output_path",
                          str(out)])
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(TokenizerOptions(tokenizer_path=str(tok_dir)))


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(TokenizerOptions(load_mistral_tokenizer=True, mistral_tokenizer_path=str(TEKKEN)))


@pytest.fixture(scope="module")
def unicode_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unicode") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in UNICODE_DOCS),
                    encoding="utf-8")
    return path


def tokenize(tok_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    result = run_script("tokenize_data.py", "--tokenizer_path", str(tok_dir), "--data_file_name", str(out), *args,
                        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp") or ".tmp-" in p.name)


# ----------------------------------------------------------------------------------------------------------------
# The independent reference for the validation split


def splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` outputs of the splitmix64 generator (Steele, Lea, Flood 2014), in plain Python ints."""
    mask, state, out = (1 << 64) - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def reference_val_indices(lengths: list[int], budget: int, seed: int) -> list[int]:
    """Documents in increasing key order while their tokens fit in the budget (the first always), source order."""
    keys = splitmix64(seed, len(lengths))
    chosen, total = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: keys[i]):
        if chosen and total + lengths[i] > budget:
            break
        chosen.append(i)
        total += lengths[i]
    return sorted(chosen)


def test_document_keys_are_splitmix64() -> None:
    assert splitmix64(0, 1)[0] == 0xE220A8397B1DCDAF  # the published first output for seed 0
    for seed in (0, 1, 12345, 2**63 - 1):
        assert td.document_keys(0, 40, seed).tolist() == splitmix64(seed, 40)
        assert td.document_keys(17, 5, seed).tolist() == splitmix64(seed, 22)[17:]  # independent of chunking


def assert_round_trip(out: Path, tok, texts: list[str], budget: int | None = None, seed: int = 0) -> None:
    """Validation = the reference selection in source order; training = every other document (order aside);
    each document decodes to its text; counts and UTF-8 byte counts in metadata.json agree."""
    framed = [tok.encode_document(t) for t in texts]
    meta = dl.read_metadata(out)
    if budget is None:
        budget = meta["validation"]["budget_tokens"]
    val_index = reference_val_indices([len(f) for f in framed], budget, seed)
    val_docs = [d.tolist() for d in dl.read_documents(out, "val")]
    assert val_docs == [framed[i] for i in val_index]
    train_docs = [d.tolist() for d in dl.read_documents(out, "train")]
    rest = [i for i in range(len(texts)) if i not in set(val_index)]
    assert Counter(map(tuple, train_docs)) == Counter(tuple(framed[i]) for i in rest)
    for tokens in val_docs + train_docs:
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert [tok.decode(d) for d in val_docs] == [texts[i] for i in val_index]
    assert meta["total_documents"] == len(texts) and meta["total_tokens"] == sum(map(len, framed))
    splits = meta["splits"]
    assert splits["val"]["documents"] == len(val_index) and splits["train"]["documents"] == len(rest)
    assert splits["val"]["bytes"] == sum(len(texts[i].encode("utf-8")) for i in val_index)
    assert splits["train"]["bytes"] == sum(len(texts[i].encode("utf-8")) for i in rest)
    assert dl.bytes_per_token(out, "val") == splits["val"]["bytes"] / splits["val"]["tokens"]


# ----------------------------------------------------------------------------------------------------------------
# Round trips and determinism


@pytest.mark.slow
def test_builtin_round_trip_and_worker_determinism(tmp_path, tok_dir, tok) -> None:
    """1 and 2 workers write byte-identical files; shards are small, so documents cross shard boundaries."""
    args = ("--max_documents", "1200", "--encoded_dataset_shard_size", "7000")
    tokenize(tok_dir, tmp_path / "w1", "--num_workers", "1", *args)
    tokenize(tok_dir, tmp_path / "w2", "--num_workers", "2", *args)
    texts = list(builtin_corpus_documents()[:1200])
    assert_round_trip(tmp_path / "w1", tok, texts)
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")
    meta = dl.read_metadata(tmp_path / "w1")
    assert len([s for s in meta["shards"] if s["split"] == "train"]) > 10
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tok.describe()
    assert meta["validation"]["budget_tokens"] == min(7000, int(0.1 * meta["total_tokens"]))
    assert all(s["tokens"] == 7000 for s in meta["shards"][1:-1] if s["split"] == "train")
    for shard in meta["shards"]:  # counts in the metadata agree with the data
        data = np.load(tmp_path / "w1" / shard["file"])
        assert data.shape[0] == shard["tokens"] and int(data.max()) == shard["max_token"]
        assert int((data == tok.bos_id).sum()) == shard["documents"]


def test_unicode_file_round_trip(tmp_path, tok_dir, tok, unicode_file) -> None:
    tokenize(tok_dir, tmp_path / "u", "--dataset_path_huggingface", str(unicode_file),
             "--encoded_dataset_shard_size", "64", "--val_tokens", "300", "--val_seed", "7")
    assert_round_trip(tmp_path / "u", tok, UNICODE_DOCS, budget=300, seed=7)
    meta = dl.read_metadata(tmp_path / "u")
    assert meta["splits"]["val"]["tokens"] <= 300 and meta["splits"]["val"]["documents"] >= 2


def test_in_process_determinism_and_limits(tmp_path, tok, monkeypatch) -> None:
    """Chunking never changes the bytes; --max_documents / --max_tokens keep whole documents; a dataset that fits
    in one shard gets a --val_fraction validation split."""
    texts = list(builtin_corpus_documents()[:300]) + UNICODE_DOCS
    for i, chunk_chars in enumerate((1, 5000, 1 << 22)):
        monkeypatch.setattr(td, "CHUNK_CHARS", chunk_chars)
        (tmp_path / str(i)).mkdir()
        td.tokenize_documents(iter(texts), tok, tmp_path / str(i), 5000, val_tokens=3000, progress=False)
    assert folder_bytes(tmp_path / "0") == folder_bytes(tmp_path / "1") == folder_bytes(tmp_path / "2")
    assert_round_trip(tmp_path / "0", tok, texts, budget=3000)
    monkeypatch.setattr(td, "CHUNK_CHARS", 1 << 19)

    framed = [len(tok.encode_document(t)) for t in texts]
    (tmp_path / "cap").mkdir()
    meta = td.tokenize_documents(iter(texts), tok, tmp_path / "cap", 5000, max_tokens=20000, progress=False)
    n = int(np.searchsorted(np.cumsum(framed), 20000)) + 1  # whole documents until the total reaches the cap
    assert meta["total_documents"] == n and meta["total_tokens"] == sum(framed[:n]) >= 20000
    assert_round_trip(tmp_path / "cap", tok, texts[:n], budget=min(5000, int(0.1 * sum(framed[:n]))))
    (tmp_path / "docs").mkdir()
    meta = td.tokenize_documents(iter(texts), tok, tmp_path / "docs", 5000, max_documents=7, progress=False)
    assert meta["total_documents"] == 7 and meta["total_tokens"] == sum(framed[:7])

    (tmp_path / "small").mkdir()  # everything fits in one shard: val_fraction of the tokens becomes validation
    meta = td.tokenize_documents(iter(texts[:50]), tok, tmp_path / "small", 10 ** 7, val_fraction=0.2,
                                 val_seed=3, progress=False)
    assert meta["splits"]["train"]["documents"] > 0 and meta["splits"]["val"]["documents"] > 0
    assert meta["splits"]["val"]["tokens"] <= 0.2 * meta["total_tokens"]
    assert_round_trip(tmp_path / "small", tok, texts[:50], budget=int(0.2 * sum(framed[:50])), seed=3)

    (tmp_path / "all_val").mkdir()
    with pytest.raises(UserError, match="lower --val_tokens"):
        td.tokenize_documents(iter(texts[:5]), tok, tmp_path / "all_val", 5000, val_tokens=10 ** 6, progress=False)


def test_validation_documents_are_spread_over_the_source(tmp_path, tok) -> None:
    """The built-in corpus puts every pydoc topic before every docstring: both kinds land in the validation
    split, which samples every tenth of the source at about the same rate."""
    from pydoc_data.topics import topics

    texts = list(builtin_corpus_documents())
    meta = td.tokenize_documents(iter(texts), tok, tmp_path, 100_000, progress=False)
    assert_round_trip(tmp_path, tok, texts)
    chosen = set(reference_val_indices([len(tok.encode_document(t)) for t in texts],
                                       meta["validation"]["budget_tokens"], 0))
    in_val = [i in chosen for i in range(len(texts))]
    assert any(in_val[:len(topics)]) and any(in_val[len(topics):])
    tenths = [np.mean(part) for part in np.array_split(np.array(in_val, dtype=float), 10)]
    overall = np.mean(in_val)
    assert all(0.5 * overall < t < 1.6 * overall for t in tenths), (tenths, overall)
    assert 0.09 < meta["splits"]["val"]["tokens"] / meta["total_tokens"] <= 0.1


def test_framing_matches_encode_document(tok) -> None:
    prefix, suffix = td.document_framing(tok)
    assert prefix == [tok.bos_id] and suffix == [tok.eos_id]
    flat, lengths = td.tokenizers_encoder(tok)(["hello world", "", "x"])
    tokens, framed = td.frame(flat, lengths, prefix, suffix, np.dtype(np.uint16))
    expected = [i for t in ["hello world", "", "x"] for i in tok.encode_document(t)]
    assert tokens.tolist() == expected and framed.tolist() == [len(tok.encode_document(t)) for t in
                                                               ["hello world", "", "x"]]


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes, --overwrite, kill -9


def test_a_failed_shard_write_leaves_no_partial_shard(tmp_path, monkeypatch) -> None:
    """A disk that fills up in the middle of np.save: a one-line UserError, nothing under the shard's final
    name, no temporary file."""
    real_save = np.save

    def failing_save(file, array, **kwargs):
        real_save(file, array[:len(array) // 2], **kwargs)  # half of it reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(UserError) as error:
        td._save(tmp_path / "train_000000.npy", np.arange(1000, dtype=np.uint16))
    assert "No space left" in str(error.value) and "--data_file_name" in str(error.value)
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []


def test_overwrite_with_a_read_error_keeps_the_old_dataset(tmp_path, tok, tok_dir, monkeypatch) -> None:
    """--overwrite, and the second of two input files is unreadable after shards of the first were written:
    the old dataset is byte-identical afterwards and nothing else is left beside or inside it."""
    source = tmp_path / "src"
    source.mkdir()
    docs = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(30)) for i in range(300)]
    (source / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (source / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken json\n')
    out = tmp_path / "data"
    out.mkdir()
    td.tokenize_documents(iter(UNICODE_DOCS), tok, out, 200, progress=False)
    before = folder_bytes(out)
    saved = []
    real_save = td._save
    monkeypatch.setattr(td, "_save", lambda path, array: saved.append(path.name) or real_save(path, array))
    monkeypatch.setattr(td, "CHUNK_CHARS", 2000)
    with pytest.raises(UserError, match="could not read"):
        td.main(["--tokenizer_path", str(tok_dir), "--dataset_path_huggingface", str(source), "--data_file_name",
                 str(out), "--encoded_dataset_shard_size", "100", "--overwrite"])
    assert len(saved) > 10  # shards of the new dataset had been written when the error came
    assert folder_bytes(out) == before and litter(tmp_path) == []


def _start_tokenizing(tok_dir: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tokenize_data.py"), "--tokenizer_path", str(tok_dir),
                             "--data_file_name", str(out), "--encoded_dataset_shard_size", "500", "--overwrite",
                             "--num_workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_kill_9_mid_run_loses_nothing_and_the_rerun_cleans_up(tmp_path, tok, tok_dir) -> None:
    out = tmp_path / "data"
    out.mkdir()
    td.tokenize_documents(iter(UNICODE_DOCS), tok, out, 200, progress=False)
    before = folder_bytes(out)
    process = _start_tokenizing(tok_dir, out)
    partial = tmp_path / f".tmp_data_{process.pid}"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if partial.is_dir() and len(list(partial.glob("train_*.npy"))) >= 4:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert folder_bytes(out) == before  # the old dataset is untouched
    assert partial.is_dir()  # what the killed run leaves: its temporary folder, under a name no reader uses
    tokenize(tok_dir, out, "--encoded_dataset_shard_size", "50000", "--overwrite")
    assert litter(tmp_path) == [] and dl.read_metadata(out)["total_documents"] == len(builtin_corpus_documents())


# ----------------------------------------------------------------------------------------------------------------
# Mistral's tokenizer (tekken file shipped with mistral-common) and the tiktoken engine


@pytest.mark.slow
def test_tiktoken_engine_gives_identical_ids_on_the_whole_corpus(tmp_path, mistral) -> None:
    """The tiktoken engine tokenize_data.py uses for Mistral's vocabulary must give exactly the ids of the
    tokenizer's own encode_batch: checked on every document of the built-in corpus plus unicode-heavy text, and
    against mistral_common's Tekkenizer (the reference implementation) on a slice."""
    texts = list(builtin_corpus_documents()) + UNICODE_DOCS
    fast = td.make_encoder(mistral, "tiktoken", workers=2)
    assert fast.engine == "tiktoken"
    got_flat, got_lengths = fast(texts)
    want_flat, want_lengths = td.tokenizers_encoder(mistral)(texts)
    assert np.array_equal(got_lengths, want_lengths) and np.array_equal(got_flat, want_flat)
    assert got_flat.size > 400_000
    reference = tekken.Tekkenizer.from_file(str(TEKKEN))
    pos = 0
    for text, n in zip(texts, got_lengths.tolist()):
        if text in UNICODE_DOCS[:10] or pos < 60_000:
            assert got_flat[pos:pos + n].tolist() == reference.encode(text, bos=False, eos=False)
        pos += n
    # whole pipeline: uint32 shards, same bytes with either engine, round trip
    for engine in ("tiktoken", "tokenizers"):
        (tmp_path / engine).mkdir()
        td.tokenize_documents(iter(texts[-400:]), mistral, tmp_path / engine, 20_000, progress=False,
                              encode=td.make_encoder(mistral, engine, workers=2))
    assert folder_bytes(tmp_path / "tiktoken") == folder_bytes(tmp_path / "tokenizers")
    assert dl.read_metadata(tmp_path / "tiktoken")["dtype"] == "uint32"
    assert_round_trip(tmp_path / "tiktoken", mistral, texts[-400:])


def test_a_tiktoken_mismatch_is_detected(mistral, monkeypatch, capsys) -> None:
    """tiktoken giving other ids than the tokenizer on the first documents: --encoder tiktoken is a one-line
    error, auto falls back to the tokenizer's own encode_batch with a warning."""
    real = td.tiktoken_encoder

    def wrong_by_one(tokenizer, workers):
        encode = real(tokenizer, workers)

        def shifted(texts):
            flat, lengths = encode(texts)
            flat = flat.copy()
            flat[len(flat) // 2] += 1  # one id off, somewhere in the middle
            return flat, lengths
        shifted.engine = "tiktoken"
        return shifted

    monkeypatch.setattr(td, "tiktoken_encoder", wrong_by_one)
    sample = UNICODE_DOCS[:10]
    with pytest.raises(UserError, match="tiktoken's ids differ"):
        td.make_encoder(mistral, "tiktoken", 1, sample)
    assert td.make_encoder(mistral, "auto", 1, sample).engine == "tokenizers"
    assert "differ" in capsys.readouterr().err
    monkeypatch.setattr(td, "tiktoken_encoder", real)
    assert td.make_encoder(mistral, "auto", 1, sample).engine == "tiktoken"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: non-zero exit and one line on stderr


def test_skipped_rows_are_reported_and_all_skipped_is_an_error(tmp_path, tok_dir) -> None:
    rows = [{"text": "a real document"}, {"text": None}, {"text": 5}, {"other": "x"}, {"text": "another one"}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tokenize(tok_dir, tmp_path / "out", "--dataset_path_huggingface", str(source))
    assert "skipped 3 of the 5 rows" in result.stderr
    assert dl.read_metadata(tmp_path / "out")["skipped_rows"] == {"int": 1, "null": 2}
    bad = tmp_path / "numbers.jsonl"
    bad.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(5)))
    message = one_line_error(run_script("tokenize_data.py", "--tokenizer_path", str(tok_dir),
                                        "--dataset_path_huggingface", str(bad), "--data_file_name",
                                        str(tmp_path / "o"), timeout=300))
    assert "every row" in message and "--text_column" in message and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_command_line_errors(tmp_path, tok_dir, tok, unicode_file) -> None:
    def run(*args):
        return run_script("tokenize_data.py", "--tokenizer_path", str(tok_dir), "--dataset_path_huggingface",
                          str(unicode_file), *args, timeout=300)

    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    assert "no documents" in one_line_error(run("--dataset_path_huggingface", str(tmp_path / "empty.jsonl"),
                                                "--data_file_name", str(tmp_path / "o1")))
    (tmp_path / "a_file").write_text("x")
    assert "a_file" in one_line_error(run("--data_file_name", str(tmp_path / "a_file" / "data")))
    assert "is a file" in one_line_error(run("--data_file_name", str(tmp_path / "a_file")))
    assert "tokenizer" in one_line_error(run_script(
        "tokenize_data.py", "--tokenizer_path", str(tmp_path / "no_tokenizer"), "--data_file_name",
        str(tmp_path / "o2"), timeout=120))
    for args, expected in [(("--encoded_dataset_shard_size", "1e12"), "invalid int value"),
                           (("--encoded_dataset_shard_size", str(10 ** 12)), "--encoded_dataset_shard_size must"),
                           (("--val_fraction", "0.9"), "--val_fraction must be"),
                           (("--val_tokens", "-1"), "--val_tokens must be >= 0")]:
        assert expected in one_line_error(run("--data_file_name", str(tmp_path / "o3"), *args))
    out = tmp_path / "data"
    out.mkdir()
    td.tokenize_documents(iter(UNICODE_DOCS), tok, out, 200, progress=False)
    before = folder_bytes(out)
    assert "--overwrite" in one_line_error(run("--data_file_name", str(out)))
    (out / "my_notes.txt").write_text("keep me")
    assert "my_notes.txt" in one_line_error(run("--data_file_name", str(out), "--overwrite"))
    (out / "my_notes.txt").unlink()
    assert folder_bytes(out) == before
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3")) and litter(tmp_path) == []
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


def test_a_run_killed_between_its_two_renames_is_repaired(tmp_path, tok) -> None:
    """A run killed after moving the old dataset aside and before renaming the new one into place: the next run
    (common.recover_atomic_folder, called by main before any work) puts the old one back; temporary folders
    of a live process are left alone."""
    from common import recover_atomic_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old = tmp_path / f".tmp_old_data_{dead}"
    old.mkdir()
    td.tokenize_documents(iter(UNICODE_DOCS), tok, old, 200, progress=False)
    before = folder_bytes(old)
    (tmp_path / f".tmp_data_{dead}").mkdir()
    (tmp_path / f".tmp_data_{dead}" / "train_000000.npy").write_bytes(b"partial")
    live = tmp_path / f".tmp_data_{os.getpid()}"
    live.mkdir()
    recover_atomic_folder(tmp_path / "data")
    assert folder_bytes(tmp_path / "data") == before
    assert litter(tmp_path) == [live.name]
