"""Small shared pieces for the chat tests (test_chat, test_serve, test_sft): a trained tokenizer with the chat
tokens, and a random tiny checkpoint recording it."""
from __future__ import annotations

import math
from pathlib import Path

import torch

import checkpoint
import tokenizer as tk
from config import ModelArgs
from model import Transformer

TEXTS = ["The function returns the value of the argument.", "Hello world, hello there! How are you?",
         "def f(x):\n    return x * 2\n", "Numbers 12345 and more words for merges.",
         "Explain the with statement. What does os.path.join do?"] * 20


def make_tokenizer(folder: Path, vocab_size: int = 320) -> tk.Tokenizer:
    """A small tokenizer trained as train_tokenizer.py trains one (TRAINED_SPECIAL_TOKENS first)."""
    import train_tokenizer

    backend, _ = train_tokenizer.train_on_documents(TEXTS, vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tk.TOKENIZER_FILE).write_text(backend.to_str())
    return tk.load_tokenizer(tk.TokenizerOptions(tokenizer_path=str(folder)))


def tiny_args(vocab_size: int, **overrides) -> ModelArgs:
    values = dict(vocab_size=vocab_size, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1,
                  n_heads=2, max_seq_len=128, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
                  score_func="sigmoid")
    values.update(overrides)
    return ModelArgs(**values)


@torch.no_grad()
def random_model(args: ModelArgs, seed: int = 0, router_bias: float = 0.0) -> Transformer:
    """Random weights with spread-out logits (no near-ties for greedy decoding), non-trivial norm weights and,
    with router_bias, a random non-zero router bias of that scale."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif name == "embed.weight":
            p.normal_(0, 1.0)
        elif not name.endswith("gate.bias"):
            p.normal_(0, 1.5 / math.sqrt(p.shape[-1]))
    for moe in model.moe_layers():
        moe.gate.bias.copy_(router_bias * torch.randn_like(moe.gate.bias))
    return model.eval()


def save_checkpoint(root: Path, model: Transformer, tok: tk.Tokenizer, step: int = 1) -> Path:
    meta = {"model_args": model.args.to_dict(), "tokenizer": tk.recorded_tokenizer(tok), "train_config": {}}
    return checkpoint.save_checkpoint(root, step, model, None, meta, {}, keep=1)
