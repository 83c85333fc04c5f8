"""rl.py (GRPO): the objective's gradient against a hand-written float64 computation, group normalisation, reward
loading and reward errors, rollouts from the batched generation, and the built-in task."""
from __future__ import annotations

import math

import pytest
import torch

import rl
import train
import tasks
from config import UserError

# ----------------------------------------------------------------------------------------------------------------
# The objective by hand


def hand_loss_and_grad(logits, targets, old, ref, adv, clip_eps, kl_coef):
    """Loss and d loss / d logits of the GRPO objective, written out with Python floats: per token,
    -min(r A, clip(r) A) + kl_coef * (exp(ref - lp) - (ref - lp) - 1), averaged over each sequence's completion
    tokens, then over sequences."""
    B, T, V = len(logits), len(logits[0]), len(logits[0][0])
    total = 0.0
    grad = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    for b in range(B):
        positions = [t for t in range(T) if targets[b][t] >= 0]
        n = max(len(positions), 1)
        seq = 0.0
        for t in positions:
            row = logits[b][t]
            m = max(row)
            z = sum(math.exp(x - m) for x in row)
            probs = [math.exp(x - m) / z for x in row]
            lp = row[targets[b][t]] - m - math.log(z)
            r = math.exp(lp - old[b][t])
            a = adv[b]
            clipped_r = min(max(r, 1 - clip_eps), 1 + clip_eps)
            unclipped, clipped = r * a, clipped_r * a
            term = -min(unclipped, clipped)
            # d term / d lp: the unclipped branch is active (or both equal and inside the range): -r a; else 0
            if unclipped <= clipped or (1 - clip_eps < r < 1 + clip_eps):
                dterm = -r * a
            else:
                dterm = 0.0
            if ref is not None:
                d = ref[b][t] - lp
                term += kl_coef * (math.exp(d) - d - 1)
                dterm += kl_coef * (1 - math.exp(d))
            seq += term
            scale = dterm / n / B
            for v in range(V):
                grad[b][t][v] += scale * ((1.0 if v == targets[b][t] else 0.0) - probs[v])
        total += seq / n
    return total / B, grad


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_grpo_gradient_equals_hand_written_float64(kl_coef):
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 5, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = -1                 # prompt positions
    targets[1, 4] = -1                  # a shorter completion
    targets[3, 3:] = -1
    with torch.no_grad():
        lp0 = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # pi_old away from pi so that some ratios leave [1 - eps, 1 + eps] on either side
    old = lp0 + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp0 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64) if kl_coef else None
    adv = torch.tensor([1.2, -0.7, 0.0, -1.5], dtype=torch.float64)
    mask = targets >= 0
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss, stats = rl.grpo_loss(lp, old, adv, mask, clip_eps=0.2, kl_coef=kl_coef, ref_logps=ref)
    loss.backward()
    ratio = torch.exp(lp0 - old)[mask]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    assert 0 < stats["clip_frac"].item() < 1
    expected_loss, expected_grad = hand_loss_and_grad(
        logits.tolist(), targets.tolist(), old.tolist(), None if ref is None else ref.tolist(), adv.tolist(),
        0.2, kl_coef)
    assert abs(loss.item() - expected_loss) < 1e-12
    torch.testing.assert_close(logits.grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-12, rtol=0)


def test_group_normalisation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    adv = rl.group_advantages(rewards, 4).tolist()
    for g in range(3):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 3)  # unbiased, as TRL
        for i in range(4):
            assert abs(adv[4 * g + i] - (group[i] - mean) / (std + 1e-4)) < 1e-6
    assert adv[4:8] == [0.0] * 4  # a group that all scored the same carries no signal
    with pytest.raises(ValueError):
        rl.group_advantages(rewards, 5)


def test_token_logps_match_cross_entropy():
    from model import Transformer
    from config import model_args_from_preset

    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("tiny-dense", vocab_size=50, max_seq_len=16)).double()
    model.init_weights()
    tokens = torch.randint(0, 50, (3, 9))
    targets = torch.randint(0, 50, (3, 9))
    targets[0, :4] = -1
    got = train.token_logps(model, tokens, targets)
    logits = model(tokens)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="none")
    torch.testing.assert_close(got, -nll, atol=1e-10, rtol=0)
    assert (got[0, :4] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Rewards


def test_reward_exceptions_are_reported_with_the_sample_and_score_zero():
    def picky(prompt, completion, answer):
        if completion == "boom":
            raise RuntimeError("cannot parse")
        if completion == "nan":
            return float("nan")
        return float(completion == answer)

    lines = []
    rewards, failures = rl.score(picky, ["1+1=", "2+2=", "3+3=", "4+4="], ["2", "boom", "nan", "7"],
                                 ["2", "4", "6", "8"], lines.append)
    assert rewards == [1.0, 0.0, 0.0, 0.0] and failures == 2
    assert "sample 1" in lines[0] and "'2+2='" in lines[0] and "'boom'" in lines[0] and "cannot parse" in lines[0]
    assert "sample 2" in lines[1] and "not a finite number" in lines[1]
    assert all("\n" not in line for line in lines)


def test_reward_loading(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def length(prompt, completion, answer):\n    return len(completion)\n")
    fn, _ = rl.load_reward(f"{tmp_path / 'my_rewards.py'}:length")
    assert fn("p", "abc", None) == 3
    assert rl.load_reward("builtin")[0] is tasks.exact_match
    assert rl.load_reward("tasks:exact_match")[0] is tasks.exact_match
    for spec, needle in [("nocolon", "not module:function"), ("no_such_module_xyz:f", "cannot import"),
                         ("tasks:no_such_function", "has no function"), (f"{tmp_path}/missing.py:f", "not found")]:
        with pytest.raises(UserError, match=needle):
            rl.load_reward(spec)


# ----------------------------------------------------------------------------------------------------------------
# Rollouts


class CharTokenizer:
    """Digits and symbols as single tokens: enough for the addition task without training a tokenizer."""

    alphabet = "0123456789+=:abcdefghijklmnopqrstuvwxyz "
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 3 + len(alphabet)

    def encode(self, text):
        return [3 + self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


def test_rollout_batches_group_completions_and_reuse_for_iterations():
    from config import model_args_from_preset
    from model import Transformer

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("tiny-dense", vocab_size=tok.vocab_size, max_seq_len=32))
    model.init_weights()
    items = [(p.prompt, p.answer) for p in tasks.problems("add2", "train")[:10]]
    lines = []

    def reward(prompt, completion, answer):
        if len(completion) % 3 == 1:
            raise ValueError("odd")
        return float(len(completion))

    source = rl.RolloutSource(model, tok, items, reward, prompts_per_batch=3, group_size=4, max_new_tokens=5,
                              temperature=1.0, top_p=1.0, top_k=0, num_iterations=2, seed=0,
                              device=torch.device("cpu"), report=lines.append, reference=model)
    first = source.next_batch()
    assert first["fresh"] and first["tokens"].shape[0] == 12
    again = source.next_batch()
    assert not again["fresh"] and again["tokens"] is first["tokens"]
    assert torch.equal(first["old_logps"], first["ref_logps"])  # the reference here is the policy itself
    assert len(lines) == first["reward_errors"]
    # advantages are normalised per group of 4
    adv = first["advantages"].view(3, 4)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-5)
    loss, metrics = rl.rollout_loss(model, first, clip_eps=0.2, kl_coef=0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)
    # resuming from the state reproduces the next batch exactly
    state = source.state_dict()
    third = source.next_batch()
    source.load_state_dict(state)
    assert torch.equal(source.next_batch()["tokens"], third["tokens"])


# ----------------------------------------------------------------------------------------------------------------
# The command line, on the training core

import json  # noqa: E402

from tests.conftest import run_script  # noqa: E402
from tests.stage_fixtures import tiny_checkpoint  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}

FLAKY_REWARD = '''
def score(prompt, completion, answer):
    if len(completion) % 2:
        raise ValueError("odd length " + str(len(completion)))
    return float(completion.strip() == answer)
'''


@pytest.mark.slow
def test_cli_runs_with_a_failing_reward_function_and_logs_the_metrics(tmp_path):
    start, _ = tiny_checkpoint(tmp_path)
    (tmp_path / "flaky.py").write_text(FLAKY_REWARD)
    proc = run_script("rl.py", "--init_from", str(start), "--save_file_name", str(tmp_path / "run"), "--steps", "2",
                      "--batch_size", "2", "--group_size", "4", "--max_new_tokens", "4", "--kl_coef", "0.05",
                      "--reward", f"{tmp_path / 'flaky.py'}:score", "--eval_rate", "2", "--eval_problems", "8",
                      env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "reward function failed on sample" in line]
    assert warnings and "ValueError: odd length" in warnings[0] and "prompt '" in warnings[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "accuracy", "completion_len", "kl", "gen_tokens_per_s", "train_tokens_per_s",
                "reward_errors"):
        assert key in train[-1], key
    assert sum(r["reward_errors"] for r in train) > 0
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and "test_accuracy" in evals[-1]
    assert (tmp_path / "run" / "step_000002").is_dir()


@pytest.mark.parametrize("args,needle", [
    (["--reward", "nocolon"], "not module:function"),
    (["--reward", "no_such_module_xyz:f"], "cannot import"),
    (["--max_new_tokens", "40"], "exceed --seq_len"),
    (["--group_size", "1"], "--group_size must be >= 2"),
    (["--dataset_path_huggingface", "missing.jsonl"], "does not exist"),
])
def test_cli_mistakes_are_one_line_errors(args, needle, tmp_path):
    start, _ = tiny_checkpoint(tmp_path)
    proc = run_script("rl.py", "--init_from", str(start), *args, "--save_file_name", str(tmp_path / "run"),
                      "--steps", "1", cwd=tmp_path, env=ENV)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
