"""Group-relative policy optimisation (GRPO, DeepSeekMath / DeepSeek-R1) with rewards a program can check.

    python rl.py --init_from sft_run --task add2 --save_file_name grpo_run --steps 200
    python rl.py --init_from sft_run --dataset_path_huggingface prompts.jsonl --reward my_rewards:score

For every prompt, --group_size completions are sampled in one batch through the latent KV cache (generate.py:
one prefill, then one decode step per token). Each completion is scored by the reward function; its advantage is
its reward normalised within its group, (r - mean) / (std + 1e-4). The policy then maximises the clipped
objective min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) per completion token, ratio = pi / pi_old, averaged over
each completion's tokens and then over completions, minus --kl_coef times the k3 estimate of KL(pi || pi_ref) per
token (exp(ref - logp) - (ref - logp) - 1). A rollout batch is reused for --num_iterations optimizer steps (pi_old
is the policy that sampled it; with 1 the ratio is 1 and only its gradient counts).

A reward function is `def reward(prompt: str, completion: str, answer: str | None) -> float`, named as
`module:function` (a module on the path, or a .py file). An exception inside it, or a value that is not a finite
number, scores that completion 0 and is reported with the failing sample; the run goes on.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from config import UserError
from train import mean_over_ranks, reference_model, run_example_stage, token_logps

RewardFn = Callable[[str, str, "str | None"], float]

# ----------------------------------------------------------------------------------------------------------------
# The objective


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Rewards [P * G] (the G completions of each prompt next to each other) -> advantages [P * G]: the reward
    minus its group's mean, divided by the group's standard deviation (unbiased, + eps) when scale. A group whose
    completions all scored the same gets advantage 0: it carries no signal."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)                                   # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, kl_coef: float = 0.0, ref_logps: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (to minimise). logps/old_logps/ref_logps: [B, T] log-probabilities of the completion tokens
    under the policy (with grad), the sampling policy and the reference; advantages [B]; mask [B, T] (1 at
    completion tokens). Returns (loss, stats: mean KL per token, fraction of clipped tokens)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.view(-1, 1).to(logps.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)                           # [B, T]
    tokens = mask.sum().clamp(min=1)
    stats: dict[str, torch.Tensor] = {}
    if ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1.0                                     # k3 estimator, >= 0
        per_token = per_token + kl_coef * kl
        stats["kl"] = ((kl * mask).sum() / tokens).detach()
    per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    stats["clip_frac"] = (((unclipped - clipped).abs() > 0).to(mask.dtype) * mask).sum().detach() / tokens
    return per_sequence.mean(), stats


# ----------------------------------------------------------------------------------------------------------------
# Rewards


def load_reward(spec: str) -> tuple[RewardFn, str]:
    """'module:function' or 'path/to/file.py:function' -> (the function, its name); 'builtin' -> exact match.
    Every mistake is a one-line UserError."""
    import tasks

    if spec in ("", "builtin", "exact_match"):
        return tasks.exact_match, "builtin exact_match"
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"--reward '{spec}' is not module:function (e.g. my_rewards:score or rewards.py:score)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--reward: file '{module_name}' not found")
            spec_obj = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:
        from common import first_line

        raise UserError(f"--reward: cannot import '{module_name}' ({type(error).__name__}: {first_line(error)})"
                        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"--reward: '{module_name}' has no function '{func_name}'")
    return fn, spec


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          answers: Sequence[str | None], report: Callable[[str], None]) -> tuple[list[float], int]:
    """Rewards of each (prompt, completion, answer); a reward function that raises or returns something other
    than a finite number scores 0 for that sample, and `report` gets one line naming the sample and the error.
    Returns (rewards, number of failures)."""
    from common import first_line

    rewards, failures = [], 0
    for i, (prompt, completion, answer) in enumerate(zip(prompts, completions, answers)):
        try:
            value = reward_fn(prompt, completion, answer)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
            rewards.append(float(value))
        except Exception as error:  # a user's reward function may raise anything: report it, score 0, go on
            failures += 1
            rewards.append(0.0)
            report(f"reward function failed on sample {i} (prompt {prompt!r}, completion {completion[:80]!r}): "
                   f"{type(error).__name__}: {first_line(error)}; scored 0")
    return rewards, failures


# ----------------------------------------------------------------------------------------------------------------
# Prompts and rollouts


def read_prompts(source: str, task: str, subset: str = "", split: str = "train", prompt_column: str = "prompt",
                 answer_column: str = "answer") -> list[tuple[str, str | None]]:
    """(prompt, answer or None) pairs: the built-in task's training problems ('builtin'), or the rows of a local
    .jsonl/.parquet file or a hub dataset (a prompt column, an optional answer column)."""
    import tasks

    if source == "builtin":
        return [(p.prompt, p.answer) for p in tasks.problems(task, "train")]
    from corpus import read_rows

    rows = read_rows(source, subset, split)
    if not rows:
        raise UserError(f"'{source}' holds no rows")
    if prompt_column not in rows[0]:
        raise UserError(f"the prompt data has no column '{prompt_column}' (columns: {', '.join(rows[0])}); pass "
                        f"--prompt_column")
    out = []
    for i, row in enumerate(rows):
        prompt = row.get(prompt_column)
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"prompt row {i}: '{prompt_column}' is not a non-empty string")
        answer = row.get(answer_column)
        out.append((prompt, None if answer is None else str(answer)))
    return out


def rollout_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion rows -> (tokens [B, T], targets [B, T]) right-padded; targets are the completion's
    tokens (at the positions that predict them) and -1 elsewhere."""
    rows = [(list(p), list(c)) for p, c in zip(prompts, completions)]
    width = max(len(p) + max(len(c), 1) for p, c in rows) - 1
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids = p + c
        tokens[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        if c:
            targets[i, len(p) - 1:len(ids) - 1] = torch.tensor(c)
    return tokens, targets


class RolloutSource:
    """The GRPO batch source: each batch is `prompts_per_batch` prompts (a seeded order, rank-strided, epoch after
    epoch) x `group_size` completions sampled from the current policy with the batched KV-cache generation, their
    rewards, group advantages, and (when needed) the sampling policy's and the reference's log-probabilities. A
    batch is handed out `num_iterations` times before the next is sampled."""

    def __init__(self, policy: torch.nn.Module, tok, items: Sequence[tuple[str, str | None]], reward_fn: RewardFn,
                 *, prompts_per_batch: int, group_size: int, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, num_iterations: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, reference: torch.nn.Module | None = None,
                 report: Callable[[str], None] = print, encode_prompt: Callable | None = None,
                 autocast: Callable[[], Any] | None = None) -> None:
        import tasks

        self.policy, self.tok, self.items, self.reward_fn = policy, tok, list(items), reward_fn
        self.prompts_per_batch, self.group_size = prompts_per_batch, group_size
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.num_iterations, self.seed, self.device = num_iterations, seed, device
        self.rank, self.world_size, self.reference, self.report = rank, world_size, reference, report
        self.encode_prompt = encode_prompt or tasks.encode_prompt
        # the precision of the training forward, so that pi_old and the reference match what the loss computes
        self.autocast = autocast or contextlib.nullcontext
        self.epoch, self.position = 0, 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
        self.current: dict[str, Any] | None = None
        self.uses = 0
        self.last_handout: float | None = None
        self.last_tokens = 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        import random

        order = list(range(len(self.items)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def _next_items(self) -> list[tuple[str, str | None]]:
        chosen = []
        while len(chosen) < self.prompts_per_batch:
            index = self.position * self.world_size + self.rank
            if index >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._make_order(self.epoch)
                continue
            chosen.append(self.items[self._order[index]])
            self.position += 1
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order(self.epoch)
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.current, self.uses = None, 0

    def next_batch(self) -> dict[str, Any]:
        if self.current is not None and self.uses < self.num_iterations:
            self.uses += 1
            return self._hand_out(self.current, False)
        batch = self._sample()
        self.current, self.uses = batch, 1
        return self._hand_out(batch, True)

    def _hand_out(self, batch: dict[str, Any], fresh: bool) -> dict[str, Any]:
        """The batch, with the training speed of the previous one: its trained (completion) tokens over the time
        from its hand-out to this call, less this batch's generation (forward, backward, optimizer, logging)."""
        now = time.perf_counter()
        rate = 0.0
        if self.last_handout is not None:
            spent = now - self.last_handout - (batch["gen_s"] if fresh else 0.0)
            rate = self.last_tokens / max(spent, 1e-9)
        self.last_handout, self.last_tokens = now, int((batch["targets"] >= 0).sum())
        return {**batch, "fresh": fresh, "train_tokens_per_s_previous": rate}

    @torch.no_grad()
    def _sample(self) -> dict[str, Any]:
        import tasks
        from generate import generate

        items = self._next_items()
        prompts = [self.encode_prompt(self.tok, prompt) for prompt, _ in items for _ in range(self.group_size)]
        was_training = self.policy.training
        self.policy.eval()
        t0 = time.perf_counter()
        try:
            with self.autocast():
                completions = generate(self.policy, prompts, self.max_new_tokens, temperature=self.temperature,
                                       top_p=self.top_p, top_k=self.top_k, generator=self.generator,
                                       eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                                       vocab_size=self.tok.vocab_size)
        finally:
            self.policy.train(was_training)
        gen_s = time.perf_counter() - t0
        texts = [tasks.completion_text(self.tok, c) for c in completions]
        expanded = [item for item in items for _ in range(self.group_size)]
        rewards, failures = score(self.reward_fn, [p for p, _ in expanded], texts, [a for _, a in expanded],
                                  self.report)
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        tokens, targets = rollout_batch(prompts, completions, self.tok.pad_id)
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        batch: dict[str, Any] = {
            "tokens": tokens, "targets": targets,
            "advantages": group_advantages(rewards_t, self.group_size).to(self.device),
            "rewards": rewards_t, "completion_len": torch.tensor([float(len(c)) for c in completions]),
            "gen_s": gen_s, "gen_tokens": sum(len(c) for c in completions), "reward_errors": failures,
        }
        with self.autocast():
            if self.num_iterations > 1:  # pi_old: the sampling policy's log-probs, from the training forward
                batch["old_logps"] = token_logps(self.policy, tokens, targets).float()
            if self.reference is not None:
                batch["ref_logps"] = token_logps(self.reference, tokens, targets).float()
        return batch


def rollout_loss(model: torch.nn.Module, batch: dict[str, Any], clip_eps: float, kl_coef: float
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a rollout batch under the policy `model`, and the logged metrics."""
    tokens, targets = batch["tokens"], batch["targets"]
    mask = targets >= 0
    logps = token_logps(model, tokens, targets)
    old = batch.get("old_logps")
    old = logps.detach() if old is None else old
    loss, stats = grpo_loss(logps, old, batch["advantages"], mask, clip_eps, kl_coef, batch.get("ref_logps"))
    rewards = batch["rewards"]
    metrics = {"reward": rewards.mean(), "accuracy": (rewards >= 1.0).float().mean(),
               "completion_len": batch["completion_len"].mean(), **stats,
               "reward_errors": torch.tensor(float(batch["reward_errors"]))}
    # the same names every micro-step and rank (the core averages them in one collective); a reused batch
    # (--num_iterations) spent no generation time
    fresh = batch.get("fresh", True)
    metrics["gen_s"] = torch.tensor(batch["gen_s"] if fresh else 0.0)
    metrics["gen_tokens_per_s"] = torch.tensor(batch["gen_tokens"] / max(batch["gen_s"], 1e-9))
    metrics["train_tokens_per_s"] = torch.tensor(batch.get("train_tokens_per_s_previous", 0.0))
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# The GRPO stage on the training core


class GRPOTask:
    """Rollouts in, the clipped GRPO loss and its metrics out; evaluation is greedy decoding of held-out prompts
    (the built-in task's test set, or --val_fraction of the given prompts) scored by the reward."""

    def __init__(self, run) -> None:
        import tasks
        from common import autocast_context
        cfg, d, tok = run.cfg, run.dist, run.tokenizer
        self.cfg, self.tok = cfg, tok
        self.reward_fn, reward_name = load_reward(cfg.reward)
        items = read_prompts(cfg.dataset_path_huggingface, cfg.task, cfg.dataset_sub_set, cfg.dataset_split,
                             cfg.prompt_column, cfg.answer_column)
        if cfg.dataset_path_huggingface == "builtin":
            held_out = [(p.prompt, p.answer) for p in tasks.problems(cfg.task, "test")]
        else:
            fraction = cfg.val_fraction if cfg.eval_rate else 0.0
            order = list(range(len(items)))
            random.Random(cfg.seed).shuffle(order)
            n_val = 0 if fraction <= 0 else max(1, math.ceil(fraction * len(items)))
            held_out = [items[i] for i in order[:n_val]]
            items = [items[i] for i in order[n_val:]]
        self.held_out = held_out[:cfg.eval_problems]
        longest = max(len(tasks.encode_prompt(tok, p)) for p, _ in items[:2000])
        if longest + cfg.max_new_tokens > run.seq_len:
            raise UserError(f"prompts of up to {longest} tokens plus --max_new_tokens {cfg.max_new_tokens} exceed "
                            f"--seq_len {run.seq_len}; lower --max_new_tokens or raise --seq_len/--max_seq_len")
        reference = reference_model(run) if cfg.kl_coef > 0 else None
        if d.is_main:
            run.logger.print(f"GRPO: {len(items)} prompts x {cfg.group_size} completions, reward {reward_name}, "
                             f"{len(self.held_out)} held-out prompts, KL coef {cfg.kl_coef}"
                             f"{'' if reference is None else ' (reference kept)'}", True)

        def report(line: str) -> None:
            run.logger.print(f"warning: {line}", True)
            run.logger.record("reward_error", 0, message=line)

        self.train_source = RolloutSource(
            run.raw, tok, items, self.reward_fn, prompts_per_batch=cfg.batch_size, group_size=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            num_iterations=cfg.num_iterations, seed=cfg.seed, device=d.device, rank=d.rank,
            world_size=d.world_size, reference=reference, report=report,
            autocast=lambda: autocast_context(run.dtype, d.device))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return rollout_loss(model, batch, self.cfg.clip_eps, self.cfg.kl_coef)

    def evaluate(self, run) -> dict[str, float]:
        return evaluate_prompts(run, self.held_out, self.reward_fn, self.cfg.max_new_tokens)


@torch.no_grad()
def evaluate_prompts(run, items: Sequence[tuple[str, str | None]], reward_fn: RewardFn, max_new_tokens: int,
                     batch_size: int = 250) -> dict[str, float]:
    """Greedy completions of the held-out prompts (each rank a slice) -> mean reward, accuracy (reward >= 1)
    and completion length over all of them."""
    import tasks
    from generate import generate
    d, tok, model = run.dist, run.tokenizer, run.raw
    mine = list(items)[d.rank::d.world_size]
    rewards: list[float] = []
    lengths: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            out = generate(model, [tasks.encode_prompt(tok, p) for p, _ in chunk], max_new_tokens,
                           temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
            texts = [tasks.completion_text(tok, c) for c in out]
            got, _ = score(reward_fn, [p for p, _ in chunk], texts, [a for _, a in chunk], lambda line: None)
            rewards += got
            lengths += [len(c) for c in out]
    finally:
        model.train(was_training)
    sums = {"test_reward": torch.tensor(sum(rewards), dtype=torch.float64, device=d.device),
            "test_accuracy": torch.tensor(float(sum(r >= 1.0 for r in rewards)), dtype=torch.float64,
                                          device=d.device),
            "test_completion_len": torch.tensor(float(sum(lengths)), dtype=torch.float64, device=d.device)}
    return mean_over_ranks(sums, len(mine), d)


def main(argv: list[str] | None = None) -> None:
    from config import GRPOConfig

    run_example_stage(GRPOConfig, GRPOTask, argv, __doc__)


if __name__ == "__main__":
    from config import run_main

    run_main(main)
