"""dpo.py against TRL's DPOTrainer as the oracle, plus its data reading and errors.

The oracle: our model and a perturbed copy (the policy) are exported to HF DeepseekV3 folders that transformers
loads; TRL's DPOTrainer (built offline on a local dataset, with our exported tokenizer) tokenizes the pairs,
collates them and computes the loss with its own code (`compute_loss`); we encode the same rows with dpo.py and
compute the loss with our model. Token ids, loss, mean chosen/rejected rewards, reward accuracy and margin, and
every parameter's gradient (TRL's mapped back to our layout by hf_interop) agree within 1e-5 (float64 models on
both sides, so that what is compared is the computation, not float32 rounding).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import dpo
import hf_interop as hfi
from tests.stage_fixtures import make_tokenizer, tiny_checkpoint
from config import ModelArgs, UserError

ROWS = [
    {"prompt": "The function returns", "chosen": " the value of the argument.", "rejected": " hello there"},
    {"prompt": "def f(x):\n", "chosen": "    return x * 2\n", "rejected": "Numbers 12345"},
    {"prompt": "Hello world,", "chosen": " hello there!", "rejected": " and more words for merges, and more."},
    {"prompt": "Numbers", "chosen": " 12345 and more", "rejected": " words"},
]


def tiny_args(vocab: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1,
                     n_heads=2, max_seq_len=64, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                     v_head_dim=8, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
                     score_func="sigmoid")


def tiny_model(args: ModelArgs, seed: int, base=None):
    from model import Transformer

    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is not None:  # the policy: the reference plus a perturbation
                p.copy_(dict(base.named_parameters())[name] + 0.05 * torch.randn_like(p))
            elif not name.endswith("norm.weight"):
                p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
        for moe in model.moe_layers():
            moe.gate.bias.copy_(0.1 * torch.randn_like(moe.gate.bias) if base is None
                                else dict(base.named_buffers())[[n for n, b in model.named_buffers()
                                                                 if b is moe.gate.bias][0]])
    return model.double()


def trl_compute(tmp_path: Path, policy_dir: Path, ref_dir: Path, rows, **options):
    """TRL's tokenized batch, loss, logged metrics and gradients (HF parameter names)."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float64, experts_implementation="eager")
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float64, experts_implementation="eager")
    hf_tok = transformers.AutoTokenizer.from_pretrained(policy_dir)
    config = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), report_to="none",
                       use_cpu=True, bf16=False, fp16=False, max_length=None, logging_steps=1, save_strategy="no",
                       dataset_num_proc=None, **options)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=config, processing_class=hf_tok,
                         train_dataset=datasets.Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return batch, loss.detach(), metrics, grads


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.2), ("sigmoid", 0.2)])
def test_loss_rewards_and_gradients_equal_trl(loss_type, label_smoothing, tmp_path, rows=ROWS):
    tok = make_tokenizer(tmp_path / "tok")
    args = tiny_args(tok.vocab_size)
    ref = tiny_model(args, 0)
    policy = tiny_model(args, 1, base=ref)
    policy_dir = hfi.write_hf_folder(tmp_path / "policy", args, policy.state_dict(), tok)
    ref_dir = hfi.write_hf_folder(tmp_path / "ref", args, ref.state_dict(), tok)
    beta = 0.3
    if loss_type == "sigmoid" and label_smoothing:
        # TRL's sigmoid loss has no smoothing; conservative DPO, -(1-s) log sig(d) - s log sig(-d), is TRL's own
        # loss terms weighted: 2(1-s) * sigmoid - (1-2s) * robust
        options = dict(loss_type=["sigmoid", "robust"],
                       loss_weights=[2 * (1 - label_smoothing), -(1 - 2 * label_smoothing)])
    else:
        options = dict(loss_type=[loss_type])
    batch, trl_loss, metrics, trl_grads = trl_compute(tmp_path, policy_dir, ref_dir, rows, beta=beta,
                                                      label_smoothing=label_smoothing, **options)

    # ours: the same rows through dpo.py's encoding, collation and loss
    pairs, dropped = dpo.encode_rows(tok, rows, max_len=args.max_seq_len)
    assert dropped == 0
    ours = dpo.collate(pairs, tok.pad_id)
    n = batch["input_ids"].shape[1]
    expected_targets = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -1)
    # our inputs are each row without its last token, right-padded: TRL's rows, padded one token earlier
    expected_tokens = batch["input_ids"][:, :n - 1].masked_fill(batch["attention_mask"][:, 1:] == 0, tok.pad_id)
    assert ours["tokens"].tolist() == expected_tokens.tolist()
    assert ours["targets"].tolist() == expected_targets.tolist()

    policy.train()
    logps = dpo.sequence_logps(policy, ours["tokens"], ours["targets"])
    with torch.no_grad():
        ref_logps = dpo.sequence_logps(ref.eval(), ours["tokens"], ours["targets"])
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    cc, rcount = ours["completion_tokens"].chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing,
                                                            cc, rcount)
    loss = losses.mean()
    loss.backward()
    m = dpo.pair_metrics(losses, chosen_rewards, rejected_rewards, pc, pr)

    assert abs(loss.item() - trl_loss.item()) < 1e-5
    for ours_key, trl_key in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                              ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                              ("logp_chosen", "logps/chosen"), ("logp_rejected", "logps/rejected")]:
        assert abs(m[ours_key].item() - metrics[trl_key]) < 1e-5, (ours_key, m[ours_key].item(), metrics[trl_key])
    assert 0 < m["reward_accuracy"].item() < 1 or loss_type != "sigmoid" or rows is not ROWS  # both outcomes

    # gradients: TRL's (HF names, fused experts) mapped to our layout
    config = json.loads((policy_dir / "config.json").read_text())
    theirs = hfi.from_hf_state_dict(trl_grads, args, rope_interleave=bool(config.get("rope_interleave", True)))
    ours_grads = {n: p.grad for n, p in policy.named_parameters()}
    assert set(ours_grads) <= set(theirs)
    largest = max(g.abs().max().item() for g in ours_grads.values())
    assert largest > 1e-3  # the comparison is not between zeros
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs[name].to(grad.dtype), atol=1e-5, rtol=0, msg=name)


CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
     "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS[:2]
] + [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world,"},
                 {"role": "assistant", "content": "hello there!"}, {"role": "user", "content": "Numbers"}],
      "chosen": [{"role": "assistant", "content": "12345 and more"}],
      "rejected": [{"role": "assistant", "content": "words"}]}]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_conversations_through_the_chat_template_equal_trl(tmp_path):
    """Message-list rows: TRL applies the exported folder's Jinja chat_template, dpo.py chat.py's ChatFormat; the
    ids, loss, rewards and gradients still agree."""
    test_loss_rewards_and_gradients_equal_trl("sigmoid", 0.0, tmp_path, rows=CHAT_ROWS)


# ----------------------------------------------------------------------------------------------------------------
# The loss family by hand (float64)


def test_losses_against_hand_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    nc, nr = torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([2, 6, 5, 3, 5, 8])
    beta, s = 0.25, 0.1
    for i in range(6):
        d = (pc[i] - rc[i]) - (pr[i] - rr[i])
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        expected = {
            "sigmoid": -(1 - s) * math.log(sig(beta * d)) - s * math.log(sig(-beta * d)),
            "robust": (-(1 - s) * math.log(sig(beta * d)) + s * math.log(sig(-beta * d))) / (1 - 2 * s),
            "hinge": max(0.0, 1 - beta * d),
            "ipo": ((pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i] - 1 / (2 * beta)) ** 2,
        }
        for loss_type, value in expected.items():
            smoothing = s if loss_type in ("sigmoid", "robust") else 0.0
            losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing, nc, nr)
            assert abs(losses[i].item() - float(value)) < 1e-12, loss_type
            assert abs(cr[i].item() - beta * (pc[i] - rc[i]).item()) < 1e-12


def test_loss_option_errors_are_one_line():
    with pytest.raises(UserError, match="label_smoothing applies"):
        dpo.check_loss_options("ipo", 0.1, 0.1)
    with pytest.raises(UserError, match="< 0.5"):
        dpo.check_loss_options("robust", 0.1, 0.5)
    with pytest.raises(UserError, match="unknown"):
        dpo.check_loss_options("kto", 0.1, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Data forms


def test_message_lists_in_ultrafeedback_style_split_into_prompt_and_completions():
    user = {"role": "user", "content": "2+2?"}
    row = {"prompt": "2+2?", "chosen": [user, {"role": "assistant", "content": "4"}],
           "rejected": [user, {"role": "assistant", "content": "5"}]}
    prompt, chosen, rejected = dpo.split_row(row, 0)
    assert prompt == [user] and chosen == [{"role": "assistant", "content": "4"}]
    assert rejected == [{"role": "assistant", "content": "5"}]
    # identical replies up to the last turn: the prompt still ends before an assistant reply
    same = {"role": "assistant", "content": "same"}
    row = {"chosen": [user, same, user, {"role": "assistant", "content": "a"}],
           "rejected": [user, same, user, {"role": "assistant", "content": "b"}]}
    assert dpo.split_row(row, 0)[0] == [user, same, user]


def test_message_lists_are_encoded_with_the_chat_template(tmp_path):
    class FakeFormat:  # a stand-in template: the encoding must split where prompt and conversation diverge
        def encode(self, messages, add_generation_prompt=False):
            ids = [1]
            for m in messages:
                ids += [10 if m["role"] == "user" else 11] + [ord(c) for c in m["content"]] + [12]
            return (ids + [11] if add_generation_prompt else ids), []

    tok = make_tokenizer(tmp_path / "tok")
    user = [{"role": "user", "content": "hi"}]
    pair = dpo.encode_pair(tok, user, [{"role": "assistant", "content": "yo"}],
                           [{"role": "assistant", "content": "no"}], FakeFormat())
    assert pair.prompt == [1, 10, ord("h"), ord("i"), 12, 11]
    assert pair.chosen == [ord("y"), ord("o"), 12] and pair.rejected == [ord("n"), ord("o"), 12]


def test_local_jsonl_and_parquet_read_the_same_rows(tmp_path):
    import datasets

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "p.parquet"))
    assert dpo.read_rows(str(tmp_path / "p.jsonl")) == ROWS
    assert dpo.read_rows(str(tmp_path / "p.parquet")) == ROWS


def test_builtin_pairs_are_deterministic_and_the_rejected_answer_is_wrong():
    rows = dpo.builtin_rows()
    assert rows == dpo.builtin_rows() and len(rows) == 4000
    for row in rows[:200]:
        a, b = map(int, row["prompt"].rstrip("=").split("+"))
        assert row["chosen"] == str(a + b) and row["rejected"] != row["chosen"]
        assert len(row["rejected"]) == len(row["chosen"]) and not row["rejected"].startswith("0")


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "chosen": "c"}, "no rejected column"),
    ({"chosen": "c", "rejected": "r"}, "prompt string is needed"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "x"}]}, "both be strings"),
])
def test_bad_rows_are_one_line_errors(row, needle):
    with pytest.raises(UserError, match=needle):
        dpo.split_row(row, 3)


def test_missing_local_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        dpo.read_rows(str(tmp_path / "nope.jsonl"))


def test_holdout_split_is_seeded_and_disjoint():
    pairs = [dpo.Pair([1], [i], [i + 1]) for i in range(20)]
    train, val = dpo.split_holdout(pairs, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert dpo.split_holdout(pairs, 0.1, seed=3) == (train, val)
    assert not {p.chosen[0] for p in train} & {p.chosen[0] for p in val}
    rng = random.Random(0)
    del rng


# ----------------------------------------------------------------------------------------------------------------
# The command line, on the training core

from tests.conftest import run_script  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cli_trains_logs_rewards_evaluates_and_resumes(tmp_path):
    start, _ = tiny_checkpoint(tmp_path)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 5))
    common = ["--init_from", str(start), "--dataset_path_huggingface", str(data), "--save_file_name",
              str(tmp_path / "run"), "--batch_size", "2", "--eval_rate", "2", "--val_fraction", "0.2",
              "--lr", "1e-3", "--precompute_ref", "--quiet"]
    first = run_script("dpo.py", *common, "--steps", "2", env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "16 train, 4 held out, 0 dropped" in first.stdout
    second = run_script("dpo.py", *common, "--steps", "4", env=ENV)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout
    records = _records(tmp_path / "run" / "log.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[0]["reward_margin"] == 0.0  # the policy starts as the reference
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("val_loss", "val_reward_accuracy", "val_reward_margin", "val_reward_chosen"):
        assert key in evals[-1]


@pytest.mark.parametrize("args,needle", [
    ([], "needs --init_from"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"], "label_smoothing applies"),
    (["--dataset_path_huggingface", "missing.jsonl"], "does not exist"),
    (["--beta", "0"], "--beta must be > 0"),
])
def test_cli_mistakes_are_one_line_errors(args, needle, tmp_path):
    start, _ = tiny_checkpoint(tmp_path)
    init = [] if not args else ["--init_from", str(start)]
    if not args:  # no --init_from: the tokenizer comes from the options
        init = ["--tokenizer_path", str(tmp_path / "tok")]
    proc = run_script("dpo.py", *init, *args, "--save_file_name", str(tmp_path / "run"), "--steps", "1",
                      cwd=tmp_path, env=ENV)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step_*"))
