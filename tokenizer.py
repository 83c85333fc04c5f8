"""The one tokenizer interface every script uses: a trained byte-level BPE (train_tokenizer.py) or Mistral-Nemo's.

Both kinds are a `tokenizers.Tokenizer` (Rust) underneath, wrapped by `Tokenizer`, which exposes only what the
pipeline needs: encode / encode_batch / encode_document / decode, the pad/bos/eos ids, the vocabulary size and a
fingerprint. The fingerprint (a hash of the vocabulary and merges) is recorded in token shards and checkpoints so
a later stage given a different tokenizer stops with a clear error instead of training on or generating gibberish.

Mistral-Nemo's tokenizer is read either from the HF-format `tokenizer.json` of Mistral-Nemo-Base-2407 or from
Mistral's native `tekken.json` (tiktoken-style ranks), which is converted in memory to the same HF tokenizer by
`tekken_to_hf` below.

Special-token handling: text is always encoded with `encode_special_tokens=True`, i.e. a document that happens to
contain the string "<|eos|>" or "</s>" is tokenized as ordinary text, never as the control token. This matches
mistral_common's default (special tokens in text are ignored) and means data can't inject control tokens; the
only control tokens in a sequence are the bos/eos that `encode_document` adds.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from common import first_line
from config import InspectTokenizerConfig, TokenizerOptions, UserError, parse_config, run_main

PROJECT_DIR = Path(__file__).resolve().parent
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "tokenizer_metadata.json"
TEKKEN_FILE = "tekken.json"

# Trained tokenizer: special tokens and their fixed ids (train_tokenizer.py puts them first, in this order).
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
# Chat turns (chat.py): a turn is <|role|> content <|end_of_turn|>. Tokenizers trained before these existed lack
# them (their ids 3.. were <|reserved_i|>); chat_template() is None for those and chat.py says how to fix it.
SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN = "<|system|>", "<|user|>", "<|assistant|>", \
    "<|end_of_turn|>"
CHAT_TOKENS: tuple[str, ...] = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)
NUM_RESERVED_TOKENS = 5
TRAINED_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) + CHAT_TOKENS + tuple(
    f"<|reserved_{i}|>" for i in range(NUM_RESERVED_TOKENS))

# The chat templates as Jinja, for the exported HF folder's tokenizer_config.json: transformers'
# apply_chat_template gives exactly chat.py's ids (tests/test_chat.py). {% generation %} marks what the
# assistant-only loss trains (return_assistant_tokens_mask). Trained tokenizer:
#   <|bos|> (<|system|>|<|user|>|<|assistant|>) content <|end_of_turn|> ... [<|assistant|> when prompting]
TRAINED_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end_of_turn|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
# Mistral-Nemo (mistral_common's instruct tokenizer v3, the version of the tekken files it ships): system prompts
# are joined with a blank line and put before the last user message; an assistant reply has its trailing spaces
# removed and ends with </s>:  <s>[INST]user[/INST]reply</s>[INST]system\n\nuser[/INST]
MISTRAL_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='', last_user=-1) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] if not ns.system else ns.system + '\n\n' + message['content'] %}"
    "{% elif message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% elif message['role'] != 'assistant' %}{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == ns.last_user and ns.system %}{{ '[INST]' + ns.system + '\n\n' + message['content'] + "
    "'[/INST]' }}{% else %}{{ '[INST]' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'].rstrip(' ') + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}")

# Mistral-Nemo's control tokens. Padding uses <pad> (id 11 in Nemo); a vocabulary without it pads with <unk>
# (id 0), a control token that byte-level BPE never produces from text, so padding can't collide with real text.
MISTRAL_BOS, MISTRAL_EOS, MISTRAL_UNK, MISTRAL_PAD = "<s>", "</s>", "<unk>", "<pad>"
MISTRAL_DOWNLOAD_URL = "https://huggingface.co/mistralai/Mistral-Nemo-Base-2407"
# Special tokens of tekken files that don't list their own (mistral_common's Tekkenizer.DEPRECATED_SPECIAL_TOKENS,
# copied so conversion doesn't need mistral_common); the rest up to num_special_tokens are "<SPECIAL_{i}>".
TEKKEN_DEFAULT_SPECIALS: tuple[str, ...] = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and identity the training/generation pipeline needs."""

    def __init__(self, backend: tokenizers.Tokenizer, kind: str, bos_id: int, eos_id: int, pad_id: int,
                 source: str = "", fingerprint: str | None = None) -> None:
        """fingerprint: pass it when already known (loaders compute it from the parsed file, which is cheaper
        than re-serialising a 131k vocabulary); otherwise it is computed from the backend."""
        self.backend = backend
        # Documents are text: never turn "<|eos|>" written inside a document into the control token.
        self.backend.encode_special_tokens = True
        self.kind = kind
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.fingerprint = fingerprint or compute_fingerprint(backend)
        self.source = source

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (e.g. in an encoding worker process): tokenizers.Tokenizer's pickle drops the
        encode_special_tokens flag, so set it again."""
        self.__dict__.update(state)
        self.backend.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        """Token ids of text, no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend (no special tokens added)."""
        if hasattr(self.backend, "encode_batch_fast"):  # skips offset tracking: noticeably faster
            encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        else:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_document(self, text: str) -> list[int]:
        """A document as the model sees it: [bos] + encode(text) + [eos]."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special tokens (pad/bos/eos/control) are skipped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template of this tokenizer (see chat.py), or None for a trained tokenizer made before
        the chat tokens were reserved."""
        if self.kind == "mistral":
            return MISTRAL_CHAT_TEMPLATE
        if all(self.token_to_id(t) is not None for t in CHAT_TOKENS):
            return TRAINED_CHAT_TEMPLATE
        return None

    def describe(self) -> dict[str, Any]:
        """What shards and checkpoints record about the tokenizer (checked later with check_fingerprint)."""
        return {"kind": self.kind, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, fingerprint={self.fingerprint!r})")


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint_of(vocab: dict[str, int], merges: Sequence[Any], added_tokens: dict[str, int] | None = None) -> str:
    """First 16 hex chars of sha256 over the vocabulary (token, id) sorted by id, added tokens included, and the
    merges as [left, right] pairs in order. Identical vocab and merges give an identical fingerprint whichever file
    format they come from (tekken.json and the equivalent tokenizer.json agree); settings outside the vocabulary
    and merges (regex, decoder) are not part of it."""
    tokens = dict(vocab)
    for content, token_id in (added_tokens or {}).items():
        tokens.setdefault(content, token_id)
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    canonical = {"vocab": sorted(([t, i] for t, i in tokens.items()), key=lambda x: (x[1], x[0])),
                 "merges": pairs}
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                          ).hexdigest()[:16]


def compute_fingerprint(backend: tokenizers.Tokenizer) -> str:
    """The fingerprint (see fingerprint_of) of a tokenizers.Tokenizer with a BPE (or other vocab-based) model."""
    model = json.loads(backend.model.__getstate__())  # the model section only: cheaper than the whole to_str()
    added = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items()}
    return fingerprint_of(model.get("vocab") or {}, model.get("merges") or [], added)


def check_fingerprint(tokenizer: Tokenizer, expected: str | None, what: str) -> None:
    """Stop (UserError) when `what` (e.g. "the token shards in data/") was made with another tokenizer. An empty
    `expected` means nothing was recorded, and is accepted."""
    if expected and expected != tokenizer.fingerprint:
        raise UserError(f"{what} was made with tokenizer fingerprint {expected}, but the loaded {tokenizer.kind} "
                        f"tokenizer has fingerprint {tokenizer.fingerprint}; pass the same tokenizer "
                        f"(--tokenizer_path / --load_mistral_tokenizer) or redo that stage with this one")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(opts: TokenizerOptions) -> Tokenizer:
    """The trained tokenizer at opts.tokenizer_path, or Mistral-Nemo's (opts.mistral_tokenizer_path) when
    opts.load_mistral_tokenizer. Any problem with the files is a one-line UserError."""
    if opts.load_mistral_tokenizer:
        return load_mistral_tokenizer(opts.mistral_tokenizer_path)
    return load_trained_tokenizer(opts.tokenizer_path)


def load_recorded_tokenizer(opts: TokenizerOptions, recorded: dict[str, Any] | None, what: str) -> Tokenizer:
    """The tokenizer that `what` (a checkpoint) was made with. It records the kind, fingerprint and file of its
    tokenizer: a Mistral checkpoint loads Mistral's tokenizer without --load_mistral_tokenizer, and when the
    tokenizer the options name does not exist as given, the recorded file is used instead (before the project
    folder's file of the same name, which may be another tokenizer), so that generate.py, the export and the
    fine-tuning stages need no tokenizer flag beside the checkpoint or HF folder. The fingerprint is always
    checked."""
    recorded = recorded or {}
    mistral = opts.load_mistral_tokenizer or recorded.get("kind") == "mistral"
    named = opts.mistral_tokenizer_path if mistral else opts.tokenizer_path
    stored_path = recorded.get("path")
    if not Path(named).expanduser().exists() and stored_path and Path(stored_path).is_file():
        named = stored_path
    field = "mistral_tokenizer_path" if mistral else "tokenizer_path"
    opts = dataclasses.replace(opts, load_mistral_tokenizer=mistral, **{field: named})
    tokenizer = load_tokenizer(opts)
    check_fingerprint(tokenizer, recorded.get("fingerprint"), what)
    return tokenizer


def recorded_tokenizer(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint records about its tokenizer (read back by load_recorded_tokenizer)."""
    return {**tokenizer.describe(), "path": str(Path(tokenizer.source).resolve()) if tokenizer.source else ""}


def _resolve(path: str | Path) -> Path:
    """A relative path that doesn't exist in the current directory is looked up in the project directory too, so
    the scripts find `tokenizer/` and Mistral's `tokenizer.json` when run from elsewhere."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_absolute() and (PROJECT_DIR / path).exists():
        return PROJECT_DIR / path
    return path


def _read_json(path: Path, what: str) -> tuple[str, Any]:
    """(text, parsed JSON) of a file; unreadable or non-JSON files are a one-line UserError."""
    try:
        text = path.read_text(encoding="utf-8")
        return text, json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot read {what} '{path}' ({type(error).__name__}: {first_line(error, 160)}); "
                        f"it must be a readable JSON file") from None


def _backend_from_json(text: str, data: Any, path: Path, what: str) -> tuple[tokenizers.Tokenizer, str]:
    """(backend, fingerprint) of a HF tokenizer.json given as its text and parsed form."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"'{path}' is not a Hugging Face tokenizer.json (no 'model' section); expected {what}")
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # the Rust side raises a plain Exception with a serde message
        raise UserError(f"'{path}' is not a valid tokenizer.json ({first_line(error, 160)}); expected {what}") from None
    try:
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
        fingerprint = fingerprint_of(data["model"].get("vocab") or {}, data["model"].get("merges") or [], added)
    except (KeyError, TypeError, ValueError, AttributeError):
        fingerprint = compute_fingerprint(backend)
    return backend, fingerprint


def _required_ids(backend: tokenizers.Tokenizer, names: Sequence[str], file: Path, what: str, other_kind_token: str,
                  other_kind_hint: str) -> dict[str, int]:
    """The ids of the tokens a kind of tokenizer must have; a UserError naming the missing ones otherwise (with a
    hint when the file holds other_kind_token, i.e. is the other kind of tokenizer)."""
    ids = {name: backend.token_to_id(name) for name in names}
    if None in ids.values():
        missing = ", ".join(name for name, i in ids.items() if i is None)
        hint = f" ({other_kind_hint})" if backend.token_to_id(other_kind_token) is not None else ""
        raise UserError(f"'{file}' lacks the special tokens {missing}, so it is not {what}{hint}")
    return ids


def load_trained_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer written by train_tokenizer.py: its folder, or the tokenizer.json inside it."""
    resolved = _resolve(path)
    file = resolved / TOKENIZER_FILE if resolved.is_dir() else resolved
    if not file.is_file():
        raise UserError(f"no trained tokenizer at '{path}' (looked for {file}); run `python train_tokenizer.py "
                        f"--output_path {path}` first, pass --tokenizer_path, or use --load_mistral_tokenizer=True")
    what = "a tokenizer trained by train_tokenizer.py"
    backend, fingerprint = _backend_from_json(*_read_json(file, "tokenizer file"), file, what)
    ids = _required_ids(backend, (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN), file, what, MISTRAL_BOS,
                        "this looks like Mistral's tokenizer: use --load_mistral_tokenizer=True")
    meta_file = file.parent / METADATA_FILE
    kind = "trained"
    if meta_file.is_file():
        _, meta = _read_json(meta_file, "tokenizer metadata")
        kind = meta.get("kind", kind) if isinstance(meta, dict) else kind
    return Tokenizer(backend, kind=kind, bos_id=ids[BOS_TOKEN], eos_id=ids[EOS_TOKEN], pad_id=ids[PAD_TOKEN],
                     source=str(file), fingerprint=fingerprint)


def _missing_mistral_message(path: str | Path) -> str:
    return (f"Mistral-Nemo's tokenizer was not found at '{path}'; download tokenizer.json from "
            f"{MISTRAL_DOWNLOAD_URL} (Files and versions) and put it in the project directory ({PROJECT_DIR}), "
            f"or pass --mistral_tokenizer_path to the file (tokenizer.json or tekken.json) or its folder")


def load_mistral_tokenizer(path: str | Path) -> Tokenizer:
    """Mistral-Nemo's tokenizer from its HF tokenizer.json, or from Mistral's tekken.json (converted in memory),
    or from a folder holding one of them (tokenizer.json preferred)."""
    resolved = _resolve(path)
    file = resolved
    if resolved.is_dir():
        candidates = [resolved / TOKENIZER_FILE, resolved / TEKKEN_FILE]
        file = next((c for c in candidates if c.is_file()), candidates[0])
    if not file.is_file():
        raise UserError(_missing_mistral_message(path))
    text, data = _read_json(file, "Mistral tokenizer file")
    what = "Mistral-Nemo's tokenizer.json or tekken.json"
    if isinstance(data, dict) and isinstance(data.get("vocab"), list) and isinstance(data.get("config"), dict):
        backend, fingerprint = tekken_to_hf(data, file)
    else:
        backend, fingerprint = _backend_from_json(text, data, file, what)
    del text, data
    ids = _required_ids(backend, (MISTRAL_UNK, MISTRAL_BOS, MISTRAL_EOS), file, what, BOS_TOKEN,
                        "this looks like a tokenizer trained by train_tokenizer.py: drop --load_mistral_tokenizer")
    pad_id = backend.token_to_id(MISTRAL_PAD)
    if pad_id is None:
        pad_id = ids[MISTRAL_UNK]
    return Tokenizer(backend, kind="mistral", bos_id=ids[MISTRAL_BOS], eos_id=ids[MISTRAL_EOS], pad_id=pad_id,
                     source=str(file), fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------------------------
# tekken.json -> HF tokenizer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of the HF ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tekken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF BPE merges equivalent to tiktoken's rank-based BPE.

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank. A HF merge list does the
    same if it holds, for every multi-byte token t, each split t = l + r with l and r in the vocabulary, ordered by
    rank(t); splits of the same t are ordered by (rank(l), rank(r)) (the order transformers' converter uses too,
    so both conversions give the same merges and fingerprint)."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


def tekken_to_hf(data: dict[str, Any], path: Path | str = "tekken.json") -> tuple[tokenizers.Tokenizer, str]:
    """Convert a parsed tekken.json into the HF tokenizer Mistral publishes as tokenizer.json.

    Layout (as mistral_common's Tekkenizer): ids [0, num_special) are the control tokens (the file's
    `special_tokens`, or the default list for old files, padded with "<SPECIAL_{i}>"); ids from num_special on are
    the first `default_vocab_size - num_special` byte tokens of `vocab`, in rank order. The model is a byte-level
    BPE with ignore_merges (a pre-token that is itself in the vocabulary maps to that token, as in tiktoken), the
    tekken split regex followed by ByteLevel, and the ByteLevel decoder. Returns (tokenizer, fingerprint)."""
    def bad(reason: str) -> UserError:
        return UserError(f"'{path}' is not a valid tekken.json ({reason})")

    try:
        config = data["config"]
        pattern = config["pattern"]
        num_special = int(config.get("default_num_special_tokens", 1000))
        vocab_size = int(config.get("default_vocab_size", num_special + len(data["vocab"])))
        special_entries = data.get("special_tokens")
        specials = ([str(t["token_str"]) for t in sorted(special_entries, key=lambda t: t["rank"])]
                    if special_entries is not None else list(TEKKEN_DEFAULT_SPECIALS))
        inner = data["vocab"][:vocab_size - num_special]
        token_bytes = [base64.b64decode(entry["token_bytes"]) for entry in inner]
        for position, entry in enumerate(inner):
            if int(entry["rank"]) != position:
                raise bad(f"vocab entry {position} has rank {entry['rank']}")
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise bad(f"{type(error).__name__}: {error}") from None
    if len(specials) > num_special:
        raise bad(f"{len(specials)} special tokens but default_num_special_tokens={num_special}")
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
    ranks = {token: rank for rank, token in enumerate(token_bytes)}
    if len(ranks) != len(token_bytes):
        raise bad("duplicate tokens in vocab")

    # bytes -> ByteLevel string: latin-1 maps each byte to the char of the same code, translate() remaps it.
    table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
    as_str = {token: token.decode("latin-1").translate(table) for token in token_bytes}
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({as_str[token]: rank + num_special for token, rank in ranks.items()})
    merges = [(as_str[left], as_str[right]) for left, right in tekken_merges(ranks)]
    try:
        backend = tokenizers.Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    except Exception as error:
        raise bad(f"{type(error).__name__}: {str(error)[:160]}") from None
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return backend, fingerprint_of(vocab, merges)


# ----------------------------------------------------------------------------------------------------------------
# Command line: inspect a tokenizer (also how tests exercise the loaders' one-line errors)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(InspectTokenizerConfig, argv)
    tok = load_tokenizer(cfg)
    ids = tok.encode(cfg.text)
    print(f"{tok!r} from {tok.source}")
    print(f"{len(cfg.text.encode('utf-8'))} bytes -> {len(ids)} tokens: {ids}")
    print("pieces:", [tok.id_to_token(i) for i in ids])


if __name__ == "__main__":
    run_main(main)
