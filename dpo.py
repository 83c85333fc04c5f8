"""Direct Preference Optimization (DPO) and its IPO / hinge / robust variants on preference pairs.

    python dpo.py --init_from sft_run --dataset_path_huggingface prefs.jsonl --save_file_name dpo_run
    python dpo.py --init_from sft_run --dataset_path_huggingface builtin --precompute_ref
    python dpo.py --init_from sft_run --dataset_path_huggingface HuggingFaceH4/ultrafeedback_binarized \
        --dataset_split train_prefs

A row is a preference pair: `prompt`, `chosen` and `rejected` as strings, or as lists of {role, content} messages
(UltraFeedback-binarized style: `chosen`/`rejected` hold whole conversations whose common first messages are the
prompt; any `prompt` column is then ignored). Strings are encoded as TRL does: bos + prompt, and bos + prompt +
completion + eos split where the two stop agreeing; message lists go through the chat template (chat.py). The
'builtin' dataset holds pairs from the built-in addition task (tasks.py): the right sum is chosen, a wrong one
rejected.

The reference model is a frozen copy of the --init_from weights; with --precompute_ref its log-probabilities of
every pair are computed once before training and the reference model is freed. For a pair, with
d = beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))]:

    sigmoid  -(1 - s) log sigmoid(d) - s log sigmoid(-d)      (DPO; s = --label_smoothing: conservative DPO)
    robust   [-(1 - s) log sigmoid(d) + s log sigmoid(-d)] / (1 - 2s)   (robust DPO)
    hinge    relu(1 - d)                                      (SLiC)
    ipo      (d' / beta - 1 / (2 beta))^2, d' the same difference of per-token average log-ratios (IPO)

Rewards are beta * (log pi - log ref) of each completion; reward accuracy is the fraction of pairs whose chosen
reward exceeds the rejected one, the margin their mean difference. All are logged per step and at evaluation on the
held-out split.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from config import UserError
from train import ShuffledItems, reference_model, run_example_stage, token_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# ----------------------------------------------------------------------------------------------------------------
# The loss family


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B], chosen rewards [B] and rejected rewards [B] (detached) from the summed completion
    log-probabilities under the policy and the reference. ipo needs the completions' token counts."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    s = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - s) * F.logsigmoid(beta * delta) - s * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - s) * F.logsigmoid(beta * delta) + s * F.logsigmoid(-beta * delta)) / (1 - 2 * s)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def check_loss_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """One-line UserErrors for option combinations the losses do not define."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type {loss_type} is unknown; choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise UserError(f"--beta must be > 0 (got {beta})")
    if loss_type in ("ipo", "hinge") and label_smoothing:
        raise UserError(f"--label_smoothing applies to the sigmoid and robust losses, not {loss_type}; drop it")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"--label_smoothing must be >= 0 and < 0.5 (got {label_smoothing})")


def pair_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over the pairs of a batch: the logged quantities (TRL's names without the prefixes)."""
    return {"loss": losses.detach().mean(), "reward_chosen": chosen_rewards.mean(),
            "reward_rejected": rejected_rewards.mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "logp_chosen": policy_chosen.detach().mean(), "logp_rejected": policy_rejected.detach().mean()}


# ----------------------------------------------------------------------------------------------------------------
# Sequences and their log-probabilities


@dataclass
class Pair:
    """An encoded preference pair: the prompt's ids and each completion's ids (eos or end-of-turn included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def collate(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> tokens and targets [2B, T]: the B prompt+chosen rows, then the B prompt+rejected rows, right-padded.
    targets[i, t] is the token after position t where it belongs to the completion, else -1; also the completion
    token counts [2B]."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in rows) - 1
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        tokens[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(completion)
    counts = torch.tensor([len(completion) for _, completion in rows], dtype=torch.long)
    return {"tokens": tokens, "targets": targets, "completion_tokens": counts}


def sequence_logps(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens [B] (fp32 or wider)."""
    return token_logps(model, tokens, targets).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Reading and encoding preference data


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def split_row(row: dict[str, Any], index: int) -> tuple[Any, Any, Any]:
    """A row -> (prompt, chosen, rejected): three strings, or three message lists (the prompt's messages and each
    completion's). One-line UserError naming the row and the problem otherwise."""
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if missing:
        raise UserError(f"preference row {index} has no {' and '.join(missing)} column (columns: {', '.join(row)}); "
                        f"rows need prompt/chosen/rejected strings or chosen/rejected message lists")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise UserError(f"preference row {index}: chosen and rejected are strings, so a prompt string is needed "
                            f"(got {type(prompt).__name__})")
        return prompt, chosen, rejected
    if _is_messages(chosen) and _is_messages(rejected):
        if _is_messages(prompt):  # explicit prompt: chosen/rejected are the completions only
            return prompt, chosen, rejected
        n = common_prefix_length(chosen, rejected)
        while n > 0 and chosen[n - 1].get("role") == "assistant":  # the prompt ends before an assistant reply
            n -= 1
        if n == 0:
            raise UserError(f"preference row {index}: chosen and rejected conversations share no prompt messages")
        return chosen[:n], chosen[n:], rejected[n:]
    raise UserError(f"preference row {index}: chosen/rejected must both be strings or both be lists of "
                    f"{{role, content}} messages (got {type(chosen).__name__} and {type(rejected).__name__})")


def encode_pair(tok, prompt: Any, chosen: Any, rejected: Any, chat_format: Any = None) -> Pair:
    """Token ids of a pair, as TRL's DPOTrainer builds them: the prompt alone and prompt + each completion are
    encoded whole, and the completion starts where they stop agreeing (strings: bos + text, eos after the
    completion; messages: the chat template, the prompt with the assistant's generation prompt)."""
    if isinstance(prompt, str):
        prompt_ids = [tok.bos_id, *tok.encode(prompt)]
        full = [[tok.bos_id, *tok.encode(prompt + c), tok.eos_id] for c in (chosen, rejected)]
    else:
        if chat_format is None:
            chat_format = load_chat_format(tok)
        prompt_ids = chat_format.encode(list(prompt), add_generation_prompt=True)[0]
        full = [chat_format.encode(list(prompt) + list(c))[0] for c in (chosen, rejected)]
    n = min(common_prefix_length(prompt_ids, full[0]), common_prefix_length(prompt_ids, full[1]))
    return Pair(prompt_ids[:n], full[0][n:], full[1][n:])


def load_chat_format(tok):
    try:
        import chat
    except ImportError:
        raise UserError("message-list preference data needs the chat template (chat.py), which this installation "
                        "lacks; use prompt/chosen/rejected strings") from None
    return chat.ChatFormat(tok)


def read_rows(source: str, subset: str = "", split: str = "train") -> list[dict[str, Any]]:
    """Every row of a preference dataset: 'builtin', a local .jsonl/.json/.parquet file or folder, or a hub id."""
    import corpus

    return builtin_rows() if source == "builtin" else corpus.read_rows(source, subset, split, "preference pairs")


def builtin_rows(task: str = "add2", count: int = 4000, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs from the built-in addition task: the right sum chosen, a near miss (one digit changed)
    rejected; deterministic. Training problems only; the held-out split is taken from these rows."""
    import tasks

    rng = random.Random(seed)
    rows = []
    for problem in tasks.problems(task, "train")[:count]:
        digits = list(problem.answer)
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or d != "0" or len(digits) == 1)])
        rows.append({"prompt": problem.prompt, "chosen": problem.answer, "rejected": "".join(digits)})
    return rows


def encode_rows(tok, rows: Sequence[dict[str, Any]], max_len: int) -> tuple[list[Pair], int]:
    """Encode every row; pairs whose longer sequence exceeds max_len + 1 tokens are dropped (returns the count)."""
    chat_format = None
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        prompt, chosen, rejected = split_row(row, i)
        if not isinstance(prompt, str) and chat_format is None:
            chat_format = load_chat_format(tok)
        pair = encode_pair(tok, prompt, chosen, rejected, chat_format)
        if not pair.chosen or not pair.rejected:
            raise UserError(f"preference row {i}: an empty completion after encoding; check its chosen/rejected")
        if len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) > max_len + 1:
            dropped += 1
            continue
        pairs.append(pair)
    return pairs, dropped


def split_holdout(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded shuffle, then the first ceil(fraction * n) pairs are held out (at least 1 when fraction > 0)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = 0 if fraction <= 0 else max(1, math.ceil(fraction * len(pairs)))
    if n_val >= len(pairs):
        raise UserError(f"--val_fraction {fraction} leaves no training pairs out of {len(pairs)}; lower it")
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int,
                    device: torch.device, show_bar: bool = False, dtype: str = "fp32"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probabilities of every pair's chosen and rejected completion: two float64 [N],
    computed in the training forward's precision (dtype)."""
    from tqdm import tqdm

    from common import autocast_context

    chosen, rejected = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=not show_bar,
                      leave=False, dynamic_ncols=True):
        batch = collate(pairs[start:start + batch_size], pad_id)
        with autocast_context(dtype, device):
            logps = sequence_logps(model, batch["tokens"].to(device), batch["targets"].to(device))
        logps = logps.double().cpu()
        c, r = logps.chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


# ----------------------------------------------------------------------------------------------------------------
# Stage plumbing shared with rl.py: the tokenizer and architecture of the starting model, batches counted in
# examples, the frozen reference


# ----------------------------------------------------------------------------------------------------------------
# The DPO stage


class PairSource(ShuffledItems):
    """Micro-batches of --batch_size pairs in ShuffledItems' order; the precomputed reference log-probabilities
    ride along when there are some."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, pad_id: int, seed: int, rank: int = 0,
                 world_size: int = 1, ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(len(pairs), batch_size, seed, rank, world_size)
        self.pairs, self.pad_id, self.ref = list(pairs), pad_id, ref

    def next_batch(self) -> dict[str, Any]:
        picked = self.next_indices()
        return make_batch([self.pairs[i] for i in picked], self.pad_id, self.ref, picked)


def make_batch(pairs: Sequence[Pair], pad_id: int, ref: tuple[torch.Tensor, torch.Tensor] | None,
               indices: Sequence[int]) -> dict[str, Any]:
    batch = collate(pairs, pad_id)
    if ref is not None:
        batch["ref_chosen"] = ref[0][list(indices)]
        batch["ref_rejected"] = ref[1][list(indices)]
    return batch


class DPOTask:
    """The preference stage on the training core: pairs in, the DPO-family loss and its metrics out."""

    def __init__(self, run) -> None:
        cfg, d, tok = run.cfg, run.dist, run.tokenizer
        check_loss_options(cfg.loss_type, cfg.beta, cfg.label_smoothing)
        self.cfg = cfg
        reference = reference_model(run)
        rows = read_rows(cfg.dataset_path_huggingface, cfg.dataset_sub_set, cfg.dataset_split)
        pairs, dropped = encode_rows(tok, rows, run.seq_len)
        if not pairs:
            raise UserError(f"no preference pair fits --seq_len {run.seq_len} tokens ({dropped} dropped); raise "
                            f"--seq_len (and --max_seq_len) or use shorter pairs")
        train_pairs, val_pairs = split_holdout(pairs, cfg.val_fraction if cfg.eval_rate else 0.0, cfg.seed)
        if d.is_main:
            run.logger.print(f"preference pairs: {len(train_pairs)} train, {len(val_pairs)} held out, {dropped} "
                             f"dropped (longer than --seq_len {run.seq_len})", True)
        self.val_pairs = val_pairs
        self.reference: torch.nn.Module | None = reference
        train_ref = self.val_ref = None
        if cfg.precompute_ref:
            show = d.is_main and not cfg.quiet
            train_ref = reference_logps(reference, train_pairs, tok.pad_id, cfg.batch_size, d.device, show,
                                        run.dtype)
            self.val_ref = reference_logps(reference, val_pairs, tok.pad_id, cfg.batch_size, d.device, show,
                                           run.dtype) if val_pairs else None
            self.reference = None  # the reference model is not kept
            del reference
        self.pad_id = tok.pad_id
        self.train_source = PairSource(train_pairs, cfg.batch_size, tok.pad_id, cfg.seed, d.rank, d.world_size,
                                       train_ref)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        tokens, targets = batch["tokens"], batch["targets"]
        logps = sequence_logps(model, tokens, targets)
        pc, pr = logps.chunk(2)
        if "ref_chosen" in batch:
            rc, rr = batch["ref_chosen"].to(logps.dtype), batch["ref_rejected"].to(logps.dtype)
        else:
            with torch.no_grad():
                rc, rr = sequence_logps(self.reference, tokens, targets).to(logps.dtype).chunk(2)
        nc, nr = batch["completion_tokens"].chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type,
                                                            cfg.label_smoothing, nc, nr)
        metrics = pair_metrics(losses, chosen_rewards, rejected_rewards, pc, pr)
        metrics.pop("loss")
        return losses.mean(), metrics

    def evaluate(self, run) -> dict[str, float]:
        from train import evaluate_loss

        if not self.val_pairs:
            return {}
        d, size = run.dist, self.cfg.batch_size
        starts = list(range(0, len(self.val_pairs), size))[d.rank::d.world_size]
        batches = (make_batch(self.val_pairs[s:s + size], self.pad_id, self.val_ref,
                              range(s, min(s + size, len(self.val_pairs)))) for s in starts)
        results = evaluate_loss(run, batches, self.loss, total=len(starts))
        return {f"val_{k}": v for k, v in results.items()}


def main(argv: list[str] | None = None) -> None:
    from config import DPOConfig

    run_example_stage(DPOConfig, DPOTask, argv, __doc__)


if __name__ == "__main__":
    from config import run_main

    run_main(main)
