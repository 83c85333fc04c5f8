"""Train a byte-level BPE tokenizer and write `<output_path>/tokenizer.json` plus `tokenizer_metadata.json`.

The folder is written as one unit (built under a temporary name, then renamed): a crash never leaves a
tokenizer.json without its metadata, and an existing tokenizer is replaced only with --overwrite, once the new
one is complete (datasets and checkpoints record the fingerprint of the tokenizer they were made with).

    python train_tokenizer.py --vocab_size 32768                       # built-in corpus (offline)
    python train_tokenizer.py --dataset_path_huggingface HuggingFaceFW/fineweb --dataset_sub_set sample-10BT \
        --tokenizer_train_shard_size 50000000 --vocab_size 32768

The merges are learned by the `tokenizers` library's Rust BpeTrainer (fast, and deterministic: the same text and
options give a byte-identical file). Text is split by the GPT-4 regex, then mapped to bytes (ByteLevel, the full
256-byte alphabet is always in the vocabulary, so no input is ever unknown). Special tokens come first:
<|pad|>=0, <|bos|>=1, <|eos|>=2, then <|reserved_0..4|>. The output loads unchanged with
`tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import tokenizers
from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from tqdm import tqdm

import corpus
from common import atomic_folder, atomic_write, check_destination, recover_atomic_folder
from config import TrainTokenizerConfig, UserError, parse_config, remove_new_folder_on_failure, run_main
from tokenizer import (BOS_TOKEN, EOS_TOKEN, METADATA_FILE, PAD_TOKEN, TOKENIZER_FILE, TRAINED_SPECIAL_TOKENS,
                       compute_fingerprint)

# GPT-4's (cl100k) split: contractions, words with one leading non-letter, numbers in groups of up to 3 digits,
# punctuation runs, newlines, and whitespace (the last space of a run is left to join the following word).
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                      r"""\s*[\r\n]|\s+(?!\S)|\s+""")
MIN_VOCAB_SIZE = 256 + len(TRAINED_SPECIAL_TOKENS)


def build_untrained_tokenizer() -> tokenizers.Tokenizer:
    """An empty byte-level BPE with the split regex, ByteLevel mapping and decoder, ready for the trainer."""
    tok = tokenizers.Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated", invert=False),
        # use_regex=False: the split is already done above; ByteLevel only maps bytes to its printable alphabet.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def limited_documents(documents: Iterator[str], max_chars: int, progress: tqdm | None = None) -> Iterator[str]:
    """Documents until max_chars characters have been yielded (the last one cut to fit); updates the bar."""
    remaining = max_chars
    for text in documents:
        if remaining <= 0:
            return
        if len(text) > remaining:
            text = text[:remaining]
        remaining -= len(text)
        if progress is not None:
            progress.update(len(text))
        yield text


def train_on_documents(documents: Iterable[str], vocab_size: int, min_frequency: int = 2,
                       max_chars: int | None = None, show_progress: bool = False) -> tuple[tokenizers.Tokenizer, int]:
    """Learn the BPE merges from documents (at most max_chars characters) with the Rust trainer; returns
    (tokenizer, characters read). Separate from the CLI so the benchmark trains exactly what the script does."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab_size {vocab_size} is too small: it must hold the 256 byte tokens and "
                        f"{len(TRAINED_SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB_SIZE}")
    tok = build_untrained_tokenizer()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                         special_tokens=list(TRAINED_SPECIAL_TOKENS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading text", disable=not show_progress,
              file=sys.stderr) as bar:
        limit = max_chars if max_chars is not None else sys.maxsize
        tok.train_from_iterator(limited_documents(iter(documents), limit, bar), trainer=trainer)
        chars = bar.n
    return tok, chars


def train(cfg: TrainTokenizerConfig, show_progress: bool = True) -> tuple[tokenizers.Tokenizer, int]:
    """Train on up to cfg.tokenizer_train_shard_size characters of cfg's dataset; returns (tokenizer, chars)."""
    if cfg.vocab_size < MIN_VOCAB_SIZE:  # checked before reading any data
        train_on_documents([], cfg.vocab_size)
    documents = corpus.iter_documents(cfg)
    first = next(documents, None)  # read one document now: an empty dataset is an error, not an empty vocab
    if first is None:
        raise UserError(f"the dataset '{cfg.dataset_path_huggingface}' has no text to train on")
    return train_on_documents(itertools.chain([first], documents), cfg.vocab_size, cfg.min_frequency,
                              cfg.tokenizer_train_shard_size, show_progress)


def metadata(tok: tokenizers.Tokenizer, cfg: TrainTokenizerConfig, chars: int) -> dict[str, Any]:
    """The small description written beside tokenizer.json (no timestamps: same input, same file)."""
    return {
        "kind": "trained",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": cfg.vocab_size,
        "fingerprint": compute_fingerprint(tok),
        "source": corpus.describe_source(cfg),
        "train_chars": chars,
        "min_frequency": cfg.min_frequency,
        "special_tokens": {name: tok.token_to_id(name) for name in TRAINED_SPECIAL_TOKENS},
        "pad_id": tok.token_to_id(PAD_TOKEN), "bos_id": tok.token_to_id(BOS_TOKEN),
        "eos_id": tok.token_to_id(EOS_TOKEN),
        "split_pattern": GPT4_SPLIT_PATTERN,
        "tokenizers_version": tokenizers.__version__,
    }


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot be (re)placed, before training; creates and deletes nothing."""

    check_destination(out, "--output_path")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = {TOKENIZER_FILE, METADATA_FILE}
    if any(name in ours for name in existing) and not overwrite:
        raise UserError(f"'{out}' already holds a tokenizer (datasets and checkpoints made with it would no longer "
                        f"match); pass --overwrite to replace it or choose another --output_path")
    foreign = [name for name in existing if name not in ours]
    if foreign:
        raise UserError(f"the output folder '{out}' holds other files (e.g. {foreign[0]}) that writing the "
                        f"tokenizer would delete; move them or choose another --output_path")


def main(argv: list[str] | None = None) -> None:

    cfg = parse_config(TrainTokenizerConfig, argv, description=__doc__.split("\n\n")[0])
    out = Path(cfg.output_path).expanduser()
    check_output(out, cfg.overwrite)
    recover_atomic_folder(out)
    with remove_new_folder_on_failure(out.parent), atomic_folder(out, "--output_path") as tmp:
        tok, chars = train(cfg)
        meta = metadata(tok, cfg, chars)
        atomic_write(tmp / TOKENIZER_FILE, tok.to_str(pretty=True), "--output_path")
        atomic_write(tmp / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                     "--output_path")
    note = "" if meta["vocab_size"] == cfg.vocab_size else \
        f" (asked for {cfg.vocab_size}; the text supports no more merges)"
    print(f"trained on {chars:,} characters from {meta['source']}: vocab {meta['vocab_size']}{note}, "
          f"fingerprint {meta['fingerprint']} -> {out / TOKENIZER_FILE}")


if __name__ == "__main__":
    run_main(main)
