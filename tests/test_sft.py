"""sft.py: the assistant-only loss against transformers' loss (labels -100 outside the assistant turns, the mask
derived independently by apply_chat_template's return_assistant_tokens_mask on the exported folder), packing and
padding keeping the mask, over-long conversations truncated or dropped and counted, the data readers (messages and
prompt/response columns, jsonl and parquet), and the training run (resume, checkpoint recording the template)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import chat
import hf_interop
import sft
from chat_fixtures import make_tokenizer, random_model, save_checkpoint, tiny_args
from config import SFTConfig, UserError, parse_config

CONVERSATIONS = [
    [{"role": "user", "content": "What does os.path.join do?"},
     {"role": "assistant", "content": "Join two or more pathname components."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
     {"role": "assistant", "content": "Hello world."}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "The function returns 12345 and more words."}],
    [{"role": "user", "content": "Explain the with statement."},
     {"role": "assistant", "content": "def f(x):\n    return x * 2\n"}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_loss_equals_transformers_with_independently_masked_labels(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = random_model(tiny_args(tok.vocab_size, score_func="sigmoid"), seed=2)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    out = hf_interop.export_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    # the reference batch: ids and labels from transformers alone, right-padded to one length
    seq_len = 128
    ids_rows, label_rows = [], []
    for messages in CONVERSATIONS:
        enc = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
        ids_rows.append(ids + [tok.pad_id] * (seq_len + 1 - len(ids)))
        label_rows.append(labels + [-100] * (seq_len + 1 - len(labels)))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids_rows), labels=torch.tensor(label_rows)).loss.item()

    fmt = chat.ChatFormat(tok)
    examples, counts = sft.encode_conversations(fmt, CONVERSATIONS, seq_len, "truncate")
    assert counts["truncated"] == counts["dropped_overlong"] == counts["skipped"] == 0
    inputs, targets = sft.build_rows(examples, seq_len, tok.pad_id, pack=False)
    with torch.no_grad():
        ours, metrics = sft.sft_loss(model.eval(), (torch.from_numpy(inputs), torch.from_numpy(targets)))
    assert abs(ours.item() - theirs) < 1e-5, (ours.item(), theirs)
    assert int(metrics["trained_tokens"]) == sum((np.array(r[1:]) != -100).sum() for r in label_rows)
    # every target is a trained token's own id: the assistant replies and their end-of-turn
    eot = tok.token_to_id("<|end_of_turn|>")
    inputs, targets = sft.build_rows(examples, seq_len, tok.pad_id, pack=True)
    assert len(inputs) < len(CONVERSATIONS)
    trained = targets[targets != -1].tolist()
    assert trained.count(eot) == 4
    assert tok.decode(trained) == "".join(m["content"] for c in CONVERSATIONS for m in c if m["role"] == "assistant")


def test_packing_keeps_each_conversations_targets_and_rows_hold_whole_conversations(tok):
    fmt = chat.ChatFormat(tok)
    rng = np.random.default_rng(0)
    conversations = [CONVERSATIONS[i] for i in rng.integers(0, 3, size=25)]
    examples, _ = sft.encode_conversations(fmt, conversations, 96, "truncate")
    inputs, targets = sft.build_rows(examples, 96, tok.pad_id, pack=True)
    padded_x, padded_y = sft.build_rows(examples, 96, tok.pad_id, pack=False)
    assert len(inputs) < len(padded_x) == 25
    # the same (input, target) pairs in the same order once the padding is removed
    packed_pairs = [(a, b) for x, y in zip(inputs, targets) for a, b in zip(x, y) if not (a == tok.pad_id and b == -1)]
    padded_pairs = [(a, b) for x, y in zip(padded_x, padded_y) for a, b in zip(x, y)
                    if not (a == tok.pad_id and b == -1)]
    assert packed_pairs == padded_pairs
    assert all(row[0] == tok.bos_id for row in inputs)  # each row starts with a whole conversation


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tok):
    fmt = chat.ChatFormat(tok)
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello world " * 40}]
    no_room = [{"role": "user", "content": "hello there " * 40}, {"role": "assistant", "content": "ok"}]
    bad = [{"role": "robot", "content": "x"}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    kept, counts = sft.encode_conversations(fmt, [long, no_room, bad, short], 32, "truncate")
    assert counts == {"conversations": 4, "truncated": 1, "dropped_overlong": 1, "skipped": 1}
    assert [len(ids) for ids, _ in kept] == [33, len(fmt.encode(short)[0])]
    assert kept[0][0] == fmt.encode(long)[0][:33]
    kept, counts = sft.encode_conversations(fmt, [long, no_room, short], 32, "drop")
    assert counts["dropped_overlong"] == 2 and counts["truncated"] == 0 and len(kept) == 1


def test_reads_messages_and_prompt_response_columns_from_jsonl_and_parquet(tmp_path):
    import pandas as pd

    rows = [{"messages": c} for c in CONVERSATIONS] * 10
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config(SFTConfig, ["--dataset_path_huggingface", str(tmp_path / "chats.jsonl")])
    train, held_out = sft.read_conversations(cfg, "train"), sft.read_conversations(cfg, "eval")
    assert len(train) == 28 and len(held_out) == 2 and held_out[0] == CONVERSATIONS[0]
    pd.DataFrame({"prompt": ["What is 2?", "Hi"] * 21, "response": ["Two.", "Hello."] * 21}).to_parquet(
        tmp_path / "pairs.parquet")
    cfg = parse_config(SFTConfig, ["--dataset_path_huggingface", str(tmp_path / "pairs.parquet")])
    train = sft.read_conversations(cfg, "train")
    assert train[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    pd.DataFrame({"question": ["x"] * 3}).to_parquet(tmp_path / "bad.parquet")
    cfg = parse_config(SFTConfig, ["--dataset_path_huggingface", str(tmp_path / "bad.parquet")])
    with pytest.raises(UserError, match="--messages_column"):
        sft.read_conversations(cfg, "train")


def test_row_source_is_seeded_resumable_and_split_across_ranks():
    inputs = np.arange(40, dtype=np.int64).reshape(10, 4)
    a = sft.RowSource(inputs, inputs, 3, seed=1)
    first = [a.next_batch()[0][:, 0].tolist() for _ in range(5)]
    b = sft.RowSource(inputs, inputs, 3, seed=1)
    for _ in range(2):
        b.next_batch()
    state = b.state_dict()
    c = sft.RowSource(inputs, inputs, 3, seed=1)
    c.load_state_dict(state)
    assert [c.next_batch()[0][:, 0].tolist() for _ in range(3)] == first[2:]
    assert sorted(sum(first[:4], [])[:10]) == list(range(0, 40, 4))  # the first epoch visits every row once
    r0, r1 = sft.RowSource(inputs, inputs, 5, 1, rank=0, world_size=2), sft.RowSource(inputs, inputs, 5, 1, rank=1,
                                                                                       world_size=2)
    assert not set(r0.next_batch()[0][:, 0].tolist()) & set(r1.next_batch()[0][:, 0].tolist())


@pytest.mark.slow
def test_sft_run_records_the_template_resumes_exactly_and_learns(tok, tmp_path, capsys):
    """sft.py on the built-in data from a tiny checkpoint: the held-out answer loss goes down, the checkpoint
    records the chat template, and a stopped run resumed to the same step count gives identical weights."""
    import checkpoint

    model = random_model(tiny_args(tok.vocab_size, max_seq_len=96), seed=4)
    save_checkpoint(tmp_path / "base", model, tok)
    common = ["--init_from", str(tmp_path / "base"), "--max_conversations", "60", "--seq_len", "96",
              "--batch_size", "4", "--total_batch_size", "384", "--lr", "3e-3", "--warm_up", "2", "--eval_rate", "6",
              "--eval_steps", "2", "--device", "cpu", "--log_every", "1"]
    sft.main([*common, "--save_file_name", str(tmp_path / "full"), "--steps", "6", "--save_rate", "3"])
    out = capsys.readouterr().out
    assert re.search(r"conversations: \d+ of 60 used", out) and "held out" in out
    assert re.search(r"val answer loss [\d.]+", out)
    final = checkpoint.resolve_checkpoint(tmp_path / "full")
    assert checkpoint.read_meta(final)["chat_template"] == tok.chat_template
    # resume: the same folder without its last checkpoint continues from step 3 to the same weights
    shutil.copytree(tmp_path / "full", tmp_path / "parts")
    shutil.rmtree(tmp_path / "parts" / final.name)
    sft.main([*common, "--save_file_name", str(tmp_path / "parts"), "--steps", "6", "--save_rate", "3"])
    assert "resuming from" in capsys.readouterr().out
    a = checkpoint.load_weights(final / checkpoint.WEIGHTS_FILE)
    b = checkpoint.load_weights(checkpoint.resolve_checkpoint(tmp_path / "parts") / checkpoint.WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_one_line_errors(tmp_path, script):
    result = script("sft.py", "--init_from", str(tmp_path / "nowhere"), "--save_file_name", str(tmp_path / "out"))
    assert result.returncode != 0 and "--init_from" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sft_under_torchrun_with_two_ranks(tok, tmp_path):
    """DDP (gloo, 2 ranks): each rank reads its own rows, the run trains, evaluates and saves like one process."""
    import os
    import subprocess
    import sys

    import checkpoint

    save_checkpoint(tmp_path / "base", random_model(tiny_args(tok.vocab_size, max_seq_len=96), seed=6), tok)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(root / "sft.py"), "--init_from", str(tmp_path / "base"), "--save_file_name",
                             str(tmp_path / "ddp"), "--max_conversations", "40", "--seq_len", "96", "--batch_size", "2",
                             "--total_batch_size", "384", "--steps", "3", "--warm_up", "1", "--eval_rate", "3",
                             "--eval_steps", "2", "--device", "cpu"],
                            cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 ranks" in result.stdout and "val answer loss" in result.stdout
    meta = checkpoint.read_meta(checkpoint.resolve_checkpoint(tmp_path / "ddp"))
    assert meta["step"] == 3 and meta["chat_template"] == tok.chat_template
