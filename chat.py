"""Conversations as token ids (the chat template), the reply stream and history trimming that the terminal chat
(`generate.py --chat`) and serve.py share, and loading a model to chat with.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}. `ChatFormat`
turns it into the ids the model sees, plus a mask marking the tokens an assistant-only loss trains (the assistant
replies and the token that ends each of them), for both tokenizer kinds:

  trained:  <|bos|><|system|>S<|end_of_turn|><|user|>U<|end_of_turn|><|assistant|>A<|end_of_turn|>...
  mistral:  <s>[INST]U1[/INST]A1</s>[INST]S\\n\\nU2[/INST]A2</s>   (mistral_common's instruct v3, Nemo's)

Message contents are encoded as text: a "<|user|>" typed inside a message is never the control token. The same
templates, as Jinja, are in tokenizer.py (TRAINED_CHAT_TEMPLATE, MISTRAL_CHAT_TEMPLATE) and are written into
exported HF folders; tests/test_chat.py checks transformers' apply_chat_template and mistral_common give our ids.

The oldest turns are dropped when a conversation no longer fits the context with room for a reply (fit_history).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from config import UserError

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as a list of {role, content} dicts; ValueError naming the first problem otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; roles must be system, user or assistant")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no text content")
        out.append({"role": role, "content": content})
    return out


class ChatFormat:
    """The chat template of a tokenizer (tokenizer.Tokenizer): encode(messages) -> (ids, loss mask)."""

    def __init__(self, tokenizer) -> None:
        import tokenizer as tk

        self.tokenizer = tokenizer
        self.kind = "mistral" if tokenizer.kind == "mistral" else "trained"
        self.template = tokenizer.chat_template
        if self.template is None:
            raise UserError(f"the tokenizer {tokenizer.source or ''} has no chat tokens "
                            f"({', '.join(tk.CHAT_TOKENS)}): it was trained before they were reserved; retrain it "
                            f"with `python train_tokenizer.py` (which reserves them), then tokenize and pretrain "
                            f"with it")
        if self.kind == "mistral":
            ids = [tokenizer.token_to_id(t) for t in ("[INST]", "[/INST]")]
            if None in ids:
                raise UserError(f"the Mistral tokenizer {tokenizer.source} lacks [INST]/[/INST]")
            self.inst, self.end_inst = ids
            self.stop_ids = (tokenizer.eos_id,)
        else:
            self.role_ids = {role: tokenizer.token_to_id(f"<|{role}|>") for role in ROLES}
            self.end_of_turn = tokenizer.token_to_id(tk.END_OF_TURN_TOKEN)
            # a pretrained-only model may also end with <|eos|>: stop at either
            self.stop_ids = (self.end_of_turn, tokenizer.eos_id)

    def encode(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] is 1 where token i belongs to an assistant reply (its end-of-turn included), the
        tokens an assistant-only loss trains. add_generation_prompt appends what starts the assistant's reply."""
        messages = check_messages(messages)
        encode = self.tokenizer.encode
        ids, mask = [self.tokenizer.bos_id], [0]

        def add(tokens: list[int], trained: int) -> None:
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        if self.kind == "trained":
            for message in messages:
                role = message["role"]
                add([self.role_ids[role]], 0)
                add(encode(message["content"]) + [self.end_of_turn], int(role == "assistant"))
            if add_generation_prompt:
                add([self.role_ids["assistant"]], 0)
            return ids, mask
        # mistral_common v3: system prompts joined by a blank line, placed before the last user message
        systems = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
        system = "\n\n".join(systems)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for i, message in enumerate(messages):
            if message["role"] == "user":
                text = system + "\n\n" + message["content"] if (i == last_user and system) else message["content"]
                add([self.inst] + encode(text) + [self.end_inst], 0)
            elif message["role"] == "assistant":
                add(encode(message["content"].rstrip(" ")) + [self.tokenizer.eos_id], 1)
        return ids, mask

    def prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The ids that ask the model for the next assistant reply."""
        return self.encode(messages, add_generation_prompt=True)[0]


def fit_history(fmt: ChatFormat, messages: list[dict[str, str]], budget: int) -> tuple[list[dict[str, str]], list[int]]:
    """(messages, prompt ids) with the oldest non-system turns dropped until the prompt has at most budget
    tokens; the last message is always kept (a prompt that alone is too long raises UserError)."""
    messages = list(messages)
    while True:
        ids = fmt.prompt(messages)
        if len(ids) <= budget:
            return messages, ids
        droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if not droppable:
            raise UserError(f"the message is {len(ids)} tokens long, more than the {budget} that fit the context "
                            f"with room for a reply; shorten it (or lower --num_tokens_to_generate)")
        # drop the oldest turn and any assistant reply that followed it
        first = droppable[0]
        del messages[first]
        while first < len(messages) - 1 and messages[first]["role"] == "assistant":
            del messages[first]


# ----------------------------------------------------------------------------------------------------------------
# Streaming generation for one conversation


@torch.inference_mode()
def stream_tokens(model: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int],
                  sample: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[int]:
    """Yield new token ids one at a time (cached decoding, batch 1), ending after a stop token (yielded) or
    max_new_tokens. sample(logits [1, V]) -> [1] picks each token."""
    device = next(model.parameters()).device
    total = len(prompt) + max_new_tokens
    model.setup_cache(1, total, device=device)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    logits = model(tokens, start_pos=0, last_only=True)[:, -1]
    pos = len(prompt)
    for i in range(max_new_tokens):
        nxt = sample(logits)
        token = int(nxt[0])
        yield token
        if token in stop_ids or i == max_new_tokens - 1:
            return
        logits = model(nxt.view(1, 1), start_pos=pos)[:, -1]
        pos += 1


class TextStream:
    """Turns a growing list of token ids into new text pieces: decodes the whole reply each time and returns what
    is new, holding back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token: int, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        new = text[len(self.text):] if len(text) > len(self.text) else ""
        self.text += new
        return new


# ----------------------------------------------------------------------------------------------------------------
# Loading a model for chatting (generate.py --chat and serve.py)


def load_chat_model(cfg) -> tuple[torch.nn.Module, Any, dict, str]:
    """(model in eval mode, tokenizer, checkpoint meta, a description of what was loaded) for cfg.save_file_name (a checkpoint folder, step
    folder or HF folder), on cfg.device in cfg.dtype; the tokenizer is the one the checkpoint records."""
    import tokenizer as tokenizer_mod
    from common import DTYPES, resolve_device, resolve_dtype
    from hf_interop import load_any_model

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = Path(cfg.save_file_name)
    if not path.exists():
        raise UserError(f"no checkpoint at '{path}'; pass --save_file_name (a folder written by train.py or "
                        f"sft.py, or a HF model folder)")
    model, meta = load_any_model(path, device=device, dtype=DTYPES[dtype])
    step_dir = meta.get("hf_folder") or f"{path} (step {meta.get('step')})"
    model.eval()
    tok = tokenizer_mod.load_recorded_tokenizer(cfg, (meta or {}).get("tokenizer"), f"the checkpoint {step_dir}")
    if tok.vocab_size > model.args.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.args.vocab_size}: "
                        f"use the tokenizer the model was trained with")
    return model, tok, meta or {}, step_dir
