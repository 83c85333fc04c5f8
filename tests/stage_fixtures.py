"""A tiny starting checkpoint for the dpo.py / rl.py / tasks.py command-line tests: a small trained tokenizer
(digits as single tokens, as the built-in tasks need) and a random tiny model that records it."""
from __future__ import annotations

from pathlib import Path

import torch

import tokenizer as tk


def make_tokenizer(folder: Path, vocab_size: int = 300) -> tk.Tokenizer:
    """A small trained tokenizer (our special tokens first), written like train_tokenizer.py writes it."""
    from tokenizers import pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    import train_tokenizer

    backend = train_tokenizer.build_untrained_tokenizer()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(tk.TRAINED_SPECIAL_TOKENS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = ["The function returns the value of the argument.", "Hello world, hello there!",
             "def f(x):\n    return x * 2\n", "Numbers 12345 and more words for merges."] * 20
    backend.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tk.TOKENIZER_FILE).write_text(backend.to_str())
    return tk.load_tokenizer(tk.TokenizerOptions(tokenizer_path=str(folder)))


def tiny_checkpoint(root: Path, seed: int = 0) -> tuple[Path, tk.Tokenizer]:
    """root/tok (tokenizer) and root/start (a checkpoint of a random tiny-dense model, max_seq_len 32)."""
    import checkpoint
    from config import model_args_from_preset
    from model import Transformer

    tok = make_tokenizer(root / "tok")
    torch.manual_seed(seed)
    args = model_args_from_preset("tiny-dense", vocab_size=tok.vocab_size, max_seq_len=32, dim=64, inter_dim=128)
    model = Transformer(args)
    model.init_weights()
    meta = {"model_args": args.to_dict(), "tokenizer": tk.recorded_tokenizer(tok), "train_config": {}}
    checkpoint.save_checkpoint(root / "start", 1, model, None, meta, {"step": 1}, keep=1, tokenizer_file=tok.source)
    return root / "start", tok
