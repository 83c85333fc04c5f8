"""Built-in verifiable tasks for reward tuning (rl.py) and preference tuning (dpo.py), generated offline, and a
short supervised fine-tuning on a task's format (the step before rl.py), on the training core.

    python tasks.py --task add2 --model tiny --tokenizer_path tokenizer --max_seq_len 32 --save_file_name sft_add2

    add2     two-digit addition: "37+58=" -> "95"
    add3     three-digit addition: "372+581=" -> "953"
    reverse  reverse a lowercase word of 3 to 6 letters: "reverse abcde:" -> "edcba"

Every problem is generated deterministically from the task name: all problems are enumerated in a fixed order
(or drawn from a seeded generator), shuffled with a fixed seed, and the first TEST_SIZE form the held-out test
set, which no training problem repeats. A completion is correct when its text (up to the end-of-sequence token,
stripped of surrounding spaces) equals the answer exactly: `exact_match` is the built-in reward.

The encoding of a prompt and an answer for the model is `encode_prompt` / `encode_answer` (bos + prompt text;
answer text + eos), the one place to change when the tasks move to the chat template.
"""
from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass
from typing import Sequence

import torch

from config import UserError
from train import ShuffledItems, mean_over_ranks, run_example_stage

TEST_SIZE = 500
TASK_NAMES = ("add2", "add3", "reverse")
_SEED = 20240611


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def _addition(digits: int) -> list[Problem]:
    low, high = 10 ** (digits - 1), 10 ** digits
    if digits <= 2:  # every pair: 8100 problems
        pairs = list(itertools.product(range(low, high), repeat=2))
    else:  # 810,000 pairs are more than any run needs: a seeded sample of distinct pairs
        rng = random.Random(_SEED + digits)
        seen: set[tuple[int, int]] = set()
        pairs = []
        while len(pairs) < 50_000:
            pair = (rng.randrange(low, high), rng.randrange(low, high))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return [Problem(f"{a}+{b}=", str(a + b)) for a, b in pairs]


def _reverse() -> list[Problem]:
    rng = random.Random(_SEED)
    words: set[str] = set()
    out = []
    while len(out) < 20_000:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word not in words:
            words.add(word)
            out.append(Problem(f"reverse {word}:", word[::-1]))
    return out


def problems(task: str, split: str) -> list[Problem]:
    """The task's problems of split 'train' or 'test' (disjoint; test has TEST_SIZE problems), in a fixed order."""
    if task not in TASK_NAMES:
        raise UserError(f"unknown built-in task '{task}'; choose one of: {', '.join(TASK_NAMES)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split '{split}' of task '{task}'; use train or test")
    if task == "reverse":
        every = _reverse()
    else:
        every = _addition(2 if task == "add2" else 3)
    random.Random(_SEED).shuffle(every)
    return every[:TEST_SIZE] if split == "test" else every[TEST_SIZE:]


def exact_match(prompt: str, completion: str, answer: str | None) -> float:
    """The built-in reward: 1.0 when the completion is exactly the answer (surrounding spaces ignored), else 0.0."""
    return float(answer is not None and completion.strip() == answer.strip())


# ----------------------------------------------------------------------------------------------------------------
# Encoding (the one place that decides the format the model sees)


def encode_prompt(tok, text: str) -> list[int]:
    """bos + the prompt's tokens."""
    return [tok.bos_id, *tok.encode(text)]


def encode_answer(tok, text: str) -> list[int]:
    """The answer's tokens + eos."""
    return [*tok.encode(text), tok.eos_id]


def completion_text(tok, ids: Sequence[int]) -> str:
    """Text of a generated completion, cut at its first eos."""
    ids = list(ids)
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    return tok.decode(ids)


# ----------------------------------------------------------------------------------------------------------------
# Supervised batches and held-out accuracy


def supervised_batch(tok, pairs: Sequence[tuple[str, str]], pad_id: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer) texts -> (tokens [B, T], targets [B, T]) right-padded; targets are -1 except at the
    answer's tokens (eos included), so the loss covers only the answer."""
    pad_id = tok.pad_id if pad_id is None else pad_id
    rows = []
    for prompt, answer in pairs:
        p, a = encode_prompt(tok, prompt), encode_answer(tok, answer)
        rows.append((p + a, [-1] * (len(p) - 1) + a))
    width = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, tgt) in enumerate(rows):
        tokens[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, :len(tgt)] = torch.tensor(tgt)
    return tokens, targets


@torch.no_grad()
def accuracy(model: torch.nn.Module, tok, items: Sequence[Problem], max_new_tokens: int = 8,
             batch_size: int = 250) -> tuple[float, list[str]]:
    """Greedy exact-match accuracy on `items` with the batched KV-cache generation; also the completions."""
    from generate import generate

    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            out = generate(model, [encode_prompt(tok, p.prompt) for p in chunk], max_new_tokens, temperature=0.0,
                           eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
            texts += [completion_text(tok, ids) for ids in out]
    finally:
        model.train(was_training)
    correct = sum(exact_match(p.prompt, t, p.answer) for p, t in zip(items, texts))
    return correct / max(len(items), 1), texts


# ----------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning on a task's format (python tasks.py ...)


class ProblemSource(ShuffledItems):
    """Micro-batches of --batch_size training problems in ShuffledItems' order."""

    def __init__(self, tok, items: Sequence[Problem], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(len(items), batch_size, seed, rank, world_size)
        self.tok, self.items = tok, list(items)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [self.items[i] for i in self.next_indices()]
        return supervised_batch(self.tok, [(p.prompt, p.answer) for p in picked])


def held_out_accuracy(run, items: Sequence[Problem], max_new_tokens: int = 8) -> dict[str, float]:
    """Greedy exact-match accuracy on the held-out problems, each rank a slice, averaged over every problem."""
    d = run.dist
    mine = list(items)[d.rank::d.world_size]
    acc, _ = accuracy(run.raw, run.tokenizer, mine, max_new_tokens) if mine else (0.0, [])
    sums = {"accuracy": torch.tensor(acc * len(mine), dtype=torch.float64, device=d.device)}
    return mean_over_ranks(sums, len(mine), d)


class TaskSFT:
    """Answer-only next-token loss on a built-in task's training problems; held-out exact-match accuracy."""

    def __init__(self, run) -> None:
        cfg, d = run.cfg, run.dist
        self.test = problems(cfg.task, "test")[:cfg.eval_problems]
        self.train_source = ProblemSource(run.tokenizer, problems(cfg.task, "train"), cfg.batch_size, cfg.seed,
                                          d.rank, d.world_size)

    @staticmethod
    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return model(x, y), {}

    def evaluate(self, run) -> dict[str, float]:
        return {"test_accuracy": held_out_accuracy(run, self.test)["accuracy"]}


def main(argv=None) -> None:
    from config import TaskSFTConfig

    run_example_stage(TaskSFTConfig, TaskSFT, argv, __doc__)


if __name__ == "__main__":
    from config import run_main

    run_main(main)
