"""Tokenizers: Mistral-Nemo's tokenizer must give exactly mistral_common's ids; the trained byte-level BPE must
round-trip any text, be deterministic, and load in transformers; every user mistake is a one-line error.

The reference for Mistral is mistral_common's own Tekkenizer (tiktoken) on the tekken_240718.json it ships (Nemo's
tokenizer). The HF-format tokenizer.json is built from it with transformers' MistralConverter, an independent
converter whose output these tests check against mistral_common rather than trust.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import config
import tokenizer as tk
from corpus import builtin_corpus_documents
from tests.conftest import ROOT, run_script

VARIED_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "if (a != b && c >= 0) { printf(\"%d\\n\", a[i++]); }",
    "0 1 12 123 1234 12345 3.14159265 -2.5e-10 0x1F 1,000,000 2024-07-18",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\n\r\n\r\n mixed  \t \n  runs      of        spaces",
    "日本語のテキストです。中文文本，汉字。한국어 텍스트입니다.",
    "مرحبا بالعالم، هذا نص عربي. שלום עולם",
    "Emoji: 🎉🚀🔥 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    "Accents: café, naïve, Ångström, crème brûlée, ÉCOLE, Straße, İstanbul, ǅ",
    "Combining: e\u0301 a\u0308 n\u0303; zero-width\u200bspace; nbsp\u00a0here; soft\u00adhyphen",
    "Control-looking text: [INST] <s> </s> <unk> <pad> <|bos|> <|eos|> [TOOL_CALLS]",
    "Ελληνικά, Русский текст, हिन्दी, ไทย",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ababababab abaaba ----------------",
    "x",
    " ",
    "\n",
    "",
]


def corpus_sample() -> list[str]:
    """The varied texts plus a deterministic chunk of the built-in corpus (every 40th document)."""
    return VARIED_TEXTS + list(builtin_corpus_documents()[::40])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------------------------
# Mistral-Nemo


@pytest.fixture(scope="module")
def tekken_path() -> Path:
    import mistral_common  # a test requirement (requirements-dev.txt): missing it is a failure, not a skip

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def reference(tekken_path):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(tekken_path)


@pytest.fixture(scope="module")
def mistral_hf_dir(tekken_path, tmp_path_factory) -> Path:
    """A folder holding the HF-format tokenizer.json built from tekken by transformers' converter."""
    from transformers.integrations.mistral.tokenizer import MistralConverter

    folder = tmp_path_factory.mktemp("mistral_hf")
    MistralConverter(str(tekken_path)).converted().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def mistral_from_json(mistral_hf_dir) -> tk.Tokenizer:
    """Loaded the way every script does: flags parsed by config.parse_config, then load_tokenizer."""
    opts = config.parse_config(config.TokenizeDataConfig, ["--load_mistral_tokenizer=True",
                                                           "--mistral_tokenizer_path", str(mistral_hf_dir)])
    return tk.load_tokenizer(opts)


@pytest.fixture(scope="module")
def mistral_from_tekken(tekken_path, tmp_path_factory) -> tk.Tokenizer:
    """Mistral's native tekken.json, given as the folder that holds it."""
    folder = tmp_path_factory.mktemp("mistral_tekken")
    (folder / "tekken.json").write_bytes(tekken_path.read_bytes())
    return tk.load_tokenizer(config.TokenizerOptions(load_mistral_tokenizer=True,
                                                     mistral_tokenizer_path=str(folder)))


@pytest.fixture(scope="module")
def reference_ids(reference) -> list[list[int]]:
    """mistral_common's ids for corpus_sample(), computed once for both loading paths."""
    return [reference.encode(text, bos=False, eos=False) for text in corpus_sample()]


def assert_matches_reference(ours: tk.Tokenizer, reference, reference_ids: list[list[int]]) -> None:
    texts = corpus_sample()
    assert ours.encode_batch(texts) == reference_ids
    for text, expected in zip(texts, reference_ids):
        assert ours.encode(text) == expected, text[:80]
        decoded = ours.decode(expected)
        assert decoded == text, text[:80]
        assert decoded == reference.decode(expected)


def test_mistral_tokenizer_json_matches_mistral_common(mistral_from_json, reference, reference_ids):
    tok = mistral_from_json
    assert (tok.kind, tok.vocab_size) == ("mistral", 131072) == ("mistral", reference.n_words)
    assert (tok.token_to_id("<unk>"), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.bos_id, tok.eos_id) == (reference.bos_id, reference.eos_id)
    assert tok.pad_id == tok.token_to_id("<pad>") == reference.get_special_token("<pad>")
    assert_matches_reference(tok, reference, reference_ids)
    text = "Hello <s> world"
    assert tok.encode_document(text) == [1, *reference.encode(text, bos=False, eos=False), 2]


def test_mistral_tekken_json_matches_mistral_common(mistral_from_tekken, mistral_from_json, reference,
                                                    reference_ids):
    tok = mistral_from_tekken
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("mistral", 131072, 1, 2, 11)
    assert tok.source.endswith("tekken.json")
    assert_matches_reference(tok, reference, reference_ids)
    # the in-memory conversion is the same tokenizer as the HF file: same vocab, merges and fingerprint
    assert tok.fingerprint == mistral_from_json.fingerprint
    assert tok.backend.get_vocab() == mistral_from_json.backend.get_vocab()
    # the loaders' fingerprint (from the parsed file) is the one recomputed from the loaded backend
    assert tk.compute_fingerprint(tok.backend) == tok.fingerprint
    assert tk.compute_fingerprint(mistral_from_json.backend) == mistral_from_json.fingerprint


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_mistral_random_unicode_matches_mistral_common(mistral_from_tekken, reference, text):
    ids = mistral_from_tekken.encode(text)
    assert ids == reference.encode(text, bos=False, eos=False)
    assert mistral_from_tekken.decode(ids) == text


@pytest.fixture(scope="module")
def small_tekken_path(tekken_path, tmp_path_factory) -> Path:
    """A tekken file in the newer layout: its own special_tokens list (here without <pad>, and fewer than
    num_special_tokens), a vocabulary longer than default_vocab_size keeps."""
    full = json.loads(tekken_path.read_text(encoding="utf-8"))
    specials = ["<unk>", "<s>", "</s>", "[INST]"]
    small = {"config": {**full["config"], "default_vocab_size": 3010, "default_num_special_tokens": 10},
             "vocab": full["vocab"][:3500],  # more than the 3000 that default_vocab_size keeps
             "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)]}
    path = tmp_path_factory.mktemp("small_tekken") / "tekken.json"
    path.write_text(json.dumps(small), encoding="utf-8")
    return path


def test_small_tekken_with_own_special_tokens_matches_mistral_common(small_tekken_path):
    """Same ids as mistral_common, filler <SPECIAL_i> tokens, and padding falls back to <unk>."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    path = small_tekken_path
    reference = Tekkenizer.from_file(path)
    ours = tk.load_mistral_tokenizer(path)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (3010, 1, 2, 0)
    assert ours.token_to_id("<SPECIAL_9>") == 9 and ours.token_to_id("[INST]") == 3
    texts = corpus_sample()
    expected = [reference.encode(text, bos=False, eos=False) for text in texts]
    assert ours.encode_batch(texts) == expected
    assert [ours.decode(ids) for ids in expected] == texts
    assert max(max(ids, default=0) for ids in expected) >= 2900  # the upper ranks are really used


def test_mistral_folder_prefers_tokenizer_json(small_tekken_path, tmp_path):
    """A folder holding both files: tokenizer.json is read (here the HF form of the small tekken file)."""
    from_tekken = tk.load_mistral_tokenizer(small_tekken_path)
    from_tekken.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tekken.json").write_text("not read")
    from_folder = tk.load_mistral_tokenizer(tmp_path)
    assert from_folder.source.endswith("tokenizer.json")
    assert from_folder.fingerprint == from_tekken.fingerprint
    text = "Folder test: 123 héllo"
    assert from_folder.encode(text) == from_tekken.encode(text)


# ----------------------------------------------------------------------------------------------------------------
# Trained tokenizer


TRAIN_ARGS = ("--vocab_size", "1000", "--tokenizer_train_shard_size", "300000")


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """The same training run twice, in two separate processes (run side by side)."""
    folders = [tmp_path_factory.mktemp(f"trained_{name}") for name in ("a", "b")]
    processes = [subprocess.Popen([sys.executable, str(ROOT / "train_tokenizer.py"), *TRAIN_ARGS,
                                   "--output_path", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for folder in folders]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def trained(trained_dirs) -> tk.Tokenizer:
    return tk.load_tokenizer(config.TokenizerOptions(tokenizer_path=str(trained_dirs[0])))


def test_training_is_deterministic(trained_dirs):
    a, b = trained_dirs
    for name in (tk.TOKENIZER_FILE, tk.METADATA_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_trained_layout_and_metadata(trained, trained_dirs):
    assert trained.kind == "trained"
    assert trained.vocab_size == 1000
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 1, 2)
    for i, token in enumerate(tk.TRAINED_SPECIAL_TOKENS):
        assert trained.token_to_id(token) == i
    meta = json.loads((trained_dirs[0] / tk.METADATA_FILE).read_text())
    assert meta["kind"] == "trained" and meta["vocab_size"] == 1000
    assert meta["fingerprint"] == trained.fingerprint == tk.compute_fingerprint(trained.backend)
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2)
    # every byte is in the vocabulary: nothing is ever unknown
    backend = json.loads((trained_dirs[0] / tk.TOKENIZER_FILE).read_text())
    assert set(tk.bytes_to_unicode().values()) <= set(backend["model"]["vocab"])
    # a direct path to tokenizer.json is the same tokenizer
    direct = tk.load_trained_tokenizer(trained_dirs[0] / tk.TOKENIZER_FILE)
    assert direct.fingerprint == trained.fingerprint


def test_trained_encode_interface(trained):
    texts = corpus_sample()[:60]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    text = "Special strings stay text: <|eos|> <|bos|> <|pad|>"
    ids = trained.encode(text)
    assert not {0, 1, 2} & set(ids)
    assert trained.decode(ids) == text
    assert trained.encode_document(text) == [1, *ids, 2]
    assert trained.decode(trained.encode_document(text)) == text  # specials skipped
    clone = pickle.loads(pickle.dumps(trained))  # as sent to encoding worker processes
    assert (clone.encode(text), clone.fingerprint, clone.bos_id) == (ids, trained.fingerprint, 1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_trained_round_trips_random_unicode(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_trained_loads_unchanged_in_tokenizers_and_transformers(trained, trained_dirs):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    file = str(trained_dirs[0] / tk.TOKENIZER_FILE)
    raw = tokenizers.Tokenizer.from_file(file)
    fast = PreTrainedTokenizerFast(tokenizer_file=file)
    for text in corpus_sample()[:80]:
        if "<|" in text:  # transformers parses special-token strings inside text; we deliberately don't
            continue
        ids = trained.encode(text)
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert fast.encode(text, add_special_tokens=False) == ids
        assert fast.decode(ids) == text


def test_check_fingerprint(trained, mistral_from_tekken):
    tk.check_fingerprint(trained, trained.fingerprint, "the shards")
    with pytest.raises(config.UserError, match="the shards"):
        tk.check_fingerprint(trained, mistral_from_tekken.fingerprint, "the shards")
    assert trained.describe() == {"kind": "trained", "fingerprint": trained.fingerprint, "vocab_size": 1000}


# ----------------------------------------------------------------------------------------------------------------
# Flags and user mistakes


@pytest.mark.parametrize("argv, expected", [(["--load_mistral_tokenizer=False"], False),
                                            (["--load_mistral_tokenizer=True"], True),
                                            (["--load_mistral_tokenizer"], True),
                                            (["--load_mistral_tokenizer", "false"], False),
                                            ([], False)])
def test_load_mistral_tokenizer_flag(argv, expected):
    assert config.parse_config(config.TokenizerOptions, argv).load_mistral_tokenizer is expected
    assert config.parse_config(config.TrainConfig, argv, with_model_args=True)[0].load_mistral_tokenizer \
        is expected


def test_train_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_script("train_tokenizer.py", "--dataset_path_huggingface", str(empty),
                                     "--output_path", str(tmp_path / "out")), "no text")
    assert_one_line_error(run_script("train_tokenizer.py", "--vocab_size", "200",
                                     "--output_path", str(tmp_path / "out")), "--vocab_size",
                          str(256 + len(tk.TRAINED_SPECIAL_TOKENS)))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_script("train_tokenizer.py", "--output_path", str(blocker / "sub")),
                          "--output_path")


def test_tokenizer_file_errors_are_one_line(tmp_path, trained_dirs):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xffnot json at all")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"hello": "world"}')
    bad_tekken = tmp_path / "tekken.json"
    bad_tekken.write_text('{"config": {"pattern": "x"}, "vocab": [{"rank": 5}]}')
    cases = [
        (("--tokenizer_path", str(garbage)), "garbage.json"),
        (("--tokenizer_path", str(wrong)), "not a Hugging Face tokenizer.json"),
        (("--tokenizer_path", str(tmp_path / "nowhere")), "train_tokenizer.py"),
        (("--load_mistral_tokenizer=True", "--mistral_tokenizer_path", str(garbage)), "garbage.json"),
        (("--load_mistral_tokenizer=True", "--mistral_tokenizer_path", str(wrong)), "wrong.json"),
        (("--load_mistral_tokenizer=True", "--mistral_tokenizer_path", str(bad_tekken)), "tekken.json"),
        (("--load_mistral_tokenizer=True", "--mistral_tokenizer_path", str(trained_dirs[0])),
         "--load_mistral_tokenizer"),
        (("--load_mistral_tokenizer=True", "--mistral_tokenizer_path", str(tmp_path / "missing.json")),
         "https://huggingface.co/mistralai/Mistral-Nemo-Base-2407", "--mistral_tokenizer_path"),
    ]
    for args, *needles in cases:
        assert_one_line_error(run_script("tokenizer.py", *args, cwd=tmp_path), *needles)


def test_missing_default_mistral_file_says_where_to_put_it(tmp_path, monkeypatch):
    """The default --mistral_tokenizer_path (tokenizer.json, looked up in the current then the project directory)
    with neither holding it: the message says where to download it and where to put it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tk, "PROJECT_DIR", tmp_path / "project")
    with pytest.raises(config.UserError) as error:
        tk.load_tokenizer(config.TokenizerOptions(load_mistral_tokenizer=True))
    message = str(error.value)
    assert "\n" not in message
    for needle in ("https://huggingface.co/mistralai/Mistral-Nemo-Base-2407", "tokenizer.json", "project directory",
                   "--mistral_tokenizer_path"):
        assert needle in message


def test_recorded_file_wins_over_the_project_folder_fallback(tmp_path, monkeypatch):
    """A checkpoint (or HF folder) records its tokenizer file. When the named --tokenizer_path does not exist as
    given, that file is loaded, not the project folder's tokenizer/ of the same name, which here is another
    tokenizer; a named path that does exist is still used as given."""
    from tests.stage_fixtures import make_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tk, "PROJECT_DIR", tmp_path / "project")
    other = make_tokenizer(tmp_path / "project" / "tokenizer", vocab_size=300)
    own = make_tokenizer(tmp_path / "run" / "tok", vocab_size=320)
    assert own.fingerprint != other.fingerprint
    loaded = tk.load_recorded_tokenizer(config.TokenizerOptions(), tk.recorded_tokenizer(own), "the checkpoint")
    assert loaded.fingerprint == own.fingerprint and loaded.vocab_size == 320
    # named and present as given: that file, checked against the record
    with pytest.raises(config.UserError, match="fingerprint|different tokenizer"):
        tk.load_recorded_tokenizer(config.TokenizerOptions(tokenizer_path=str(tmp_path / "project" / "tokenizer")),
                                   tk.recorded_tokenizer(own), "the checkpoint")
