"""train.py: DDP (gloo, torchrun) against one process, exact resume after a real signal, learning below the unigram
entropy, bf16/fp16 autocast, one-line errors for bad inputs, and the schedule/batch helpers."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script
from config import TrainConfig

# A very small MLA + MoE model (layer 0 dense, layer 1 MoE with 4 experts, top-2) for the exactness tests.
def small(dtype: str = "fp32") -> list[str]:
    return ["--model", "tiny", "--dim", "64", "--n_layers", "2", "--n_dense_layers", "1", "--n_heads", "2",
            "--inter_dim", "128", "--moe_inter_dim", "64", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
            "--qk_rope_head_dim", "8", "--v_head_dim", "8", "--n_routed_experts", "4", "--n_activated_experts", "2",
            "--bias_update_speed", "0.01", "--seq_len", "32", "--dtype", dtype, "--device", "cpu"]


SMALL = small()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """A 1024-token BPE trained on the built-in corpus and the whole corpus tokenized into shards."""
    root = tmp_path_factory.mktemp("train_corpus")
    tok, data = root / "tokenizer", root / "data"
    r = run_script("train_tokenizer.py", "--vocab_size", "1024", "--tokenizer_train_shard_size", "300000",
                   "--output_path", str(tok))
    assert r.returncode == 0, r.stderr
    r = run_script("tokenize_data.py", "--tokenizer_path", str(tok), "--data_file_name", str(data),
                   "--encoded_dataset_shard_size", "200000", "--val_tokens", "30000")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(root=root, tokenizer=tok, data=data)


def train_args(corpus: SimpleNamespace, save: Path, *extra: str) -> list[str]:
    return ["--tokenizer_path", str(corpus.tokenizer), "--data_file_name", str(corpus.data),
            "--save_file_name", str(save), *extra]


def read_log(path: Path, kind: str = "train") -> dict[int, dict]:
    """The JSONL log's records of one kind by step (a later record of the same step wins)."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            records[record["step"]] = record
    return records


def final_weights(save: Path) -> dict[str, torch.Tensor]:
    steps = sorted(save.glob("step_*"))
    assert steps, f"no checkpoint in {save}"
    return load_file(str(steps[-1] / "model.safetensors"))


# One thread per training process: the runs are small, and a shared 2-core machine with more busy threads than
# cores makes OpenMP's spinning threads many times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_ok(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = run_script("train.py", *args, env=ONE_THREAD, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


# ----------------------------------------------------------------------------------------------------------------
# (a) DDP with gloo under torchrun == one process with the same global batch


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(corpus, tmp_path: Path) -> None:
    # global batch 256 tokens: 2 ranks x 2 seqs x 32 tokens x 2 micro-steps (exercises no_sync) vs 1 process x 4 seqs
    # x 32 tokens x 2 micro-steps; the data loader hands rank r the windows a single process reads in the same order
    # AdamW: Muon's bf16 Newton-Schulz turns the all-reduce's float rounding into ~2e-5 loss differences by step 3
    common = [*SMALL, "--steps", "5", "--total_batch_size", "256", "--warm_up", "2", "--lr", "3e-3",
              "--eval_rate", "0", "--save_rate", "1000", "--quiet", "--seed", "7", "--optimizer", "adamw"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *train_args(corpus, tmp_path / "ddp", *common, "--batch_size", "2")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert "2 ranks x 2 micro-steps" in ddp.stdout
    run_ok(*train_args(corpus, tmp_path / "one", *common, "--batch_size", "4"))

    ddp_log, one_log = read_log(tmp_path / "ddp" / "log.jsonl"), read_log(tmp_path / "one" / "log.jsonl")
    assert sorted(ddp_log) == sorted(one_log) == [1, 2, 3, 4, 5]
    for step in one_log:
        assert abs(ddp_log[step]["loss"] - one_log[step]["loss"]) < 1e-5, step
        assert abs(ddp_log[step]["grad_norm"] - one_log[step]["grad_norm"]) < 1e-4 * one_log[step]["grad_norm"]
    assert one_log[5]["loss"] < one_log[1]["loss"]

    ddp_w, one_w = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    assert ddp_w.keys() == one_w.keys()
    for name in one_w:
        torch.testing.assert_close(ddp_w[name], one_w[name], atol=2e-5, rtol=0, msg=name)
    # the MoE balancing bias moved, identically on both sides (the ranks' expert counts were summed)
    bias = one_w["layers.1.ffn.gate.bias"]
    assert bias.abs().max() > 0
    torch.testing.assert_close(ddp_w["layers.1.ffn.gate.bias"], bias, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# (b) a real signal after step k, resume, identical to an uninterrupted run

RESUME = [*SMALL, "--steps", "40", "--batch_size", "4", "--total_batch_size", "256", "--warm_up", "5",
          "--lr", "3e-3", "--eval_rate", "15", "--eval_steps", "2", "--save_rate", "10", "--seed", "3"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("uninterrupted")
    run_ok(*train_args(corpus, save, *RESUME, "--quiet"))
    return save


def interrupt_after(args: list[str], step: int, sig: int, stderr_path: Path) -> tuple[int, str]:
    """Run train.py, send `sig` when its log line for `step` appears; return (exit status, stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {step:>6d}/"):
                proc.send_signal(sig)
                break
        lines.extend(proc.stdout)
        code = proc.wait(timeout=120)
    return code, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_then_resume_is_identical(corpus, uninterrupted: Path, tmp_path: Path, sig: int) -> None:
    save = tmp_path / "run"
    code, out = interrupt_after(train_args(corpus, save, *RESUME), 12, sig, tmp_path / "stderr.txt")
    assert code == 128 + sig, out + (tmp_path / "stderr.txt").read_text()
    assert "rerun the same command to resume" in out
    stopped = max(read_log(save / "log.jsonl"))
    assert 12 <= stopped < 40
    assert (save / f"step_{stopped:06d}").is_dir()  # the signal's own checkpoint (not a periodic one)

    resumed = run_ok(*train_args(corpus, save, *RESUME, "--quiet"))
    assert f"resuming from {save / f'step_{stopped:06d}'} at step {stopped}" in resumed.stdout

    got, want = read_log(save / "log.jsonl"), read_log(uninterrupted / "log.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 41))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]
    assert [got[s]["grad_norm"] for s in want] == [want[s]["grad_norm"] for s in want]
    assert read_log(save / "log.jsonl", "eval") == read_log(uninterrupted / "log.jsonl", "eval")
    got_w, want_w = final_weights(save), final_weights(uninterrupted)
    assert got_w.keys() == want_w.keys()
    for name in want_w:
        assert torch.equal(got_w[name], want_w[name]), name

    # the same command once more: nothing left to do
    again = run_ok(*train_args(corpus, save, *RESUME, "--quiet"))
    assert "nothing to do" in again.stdout


def test_init_from_checkpoint_continues_from_its_weights(corpus, uninterrupted: Path, tmp_path: Path) -> None:
    one_step = [*SMALL, "--steps", "1", "--batch_size", "4", "--total_batch_size", "256", "--eval_rate", "0",
                "--quiet"]
    run_ok(*train_args(corpus, tmp_path / "fresh", *one_step))
    init = run_ok(*train_args(corpus, tmp_path / "init", *one_step, "--init_from", str(uninterrupted)))
    assert "initialised from" in init.stdout
    trained_loss = read_log(uninterrupted / "log.jsonl")[40]["loss"]
    first_fresh = read_log(tmp_path / "fresh" / "log.jsonl")[1]["loss"]
    first_init = read_log(tmp_path / "init" / "log.jsonl")[1]["loss"]
    assert first_fresh > math.log(1024) - 0.1
    assert first_init < first_fresh - 0.5 and abs(first_init - trained_loss) < 0.5


# ----------------------------------------------------------------------------------------------------------------
# (c) the tiny preset learns: validation loss well below the unigram entropy


def unigram_entropy(data: Path, split: str) -> float:
    counts = np.zeros(1, dtype=np.int64)
    for shard in sorted(data.glob(f"{split}_*.npy")):
        if shard.name.endswith(".idx.npy"):
            continue
        c = np.bincount(np.load(shard).astype(np.int64))
        counts = np.pad(counts, (0, max(0, c.size - counts.size))) if c.size > counts.size else counts
        counts[:c.size] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_tiny_preset_learns_below_unigram_entropy(corpus, tmp_path: Path) -> None:
    save = tmp_path / "tiny"
    run_ok(*train_args(corpus, save, "--model", "tiny", "--steps", "300", "--seq_len", "64", "--batch_size", "16",
                       "--total_batch_size", "1024", "--lr", "3e-3", "--min_lr", "3e-4", "--warm_up", "30",
                       "--eval_rate", "300", "--eval_steps", "20", "--save_rate", "1000", "--quiet",
                       "--device", "cpu"), timeout=400)
    entropy = unigram_entropy(corpus.data, "train")
    val = read_log(save / "log.jsonl", "eval")[300]["val_loss"]
    first = read_log(save / "log.jsonl")[1]["loss"]
    assert abs(first - math.log(1024)) < 0.2  # starts at chance
    assert val < entropy - 1.0, (val, entropy)


# ----------------------------------------------------------------------------------------------------------------
# (d) mixed precision


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_runs_without_nan(corpus, tmp_path: Path, dtype: str) -> None:
    save = tmp_path / dtype
    r = run_ok(*train_args(corpus, save, *small(dtype), "--steps", "4", "--batch_size", "4", "--total_batch_size", "128",
                           "--warm_up", "1", "--eval_rate", "4", "--eval_steps", "1", "--quiet"))
    assert f"{dtype} on cpu" in r.stdout
    log = read_log(save / "log.jsonl")
    assert len(log) == 4 and all(math.isfinite(rec["loss"]) for rec in log.values())
    assert math.isfinite(read_log(save / "log.jsonl", "eval")[4]["val_loss"])
    weights = final_weights(save)
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = torch.load(sorted(save.glob("step_*"))[-1] / "train_state.pt", weights_only=False)
    assert (state["scaler"] is not None) == (dtype == "fp16")  # a gradient scaler for fp16 only


# ----------------------------------------------------------------------------------------------------------------
# (e) user mistakes: one line on stderr, non-zero exit


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other_tokenizer")
    r = run_script("train_tokenizer.py", "--vocab_size", "600", "--tokenizer_train_shard_size", "100000",
                   "--output_path", str(path))
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.parametrize("case", ["batch", "data", "tokenizer", "seq_len"])
def test_bad_inputs_give_one_line_errors(corpus, other_tokenizer: Path, tmp_path: Path, case: str) -> None:
    args = train_args(corpus, tmp_path / "ck", *SMALL, "--steps", "2", "--batch_size", "4",
                      "--total_batch_size", "256")
    expect = {"batch": "valid choices", "data": "not found", "tokenizer": "fingerprint", "seq_len": "max_seq_len"}
    if case == "batch":
        args += ["--total_batch_size", "1000"]
    elif case == "data":
        args += ["--data_file_name", str(tmp_path / "no_such_folder")]
    elif case == "tokenizer":
        args += ["--tokenizer_path", str(other_tokenizer)]
    else:
        args += ["--seq_len", "100000"]
    r = run_script("train.py", *args, env=ONE_THREAD, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect[case] in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------------------------------------------
# Helpers, in process


def test_batch_plan_and_its_error_message() -> None:
    import train
    from config import UserError

    assert train.plan_batch(16384, 16, 256, 1) == 4
    assert train.plan_batch(16384, 8, 256, 2) == 4
    with pytest.raises(UserError) as e:
        train.plan_batch(1000, 16, 256, 1)
    assert "--total_batch_size 4096" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        train.plan_batch(3 * 256 * 2, 2, 256, 2)
    assert "--batch_size one of 1, 3" in str(e.value)


def test_lr_schedule_warmup_then_cosine() -> None:
    import train

    cfg = TrainConfig(steps=100, warm_up=10, lr=1e-3, min_lr=1e-4, lr_schedule="cosine")
    lrs = [train.lr_at(s, cfg) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[0] > 0
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 10 + 45
    assert train.lr_at(mid, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 45 / 90)))


def test_weight_decay_only_on_matrices() -> None:
    import train
    from config import model_args_from_preset
    from model import Transformer

    model = Transformer(model_args_from_preset("tiny", vocab_size=256))
    opt = train.build_optimizer(model, TrainConfig(weight_decay=0.1, optimizer="adamw"), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p.dim() == 3 for p in decay["params"])  # the stacked routed experts


def test_compiled_model_trains_and_saves_the_raw_module(corpus, tmp_path: Path) -> None:
    # the eager backend runs torch.compile's graph capture without a C++ toolchain (inductor is exercised by bench)
    save = tmp_path / "compiled"
    run_ok(*train_args(corpus, save, *SMALL, "--steps", "2", "--batch_size", "4", "--total_batch_size", "128",
                       "--eval_rate", "0", "--quiet", "--compile_model", "--backend", "eager"))
    weights = final_weights(save)
    assert "embed.weight" in weights and not any(name.startswith(("_orig_mod", "module")) for name in weights)
    assert all(math.isfinite(rec["loss"]) for rec in read_log(save / "log.jsonl").values())
