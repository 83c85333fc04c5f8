"""Supervised fine-tuning on conversations: a pretrained checkpoint becomes a chat model.

    python sft.py --init_from checkpoints --save_file_name sft_checkpoints             # built-in data, offline
    python sft.py --init_from hf_model --dataset_path_huggingface HuggingFaceTB/smoltalk --dataset_sub_set all
    python sft.py --init_from checkpoints --dataset_path_huggingface my_chats.jsonl    # local jsonl/parquet

Data: a `messages` column (a list of {role, content}, as smoltalk-style hub datasets have), or `prompt` and
`response` columns, from the hub or local .jsonl/.parquet files; 'builtin' is chat_data.py's instruction set made
from the built-in corpus (its held-out split by topic name is the evaluation set; other sources hold out every
20th conversation). Each conversation is encoded with the tokenizer's chat template (chat.py).

The loss covers only the assistant replies, each one's end-of-turn token included: every other target is -1,
which the model's loss ignores. Conversations are packed whole into rows of seq_len + 1 tokens (--pack) or one per
row (--pack=False), the rest of a row padded with targets -1; one longer than a row is truncated (--overlong
truncate, kept when a trained token remains) or dropped, and the run reports how many. Training itself is train.py's
loop (resume, DDP, autocast, logging, checkpoints); the checkpoints also record the chat template.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from config import SFTConfig, UserError, parse_config, run_main

HOLD_OUT_EVERY = 20


# ----------------------------------------------------------------------------------------------------------------
# Reading conversations


def row_messages(row: dict[str, Any], cfg: SFTConfig) -> list[dict[str, str]] | None:
    """The conversation of one dataset row: its messages column, or its prompt/response columns."""
    if cfg.messages_column in row:
        messages = row[cfg.messages_column]
        if not isinstance(messages, (list, tuple)):
            return None
        return [{"role": m.get("role"), "content": m.get("content")} for m in messages if isinstance(m, dict)]
    if cfg.prompt_column in row and cfg.response_column in row:
        prompt, response = row[cfg.prompt_column], row[cfg.response_column]
        if not isinstance(prompt, str) or not isinstance(response, str):
            return None
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise UserError(f"the dataset has neither a '{cfg.messages_column}' column nor '{cfg.prompt_column}' and "
                    f"'{cfg.response_column}' columns (columns: {', '.join(row)}); pass --messages_column or "
                    f"--prompt_column/--response_column")


def read_conversations(cfg: SFTConfig, split: str) -> list[list[dict[str, str]]]:
    """The conversations of split 'train' or 'eval' (see the module docstring), at most --max_conversations."""
    import corpus
    import chat_data

    source = cfg.dataset_path_huggingface
    limit = cfg.max_conversations or math.inf
    if source == corpus.BUILTIN_NAME:
        rows = chat_data.builtin_conversations("train" if split == "train" else "test")
        return [row["messages"] for row in rows[:int(min(limit, len(rows)))]]
    is_local = Path(source).exists()
    if not is_local and (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in corpus.LOCAL_LOADERS):
        raise UserError(f"dataset path '{source}' does not exist")
    out: list[list[dict[str, str]]] = []
    try:
        dataset = corpus._load_local(Path(source), cfg) if is_local else corpus._load_hub(cfg)
        for index, row in enumerate(dataset):
            if (index % HOLD_OUT_EVERY == 0) != (split == "eval"):
                continue
            messages = row_messages(row, cfg)
            if messages:
                out.append(messages)
            if len(out) >= limit:
                break
    except UserError:
        raise
    except Exception as error:  # datasets/hub raise many types: one line
        if is_local:
            raise UserError(f"could not read '{source}' ({type(error).__name__}: {str(error).strip()[:200]})") \
                from None
        raise corpus._hub_error(cfg, error) from None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Encoding: ids with loss targets, packed into rows


def encode_conversations(fmt, conversations: Sequence[list[dict[str, str]]], seq_len: int, overlong: str,
                         show: bool = False) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """[(ids, mask)] of the usable conversations (at most seq_len + 1 tokens each) and counts of what was
    truncated, dropped as too long, or skipped (malformed, or no assistant turn). show: a progress bar."""
    from tqdm import tqdm

    out, counts = [], {"conversations": len(conversations), "truncated": 0, "dropped_overlong": 0, "skipped": 0}
    for messages in tqdm(conversations, desc="encoding conversations", unit="conv", disable=not show,
                         leave=False, dynamic_ncols=True):
        try:
            ids, mask = fmt.encode(messages)
        except ValueError:
            counts["skipped"] += 1
            continue
        too_long = len(ids) > seq_len + 1
        if too_long:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not any(mask[1:]):  # nothing left to train on
            counts["dropped_overlong" if too_long else "skipped"] += 1
            continue
        counts["truncated"] += too_long
        out.append((ids, mask))
    return out, counts


def build_rows(examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each [rows, seq_len] int64. A conversation of n tokens contributes n - 1 positions:
    input ids[t], target ids[t + 1] where mask[t + 1] else -1. Packing puts whole conversations one after another
    in a row while they fit; the rest of a row is pad inputs with target -1."""
    rows_x: list[list[int]] = []
    rows_y: list[list[int]] = []
    cur_x: list[int] = []
    cur_y: list[int] = []
    for ids, mask in examples:
        x = ids[:-1]
        y = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        if cur_x and (not pack or len(cur_x) + len(x) > seq_len):
            rows_x.append(cur_x)
            rows_y.append(cur_y)
            cur_x, cur_y = [], []
        cur_x, cur_y = cur_x + x, cur_y + y
    if cur_x:
        rows_x.append(cur_x)
        rows_y.append(cur_y)
    inputs = np.full((len(rows_x), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows_x), seq_len), -1, dtype=np.int64)
    for i, (x, y) in enumerate(zip(rows_x, rows_y)):
        inputs[i, :len(x)] = x
        targets[i, :len(y)] = y
    return inputs, targets


class RowSource:
    """Micro-batches of rows in a seeded order, reshuffled every epoch; rank r of w takes every w-th row. Its
    state (epoch, position) is what a resume needs."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(inputs) < world_size:
            raise UserError(f"only {len(inputs)} rows of conversations for {world_size} ranks; use more data")
        self.inputs, self.targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        n = len(self.inputs)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank::self.world_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            take = self._order[self.position:self.position + self.batch_size - len(picked)]
            picked.extend(take.tolist())
            self.position += len(take)
        index = torch.tensor(picked)
        return self.inputs[index], self.targets[index]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


def sft_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the trained (assistant) targets of the batch, plus the MoE balance loss in
    training mode (the model's own loss; targets -1 are ignored)."""
    x, y = batch
    loss = model(x, y)
    return loss, {"trained_tokens": (y != -1).sum()}


@torch.no_grad()
def answer_nll(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 16
               ) -> tuple[float, int]:
    """(mean NLL per trained target token, number of tokens) over rows, in eval mode (no balance loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        n = int((y != -1).sum())
        if n:
            total += float(model(x, y)) * n
            count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count


# ----------------------------------------------------------------------------------------------------------------
# The training stage (train.py's core runs it)


class SFTTask:
    """The conversations as rows; loss: assistant-only cross-entropy; evaluation: the held-out answer loss."""

    def __init__(self, run) -> None:
        import chat

        cfg, d = run.cfg, run.dist
        fmt = chat.ChatFormat(run.tokenizer)
        run.meta["chat_template"] = fmt.template          # every checkpoint records the template it trained
        show = d.is_main and not cfg.quiet
        train_examples, counts = encode_conversations(fmt, read_conversations(cfg, "train"), run.seq_len,
                                                      cfg.overlong, show)
        if not train_examples:
            raise UserError(f"no usable conversation in '{cfg.dataset_path_huggingface}' ({counts}); each needs an "
                            f"assistant reply within --seq_len {run.seq_len}")
        inputs, targets = build_rows(train_examples, run.seq_len, run.tokenizer.pad_id, cfg.pack)
        self.train_source = RowSource(inputs, targets, cfg.batch_size, cfg.seed, cfg.shuffle, d.rank, d.world_size)
        self.eval_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        held_out = 0
        if cfg.eval_rate > 0:
            eval_examples, _ = encode_conversations(fmt, read_conversations(cfg, "eval"), run.seq_len, cfg.overlong)
            held_out = len(eval_examples)
            if eval_examples:
                ex, ey = build_rows(eval_examples, run.seq_len, run.tokenizer.pad_id, cfg.pack)
                ex, ey = torch.from_numpy(ex), torch.from_numpy(ey)
                if cfg.eval_steps:
                    ex, ey = ex[:cfg.eval_steps * cfg.batch_size], ey[:cfg.eval_steps * cfg.batch_size]
                mine = range(d.rank * cfg.batch_size, len(ex), cfg.batch_size * d.world_size)
                self.eval_batches = [(ex[i:i + cfg.batch_size], ey[i:i + cfg.batch_size]) for i in mine]
        trained = int((targets != -1).sum())
        run.logger.print(f"conversations: {len(train_examples)} of {counts['conversations']} used "
                         f"({counts['truncated']} truncated, {counts['dropped_overlong']} dropped as longer than "
                         f"{run.seq_len + 1} tokens, {counts['skipped']} without a usable assistant reply) -> "
                         f"{len(inputs)} rows ({'packed' if cfg.pack else 'one per row'}), {trained} trained "
                         f"tokens ({trained / inputs.size:.0%} of the positions); {held_out} held out", True)
        run.logger.record("sft_data", 0, **counts, rows=len(inputs), trained_tokens=trained, held_out=held_out)

    loss = staticmethod(sft_loss)

    def evaluate(self, run) -> dict[str, float]:
        import train

        if not self.eval_batches:
            return {}
        results = train.evaluate_loss(run, self.eval_batches, self.loss, total=len(self.eval_batches))
        return {"val_answer_loss": results["loss"]}


def main(argv: list[str] | None = None) -> None:
    import train

    cfg, overrides = parse_config(SFTConfig, argv, description=__doc__.split("\n\n")[0], with_model_args=True)
    train.run_stage(cfg, overrides, SFTTask, train.load_stage_tokenizer)


if __name__ == "__main__":
    run_main(main)
