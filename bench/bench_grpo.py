"""GRPO on the built-in addition task: held-out exact-match accuracy before and after, on CPU.

    python bench/bench_grpo.py                      # add2, tiny model, the defaults below
    python bench/bench_grpo.py --grpo_steps 300 --task add2 --work_dir bench_grpo_work

The chain, each stage a real run of the project's scripts (subprocesses, so their CPU time is measured as
children's time):
  1. train_tokenizer.py on the built-in corpus (vocab 512; digits are single tokens),
  2. tasks.py: a short SFT of a fresh tiny model on the task's format (answer-only loss),
  3. rl.py: GRPO from the SFT checkpoint (G completions per prompt through the latent KV cache, exact-match
     reward, group-normalised advantages, clipped objective),
  4. the control: the same SFT run for as many more steps as GRPO took instead.
The SFT checkpoint (the baseline) and the GRPO checkpoint are then scored here on the same held-out test problems
(greedy decoding, exact match). Budgets are per-process CPU time (user + system of the stage's process), which the
shared machine's load barely changes; wall time and the load average are printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage(name: str, script: str, *args: str, threads: int) -> tuple[float, float]:
    """Run a project script; returns (CPU seconds, wall seconds). Its output goes to the work folder's log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cpu0, wall0 = children_cpu(), time.perf_counter()
    print(f"[{name}] python {script} {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], env=env, capture_output=True, text=True)
    cpu, wall = children_cpu() - cpu0, time.perf_counter() - wall0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    lines = [line for line in proc.stdout.splitlines() if "test accuracy" in line or "GRPO:" in line]
    for line in lines[-3:]:
        print(f"    {line}")
    print(f"    {cpu:.0f} s CPU, {wall:.0f} s wall, load {os.getloadavg()[0]:.1f}", flush=True)
    return cpu, wall


def held_out_accuracy(run_dir: Path, task: str, tokenizer_dir: Path, problems: int) -> float:
    import torch

    import checkpoint
    import tasks
    import tokenizer as tk

    torch.set_num_threads(1)
    model, meta = checkpoint.load_model(run_dir)
    tok = tk.load_recorded_tokenizer(tk.TokenizerOptions(tokenizer_path=str(tokenizer_dir)), meta.get("tokenizer"),
                                     str(run_dir))
    acc, _ = tasks.accuracy(model, tok, tasks.problems(task, "test")[:problems])
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="add2", choices=("add2", "add3", "reverse"))
    parser.add_argument("--work_dir", default="bench_grpo_work")
    parser.add_argument("--model", default="tiny-dense")
    parser.add_argument("--sft_steps", type=int, default=600)
    parser.add_argument("--grpo_steps", type=int, default=300)
    parser.add_argument("--prompts_per_step", type=int, default=16)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--grpo_lr", type=float, default=3e-4)
    parser.add_argument("--test_problems", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    opts = parser.parse_args()

    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        stage("tokenizer", "train_tokenizer.py", "--vocab_size", "512", "--tokenizer_train_shard_size", "300000",
              "--output_path", str(tok_dir), threads=opts.threads)
    common = ["--model", opts.model, "--seed", str(opts.seed), "--quiet", "--log_every", "50"]
    sft_dir, grpo_dir = work / f"sft_{opts.task}", work / f"grpo_{opts.task}"
    sft_cpu, sft_wall = stage("sft", "tasks.py", "--task", opts.task, "--tokenizer_path", str(tok_dir),
                              "--max_seq_len", "32", "--save_file_name", str(sft_dir), "--steps",
                              str(opts.sft_steps), "--eval_rate", "0", "--resume=False", "--overwrite",
                              *common, threads=opts.threads)
    # the control: the same SFT continued for as many more steps as GRPO takes (same seed and constant learning
    # rate after the warm-up, so its first --sft_steps steps are the baseline's)
    long_dir = work / f"sft_long_{opts.task}"
    long_steps = opts.sft_steps + opts.grpo_steps
    long_cpu, long_wall = stage("sft control", "tasks.py", "--task", opts.task, "--tokenizer_path", str(tok_dir),
                                "--max_seq_len", "32", "--save_file_name", str(long_dir), "--steps", str(long_steps),
                                "--eval_rate", "0", "--resume=False", "--overwrite", *common, threads=opts.threads)
    grpo_cpu, grpo_wall = stage("grpo", "rl.py", "--task", opts.task, "--init_from", str(sft_dir),
                                "--save_file_name", str(grpo_dir), "--steps", str(opts.grpo_steps),
                                "--batch_size", str(opts.prompts_per_step), "--group_size", str(opts.group_size),
                                "--lr", str(opts.grpo_lr), "--min_lr", str(opts.grpo_lr), "--eval_rate", "0",
                                "--resume=False", "--overwrite", *common, threads=opts.threads)
    before = held_out_accuracy(sft_dir, opts.task, tok_dir, opts.test_problems)
    after = held_out_accuracy(grpo_dir, opts.task, tok_dir, opts.test_problems)
    control = held_out_accuracy(long_dir, opts.task, tok_dir, opts.test_problems)
    records = [json.loads(line) for line in (grpo_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    first, last = train[:20], train[-20:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731

    print(f"\n{opts.task}: {opts.test_problems} held-out problems, greedy exact match; model {opts.model}; "
          f"{opts.threads} thread(s); load average now {os.getloadavg()[0]:.1f}")
    print("| stage | steps | CPU s | wall s | held-out exact match |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| SFT (baseline) | {opts.sft_steps} | {sft_cpu:.0f} | {sft_wall:.0f} | {before:.3f} |")
    print(f"| + GRPO | {opts.grpo_steps} | {grpo_cpu:.0f} | {grpo_wall:.0f} | {after:.3f} |")
    print(f"| SFT continued instead (control) | {long_steps} in all | {long_cpu:.0f} | {long_wall:.0f} | "
          f"{control:.3f} |")
    print(f"GRPO / SFT accuracy ratio: {after / max(before, 1e-9):.2f} ({after - before:+.3f} absolute)")
    print(f"GRPO rollouts: {opts.prompts_per_step} prompts x {opts.group_size}; sampled reward "
          f"{mean(first, 'reward'):.3f} (first 20 steps) -> {mean(last, 'reward'):.3f} (last 20); "
          f"generation {mean(train, 'gen_tokens_per_s'):,.0f} tok/s, training "
          f"{mean(train[1:], 'train_tokens_per_s'):,.0f} completion tok/s; "
          f"generation {sum(r['gen_s'] for r in train):.0f} s of {grpo_wall:.0f} s wall")


if __name__ == "__main__":
    main()
