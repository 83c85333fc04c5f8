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

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from config import UserError

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


def token_logps(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token [B, T] (0 where the target is -1) from the model's forward: the fused
    per-token NLL (reduction='none') when the model has it, full logits otherwise."""
    if _has_reduction(model):
        return -model(tokens, targets, reduction="none")
    logits = model(tokens).float()                                           # [B, T, V]
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets < 0, 0.0)


def _has_reduction(model: torch.nn.Module) -> bool:
    import inspect

    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    inner = getattr(inner, "_orig_mod", inner)
    try:
        return "reduction" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


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
