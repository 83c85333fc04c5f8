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
from config import TrainConfig, UserError

# A very small MLA + MoE model (layer 0 dense, layer 1 MoE with 4 experts, top-2) for the exactness tests.
def small(dtype: str = "fp32") -> list[str]:
    return ["--model", "tiny", "--dim", "64", "--n_layers", "2", "--n_dense_layers", "1", "--n_heads", "2",
            "--inter_dim", "128", "--moe_inter_dim", "64", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
            "--qk_rope_head_dim", "8", "--v_head_dim", "8", "--n_routed_experts", "4", "--n_activated_experts", "2",
            "--bias_update_speed", "0.01", "--seq_len", "32", "--dtype", dtype, "--device", "cpu"]


SMALL = small()


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


# Muon orthogonalises each update with a bf16 Newton-Schulz iteration (torch.optim.Muon's), which turns the float
# rounding of DDP's all-reduce into differences around 1e-4 after a few steps: its tolerances are looser
# (and AdamW's sign-like first steps turn them into a step of --embed_lr on the few embedding rows with near-zero
# gradients): for Muon the weights are compared by their mean difference, with a loose bound on the largest one
# (two such steps at --embed_lr 0.01)
DDP_TOLERANCE = {"adamw": dict(loss=1e-5, gnorm=1e-4, weights=2e-5, mean=2e-5),
                 "muon": dict(loss=2e-3, gnorm=2e-2, weights=2e-2, mean=5e-4)}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_match_one_process(corpus, tmp_path: Path, optimizer: str) -> None:
    # global batch 256 tokens: 2 ranks x 2 seqs x 32 tokens x 2 micro-steps (exercises no_sync) vs 1 process x 4 seqs
    # x 32 tokens x 2 micro-steps; the data loader hands rank r the windows a single process reads in the same order
    # evaluation at step 5 over the same 12 validation windows: 6 batches of 2 split over 2 ranks, 3 batches of 4
    tol = DDP_TOLERANCE[optimizer]
    common = [*SMALL, "--steps", "5", "--total_batch_size", "256", "--warm_up", "2", "--lr", "3e-3",
              "--eval_rate", "5", "--save_rate", "1000", "--quiet", "--seed", "7", "--optimizer", optimizer,
              "--embed_lr", "0.01", "--muon_lr", "0.02", "--min_lr", "1e-4"]  # the rates its tolerances were set at
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *train_args(corpus, tmp_path / "ddp", *common, "--batch_size", "2",
                                                                  "--eval_steps", "6")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert "2 ranks x 2 micro-steps" in ddp.stdout
    run_ok(*train_args(corpus, tmp_path / "one", *common, "--batch_size", "4", "--eval_steps", "3"))

    ddp_log, one_log = read_log(tmp_path / "ddp" / "log.jsonl"), read_log(tmp_path / "one" / "log.jsonl")
    assert sorted(ddp_log) == sorted(one_log) == [1, 2, 3, 4, 5]
    for step in one_log:
        assert abs(ddp_log[step]["loss"] - one_log[step]["loss"]) < tol["loss"], step
        assert abs(ddp_log[step]["grad_norm"] - one_log[step]["grad_norm"]) < tol["gnorm"] * one_log[step]["grad_norm"]
    assert one_log[5]["loss"] < one_log[1]["loss"]
    ddp_eval, one_eval = read_log(tmp_path / "ddp" / "log.jsonl", "eval")[5], read_log(tmp_path / "one" / "log.jsonl",
                                                                                        "eval")[5]
    assert abs(ddp_eval["val_loss"] - one_eval["val_loss"]) < tol["loss"]  # averaged over the ranks' shares
    assert ddp_eval["val_bpb"] == pytest.approx(one_eval["val_bpb"], abs=tol["loss"])

    ddp_w, one_w = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    assert ddp_w.keys() == one_w.keys()
    for name in one_w:
        diff = (ddp_w[name] - one_w[name]).abs()
        assert diff.max() <= tol["weights"] and diff.mean() <= tol["mean"], (name, diff.max(), diff.mean())
    # the MoE balancing bias moved, identically on both sides (the ranks' expert counts were summed)
    bias = one_w["layers.1.ffn.gate.bias"]
    assert bias.abs().max() > 0
    torch.testing.assert_close(ddp_w["layers.1.ffn.gate.bias"], bias, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# (b) a real signal after step k, resume, identical to an uninterrupted run

RESUME = [*SMALL, "--steps", "40", "--batch_size", "4", "--total_batch_size", "256", "--warm_up", "5",
          "--lr", "3e-3", "--eval_rate", "15", "--eval_steps", "2", "--save_rate", "10", "--seed", "3",
          "--optimizer", "muon"]  # the default optimizer: its state must resume exactly too


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


def test_init_from_checkpoint_starts_from_its_weights(corpus, uninterrupted: Path, tmp_path: Path) -> None:
    # one step at a negligible learning rate: the saved weights are the --init_from weights (the MoE balancing bias
    # moves by its own fixed step, bias_update_speed, whatever the learning rate)
    one_step = [*SMALL, "--steps", "1", "--batch_size", "4", "--total_batch_size", "128", "--eval_rate", "0",
                "--quiet", "--lr", "1e-12", "--min_lr", "0", "--warm_up", "0", "--weight_decay", "0",
                "--optimizer", "adamw", "--embed_lr", "0"]
    init = run_ok(*train_args(corpus, tmp_path / "init", *one_step, "--init_from", str(uninterrupted)))
    assert "initialised from" in init.stdout
    got, want = final_weights(tmp_path / "init"), final_weights(uninterrupted)
    assert got.keys() == want.keys()
    for name in want:
        tol = 0.0101 if name.endswith("gate.bias") else 1e-9
        torch.testing.assert_close(got[name], want[name], atol=tol, rtol=0, msg=name)


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


AUTOCAST = ["--steps", "4", "--batch_size", "4", "--total_batch_size", "128", "--warm_up", "1", "--eval_rate", "4",
            "--eval_steps", "1", "--quiet", "--optimizer", "adamw"]  # Muon's bf16 Newton-Schulz would blur the compare


@pytest.fixture(scope="module")
def fp32_run(corpus, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("fp32")
    run_ok(*train_args(corpus, save, *small("fp32"), *AUTOCAST))
    return save


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.03), ("fp16", 0.005)])
def test_autocast_matches_fp32(corpus, fp32_run: Path, tmp_path: Path, dtype: str, tol: float) -> None:
    # bf16 keeps 8 mantissa bits, fp16 11: the per-step losses of 4 steps stay within these relative tolerances
    save = tmp_path / dtype
    r = run_ok(*train_args(corpus, save, *small(dtype), *AUTOCAST))
    assert f"{dtype} on cpu" in r.stdout
    got, want = read_log(save / "log.jsonl"), read_log(fp32_run / "log.jsonl")
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= tol * want[step]["loss"], (step, got[step], want[step])
    got_val = read_log(save / "log.jsonl", "eval")[4]["val_loss"]
    assert abs(got_val - read_log(fp32_run / "log.jsonl", "eval")[4]["val_loss"]) <= tol * got_val
    weights = final_weights(save)
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = torch.load(sorted(save.glob("step_*"))[-1] / "train_state.pt", weights_only=True)
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
    opt = train.build_optimizer(model, TrainConfig(weight_decay=0.1, optimizer="adamw", embed_lr=0), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p.dim() == 3 for p in decay["params"])  # the stacked routed experts


@pytest.mark.slow
def test_compiled_model_matches_eager_and_saves_the_raw_module(corpus, fp32_run: Path, tmp_path: Path) -> None:
    # the inductor backend the README documents (it needs a C++ compiler, as on any Linux machine with gcc)
    save = tmp_path / "compiled"
    run_ok(*train_args(corpus, save, *small("fp32"), *AUTOCAST, "--compile_model", "--backend", "inductor"),
           timeout=600)
    weights = final_weights(save)
    assert "embed.weight" in weights and not any(name.startswith(("_orig_mod", "module")) for name in weights)
    got, want = read_log(save / "log.jsonl"), read_log(fp32_run / "log.jsonl")
    for step in want:  # the same math, fused differently: float32 rounding only
        assert abs(got[step]["loss"] - want[step]["loss"]) < 1e-4, step


# ----------------------------------------------------------------------------------------------------------------
# (f) the core's step against a hand-written float64 reference: accumulation, clipping, AdamW, weight decay


def test_train_step_is_accumulated_clipped_adamw(corpus, tmp_path: Path) -> None:
    import copy

    import train
    from config import parse_config

    cfg, overrides = parse_config(TrainConfig, train_args(corpus, tmp_path / "run", *SMALL, "--batch_size", "2",
                                                          "--total_batch_size", "192", "--grad_clip", "0.05",
                                                          "--lr", "1e-2", "--warm_up", "0", "--steps", "3",
                                                          "--weight_decay", "0.1", "--eval_rate", "0",
                                                          "--optimizer", "adamw", "--lr_schedule", "cosine",
                                                          "--embed_lr", "0"),
                                  with_model_args=True)
    d = train.setup_distributed("cpu")
    run = train.prepare(cfg, overrides, d, train.load_pretrain_tokenizer(cfg))
    with run.closers:
        task = train.PretrainTask(run)
        train.restore(run, task)
        train.wrap(run)
        assert run.grad_accum == 3
        batches = []
        next_batch = task.train_source.next_batch
        task.train_source.next_batch = lambda: batches.append(next_batch()) or batches[-1]
        ref = copy.deepcopy(run.raw).double()
        metrics, stop = train.train_step(run, 1, task)
    assert not stop and len(batches) == 3
    losses = []
    for x, y in batches:
        loss = ref(x, y)
        (loss / 3).backward()
        losses.append(loss.item())
    assert metrics["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    named = {n: p for n, p in ref.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in named.values())).item()
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the norm before clipping
    clip = min(1.0, 0.05 / (norm + 1e-6))
    assert clip < 0.5  # the clip is active
    params = dict(run.raw.named_parameters())
    beta1, lr, eps = cfg.beta1, 1e-2 * train.lr_at(1, cfg) / cfg.lr, 1e-8
    for name, p_ref in named.items():
        g = p_ref.grad * clip
        state = run.optimizer.state[params[name]]
        torch.testing.assert_close(state["exp_avg"].double(), (1 - beta1) * g, rtol=2e-3, atol=1e-9, msg=name)
        decay = 0.1 if p_ref.dim() >= 2 else 0.0
        m_hat, v_hat = g, g * g  # bias-corrected first moments after one step
        want = p_ref.detach() * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(params[name].detach().double(), want, rtol=0, atol=lr * 2e-2, msg=name)


def test_resolve_model_args_rules() -> None:
    import train
    from config import ModelArgs

    cfg = TrainConfig(model="tiny")
    args = train.resolve_model_args(cfg, {"n_layers": 3}, vocab_size=1000)
    assert args.n_layers == 3 and args.vocab_size == 1000 and args.dim == 128
    stored = dataclasses_replace(args, dim=64, n_heads=2)
    kept = train.resolve_model_args(cfg, {"max_seq_len": 512}, 1000, stored)
    assert kept == dataclasses_replace(stored, max_seq_len=512)
    with pytest.raises(UserError, match="dim=32"):
        train.resolve_model_args(cfg, {"dim": 32}, 1000, stored)
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        train.resolve_model_args(cfg, {"vocab_size": 500}, 1000)
    assert isinstance(kept, ModelArgs)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ----------------------------------------------------------------------------------------------------------------
# (g) run folders: nothing lost, nothing mixed, nothing left behind

FOLDER_RUN = [*SMALL, "--batch_size", "4", "--total_batch_size", "128", "--eval_rate", "0", "--warm_up", "1",
              "--save_rate", "2", "--quiet"]


def one_line_error(r: subprocess.CompletedProcess, expect: str) -> None:
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_new_run_never_deletes_or_resumes_another_run(corpus, tmp_path: Path) -> None:
    save = tmp_path / "run"
    run_ok(*train_args(corpus, save, *FOLDER_RUN, "--steps", "8", "--keep_checkpoints", "10",
                       "--peak_flops", "1e12"))
    old_id = json.loads((save / "run.json").read_text())["run_id"]
    # --peak_flops sets the MFU denominator
    rec = read_log(save / "log.jsonl")[3]
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * flops_of_small() / 1e12, rel=1e-6)

    refused = run_script("train.py", *train_args(corpus, save, *FOLDER_RUN, "--steps", "4", "--lr", "5e-4", "--min_lr", "5e-5",
                                                 "--resume=False"), env=ONE_THREAD)
    one_line_error(refused, "already holds a run")
    assert sorted(p.name for p in save.glob("step_*")) == [f"step_{s:06d}" for s in (2, 4, 6, 8)]

    run_ok(*train_args(corpus, save, *FOLDER_RUN, "--steps", "4", "--lr", "5e-4", "--min_lr", "5e-5", "--resume=False", "--overwrite",
                       "--keep_checkpoints", "1"))
    new_id = json.loads((save / "run.json").read_text())["run_id"]
    assert new_id != old_id
    assert sorted(p.name for p in save.glob("step_*")) == ["step_000004"]  # --keep_checkpoints 1
    assert not list(save.glob("replaced_*"))  # the old run is gone only now that the new one finished
    assert sorted(read_log(save / "log.jsonl")) == [1, 2, 3, 4]

    again = run_ok(*train_args(corpus, save, *FOLDER_RUN, "--steps", "6", "--lr", "5e-4", "--min_lr", "5e-5", "--keep_checkpoints", "1"))
    assert "resuming from" in again.stdout and "step_000004" in again.stdout
    log = [json.loads(line) for line in (save / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] <= 5e-4 for r in log if r["kind"] == "train")


def flops_of_small() -> float:
    import train
    from config import parse_config

    cfg, overrides = parse_config(TrainConfig, SMALL, with_model_args=True)
    return train.build_model(train.resolve_model_args(cfg, overrides, 1024), torch.device("cpu")).flops_per_token(32)


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(corpus, tmp_path: Path) -> None:
    save = tmp_path / "run"
    run_ok(*train_args(corpus, save, *FOLDER_RUN, "--steps", "4"))
    weights = save / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    r = run_ok(*train_args(corpus, save, *FOLDER_RUN, "--steps", "6"))
    assert "skipping the damaged checkpoint" in r.stderr and "step_000004" in r.stderr
    assert f"resuming from {save / 'step_000002'} at step 2" in r.stdout
    assert sorted(read_log(save / "log.jsonl")) == [1, 2, 3, 4, 5, 6]
    # with no intact checkpoint left, training refuses instead of silently starting over
    for step_dir in save.glob("step_*"):
        (step_dir / "optimizer.pt").unlink()
    one_line_error(run_script("train.py", *train_args(corpus, save, *FOLDER_RUN, "--steps", "8"), env=ONE_THREAD),
                   "every checkpoint")


def test_second_process_is_refused_and_kill9_leaves_no_litter(corpus, tmp_path: Path) -> None:
    save = tmp_path / "run"
    args = train_args(corpus, save, *FOLDER_RUN, "--steps", "1000", "--save_rate", "1", "--keep_checkpoints", "2",
                      "--log_every", "1")
    args.remove("--quiet")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("step      4/"):
                break
        second = run_script("train.py", *args, env=ONE_THREAD)
        one_line_error(second, f"in use by process {proc.pid}")
    finally:
        proc.kill()  # SIGKILL: no handler runs, possibly in the middle of a save
        proc.wait()
    (save / ".tmp_step_000999_4242").mkdir()  # what a kill inside a save leaves
    (save / ".tmp_step_000999_4242" / "model.safetensors").write_bytes(b"partial")
    done = max(int(p.name[5:]) for p in save.glob("step_*"))
    r = run_ok(*train_args(corpus, save, *FOLDER_RUN, "--steps", str(done + 2), "--keep_checkpoints", "2"))
    assert "resuming from" in r.stdout
    assert not [p for p in save.iterdir() if p.name.startswith(".tmp")]
    steps = [json.loads(line)["step"] for line in (save / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, done + 3))


@pytest.mark.parametrize("case", ["save_is_file", "log_is_folder", "read_only", "log_taken"])
def test_bad_output_paths_are_one_line_errors(corpus, tmp_path: Path, case: str) -> None:
    save = tmp_path / "run"
    extra: list[str] = []
    expect = {"save_is_file": "is a file", "log_is_folder": "is a folder", "read_only": "cannot write",
              "log_taken": "already holds another run's log"}[case]
    if case == "save_is_file":
        save.write_text("not a folder")
    elif case == "log_is_folder":
        (tmp_path / "logdir").mkdir()
        extra = ["--log_file", str(tmp_path / "logdir")]
    elif case == "read_only":
        save = Path("/proc/no_such_run")  # a read-only file system, even for root
    else:
        (tmp_path / "log.jsonl").write_text('{"kind": "train", "step": 1}\n')
        extra = ["--log_file", str(tmp_path / "log.jsonl")]
    r = run_script("train.py", *train_args(corpus, save, *FOLDER_RUN, "--steps", "2", *extra), env=ONE_THREAD)
    one_line_error(r, expect)
    if case == "log_taken":
        assert (tmp_path / "log.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
        assert not save.exists()


@pytest.mark.slow
def test_ddp_peer_death_is_one_line_from_the_survivor(corpus, tmp_path: Path) -> None:
    import time

    args = train_args(corpus, tmp_path / "ddp", *SMALL, "--steps", "100000", "--batch_size", "2",
                      "--total_batch_size", "128", "--eval_rate", "0", "--save_rate", "100000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in launcher.stdout:
            if line.startswith("step      3/"):
                break
        victim = None
        for _ in range(50):
            for pid in os.listdir("/proc"):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except (OSError, ValueError):
                    continue
                if b"LOCAL_RANK=1" in environ and str(tmp_path).encode() in cmdline:
                    victim = int(pid)
            if victim:
                break
            time.sleep(0.1)
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    survivor = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(survivor) == 1 and survivor[0].startswith("error: rank 0: another rank stopped"), err[-3000:]
    assert f'File "{ROOT / "train.py"}"' not in err  # no traceback from our own code


def test_keep_best_keeps_the_lowest_validation_loss(corpus, tmp_path: Path) -> None:
    import checkpoint

    save = tmp_path / "run"
    best_args = [*FOLDER_RUN, "--eval_rate", "2", "--eval_steps", "2", "--keep_best"]
    run_ok(*train_args(corpus, save, *best_args, "--steps", "4"))
    evals = read_log(save / "log.jsonl", "eval")
    best_step = min(evals, key=lambda s: evals[s]["val_loss"])
    meta = json.loads((save / "best" / "meta.json").read_text())
    assert meta["step"] == best_step and meta["val_loss"] == pytest.approx(evals[best_step]["val_loss"])
    assert checkpoint.verify_checkpoint(save / "best", deep=True) is None
    # pretend that best was unbeatable: the resumed run's later, worse evaluations must not replace it
    meta["val_loss"] = 0.01
    (save / "best" / "meta.json").write_text(json.dumps(meta))
    run_ok(*train_args(corpus, save, *best_args, "--steps", "8"))
    assert sorted(read_log(save / "log.jsonl", "eval")) == [2, 4, 6, 8]
    kept = json.loads((save / "best" / "meta.json").read_text())
    assert kept["step"] == best_step and kept["val_loss"] == 0.01


def test_a_finished_wsd_run_extends_exactly(corpus, tmp_path: Path) -> None:
    # WSD holds the peak rate until the last decay_frac of the steps: the checkpoint at the end of that stable phase
    # does not depend on --steps, so a finished 10-step run resumed from it with --steps 15 equals a 15-step run
    wsd = [*FOLDER_RUN, "--lr_schedule", "wsd", "--decay_frac", "0.4", "--save_rate", "5", "--eval_rate", "0"]
    run_ok(*train_args(corpus, tmp_path / "long", *wsd, "--steps", "15"))
    run_ok(*train_args(corpus, tmp_path / "run", *wsd, "--steps", "10"))
    assert json.loads((tmp_path / "run" / "stable" / "meta.json").read_text())["step"] == 6
    r = run_ok(*train_args(corpus, tmp_path / "run", *wsd, "--steps", "15", "--resume_from",
                           str(tmp_path / "run" / "stable")))
    assert "at step 6" in r.stdout
    got, want = read_log(tmp_path / "run" / "log.jsonl"), read_log(tmp_path / "long" / "log.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 16))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]
    assert [got[s]["lr"] for s in want] == [want[s]["lr"] for s in want]
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_000005", "step_000010", "step_000015"]
    assert not list((tmp_path / "run").glob("replaced_*"))  # the old run's later steps went once it finished
    one_line_error(run_script("train.py", *train_args(corpus, tmp_path / "run", *wsd, "--steps", "20",
                                                      "--resume_from", str(tmp_path / "long" / "stable")),
                              env=ONE_THREAD), "is not a checkpoint of the run")


@pytest.fixture(scope="module")
def small_data(corpus, tmp_path_factory) -> Path:
    """About 4,000 training tokens of the corpus: a pass every 31 FOLDER_RUN steps."""
    data = tmp_path_factory.mktemp("small_data") / "data"
    r = run_script("tokenize_data.py", "--tokenizer_path", str(corpus.tokenizer), "--data_file_name", str(data),
                   "--max_tokens", "4000", "--val_tokens", "300", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return data


@pytest.mark.slow
def test_weight_decay_follows_the_passes_and_wsd_still_extends_exactly(corpus, small_data: Path,
                                                                         tmp_path: Path) -> None:
    """--muon_wd_per_epoch and --wd_per_epoch: the same steps as without them until one pass over the training
    data is done, then other losses; the checkpoint's Muon and AdamW groups hold the decay of the passes made
    (counted from the data folder's metadata). It depends on the tokens seen, not on --steps, so a finished WSD run
    extended from its stable checkpoint still equals the longer run."""
    from checkpoint import OPTIMIZER_FILE, safe_torch_load
    from data_loader import read_metadata

    train_tokens = sum(s["tokens"] for s in read_metadata(small_data)["shards"] if s["split"] == "train")
    per_pass = train_tokens / 128                 # FOLDER_RUN's steps per pass
    assert 20 < per_pass < 40
    data = ["--data_file_name", str(small_data)]
    wsd = [*FOLDER_RUN, *data, "--optimizer", "muon", "--lr_schedule", "wsd", "--decay_frac", "0.3", "--save_rate",
           "10", "--muon_weight_decay", "0.01", "--muon_wd_per_epoch", "2", "--weight_decay", "0.1",
           "--wd_per_epoch", "1"]
    r = run_ok(*train_args(corpus, tmp_path / "long", *wsd, "--steps", "70"))
    assert f"{train_tokens:,} training tokens, {70 * 128 / train_tokens:.2f} passes in 70 steps" in r.stdout
    run_ok(*train_args(corpus, tmp_path / "none", *wsd, "--steps", "70", "--muon_wd_per_epoch", "0",
                       "--wd_per_epoch", "0"))
    long, none = read_log(tmp_path / "long" / "log.jsonl"), read_log(tmp_path / "none" / "log.jsonl")
    first_decayed = math.floor(per_pass) + 2  # the first step after a whole pass, plus the step it changes
    assert [long[s]["loss"] for s in range(1, first_decayed)] == [none[s]["loss"] for s in range(1, first_decayed)]
    assert long[70]["loss"] != none[70]["loss"]
    groups = safe_torch_load(tmp_path / "long" / "step_000070" / OPTIMIZER_FILE)["param_groups"]
    muon = [g for g in groups if "betas" not in g]
    want = 0.01 + 2 * (69 * 128 / train_tokens - 1)    # the passes made before step 70
    assert muon and [g["weight_decay"] for g in muon] == pytest.approx([want] * len(muon))
    adamw = [g["weight_decay"] for g in groups if g.get("repeat_decay")]     # the head and the router
    assert adamw == pytest.approx([0.1 + 1 * (69 * 128 / train_tokens - 1)] * len(adamw)) and adamw

    run_ok(*train_args(corpus, tmp_path / "run", *wsd, "--steps", "50"))  # stable until step 35: past a pass
    run_ok(*train_args(corpus, tmp_path / "run", *wsd, "--steps", "70", "--resume_from",
                       str(tmp_path / "run" / "stable")))
    got = read_log(tmp_path / "run" / "log.jsonl")
    assert [got[s]["loss"] for s in long] == [long[s]["loss"] for s in long]


def test_shuffled_items_ranks_split_each_epoch_and_resume_exactly():
    """DPO's pairs and the tasks' problems are read through ShuffledItems: every epoch is a seeded permutation,
    the ranks take disjoint strided shares of it, and a source restored from state_dict continues identically."""
    import random

    from train import ShuffledItems

    n, batch, world = 11, 3, 2
    sources = [ShuffledItems(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    drawn = [[i for _ in range(4) for i in s.next_indices()] for s in sources]    # 12 each: over an epoch boundary
    # naive reference: rank r takes order[r], order[r + w], ... of random.Random(seed + epoch)'s permutation
    expected = []
    for r in range(world):
        out, epoch = [], 0
        while len(out) < 12:
            order = list(range(n))
            random.Random(5 + epoch).shuffle(order)
            out += order[r::world]
            epoch += 1
        expected.append(out[:12])
    assert drawn == expected
    first_epoch = sorted(expected[0][:6] + expected[1][:5])
    assert first_epoch == list(range(n))        # one epoch: each example once across the ranks
    resumed = ShuffledItems(n, batch, seed=5, rank=1, world_size=world)
    resumed.load_state_dict(sources[1].state_dict())
    assert [resumed.next_indices() for _ in range(5)] == [sources[1].next_indices() for _ in range(5)]
