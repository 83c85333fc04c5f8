"""Training throughput on CPU: our Transformer vs HF transformers' DeepseekV3ForCausalLM holding the same weights,
trained with the same optimizer (AdamW, weight decay on matrices) on the same batch, fp32, in one process.

    python bench/bench_train.py                              # tiny (vocab 4096) and small-moe (vocab 32768), 8 x 256
    python bench/bench_train.py --models small-moe --rounds 9
    python bench/bench_train.py --compile                    # also our model under torch.compile (inductor)

Both sides start from the same weights: ours are initialised, exported with hf_interop.write_hf_folder and read
back by DeepseekV3ForCausalLM.from_pretrained (the first losses are printed side by side as a check). Each step is
forward + cross-entropy + backward + gradient clipping + AdamW step + zero_grad (+ the MoE balancing-bias update
for ours). After warm-up steps the implementations run in interleaved rounds A B A B ..., the same number of steps
each per round; every round gives a ratio of median step times (HF / ours), and the result is the median of these
per-round ratios with their range, so that load from other processes on a shared machine hits both sides alike.

Per step it also reports the process's CPU time (user and system, all threads) and its minor page faults times the
page size: the fresh memory the step touched (memory malloc returned to the OS and got back zero-filled). Load
averages are printed before and after. MFU = training FLOPs per token (our flops_per_token: 6 x active parameters
+ attention, the same architecture for both) x tokens/s / the best fp32 matmul rate measured in this run.
HF's router always scores with a sigmoid, so ours uses score_func=sigmoid as well; HF uses sdpa attention and its
default experts implementation.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import ModelArgs, TrainConfig, model_args_from_preset  # noqa: E402
from optim import build_optimizer  # noqa: E402
from train import measure_matmul_flops  # noqa: E402

VOCAB = {"tiny": 4096}  # the tiny preset is meant for a 4k vocabulary; other presets use ModelArgs' 32768
PAGE = os.sysconf("SC_PAGE_SIZE")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class Runner:
    """One model + optimizer + a fixed batch; step() runs one full training step and records its wall time, the
    process CPU time and the minor page faults it took."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, batch, after_step=None) -> None:
        self.name, self.model, self.loss_fn, self.batch, self.after_step = name, model, loss_fn, batch, after_step
        self.optimizer = build_optimizer(model, TrainConfig(lr=1e-4, min_lr=1e-5, weight_decay=0.1, optimizer="adamw", embed_lr=0), torch.device("cpu"))
        self.times: list[float] = []          # wall seconds per timed step
        self.cpu: list[float] = []            # user + system CPU seconds per timed step
        self.user: list[float] = []
        self.faults: list[int] = []           # minor page faults per timed step
        self.losses: list[float] = []
        self.detail = ""

    def step(self, record: bool = True) -> float:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        loss = self.loss_fn(*self.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        self.losses.append(loss.item())
        elapsed = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if record:
            self.times.append(elapsed)
            self.user.append(r1.ru_utime - r0.ru_utime)
            self.cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            self.faults.append(r1.ru_minflt - r0.ru_minflt)
        return elapsed


def build_runners(preset: str, batch: int, seq_len: int, compile_ours: bool, tmp: Path) -> tuple[list[Runner], ModelArgs]:
    import hf_interop
    from model import Transformer
    from transformers import DeepseekV3ForCausalLM

    args = model_args_from_preset(preset, vocab_size=VOCAB.get(preset, 32768), score_func="sigmoid",
                                  max_seq_len=max(seq_len, model_args_from_preset(preset).max_seq_len))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (batch, seq_len), generator=gen)
    y = torch.randint(0, args.vocab_size, (batch, seq_len), generator=gen)

    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights()
    # the same weights for HF: exported through hf_interop (the per-expert hub layout) and read back by
    # transformers' own loader, before any training step changes ours
    folder = hf_interop.write_hf_folder(tmp / preset, args, ours.state_dict(), overwrite=True)
    hf = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    ours.train()
    hf.train()
    runners = [Runner("ours", ours, lambda a, b: ours(a, b), (x, y), ours.update_balance_bias)]
    if compile_ours:
        raw = Transformer(args)
        raw.load_state_dict(ours.state_dict())
        raw.init_buffers()
        raw.train()
        compiled = torch.compile(raw)
        runners.append(Runner("ours+compile", raw, lambda a, b: compiled(a, b), (x, y), raw.update_balance_bias))

    def hf_loss(a, b):
        logits = hf(input_ids=a, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), b.reshape(-1))

    runners.append(Runner("HF DeepseekV3", hf, hf_loss, (x, y)))
    runners[-1].detail = (f"attn={hf.config._attn_implementation}, "
                          f"experts={getattr(hf.config, '_experts_implementation', None)}")
    return runners, args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small-moe"], help="presets to benchmark")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (at least 5)")
    parser.add_argument("--round_seconds", type=float, default=2.5,
                        help="about this long per implementation per round (sets the steps per round, >= 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    opts = parser.parse_args()
    if opts.rounds < 5:
        parser.error("--rounds must be at least 5")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    rates = [measure_matmul_flops(torch.device("cpu"), seconds=0.5)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average "
          f"{load()} (1/5/15 min); fp32 matmul (n=1024): {rates[0] / 1e9:.0f} GFLOP/s; "
          f"batch {opts.batch} x {opts.seq_len}, fp32, AdamW", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for preset in opts.models:
            runners, args = build_runners(preset, opts.batch, opts.seq_len, opts.compile, Path(tmp))
            probe = runners[0].model
            flops_per_token = probe.flops_per_token(opts.seq_len)
            params, active = probe.num_params(), probe.num_params(active=True)
            total = sum(p.numel() for p in probe.parameters())
            print(f"\n{preset}: {total / 1e6:.1f}M parameters ({params / 1e6:.1f}M without the embedding, "
                  f"{active / 1e6:.1f}M active), vocab {args.vocab_size}, {flops_per_token / 1e6:.1f} MFLOP/token",
                  flush=True)
            warm = max(max(r.step(record=False) for _ in range(opts.warmup)) for r in runners)
            print("  first loss (same weights, same batch): "
                  + ", ".join(f"{r.name} {r.losses[0]:.5f}" for r in runners), flush=True)
            steps = max(2, math.ceil(opts.round_seconds / warm))
            # per round and implementation: HF's median wall and CPU time per step over ours
            ratios = {r.name: ([], []) for r in runners[:-1]}
            hf = runners[-1]
            for i in range(opts.rounds):
                for r in runners:                                  # A B (C) in every round
                    for _ in range(steps):
                        r.step()
                for r in runners[:-1]:
                    ratios[r.name][0].append(statistics.median(hf.times[-steps:]) / statistics.median(r.times[-steps:]))
                    ratios[r.name][1].append(statistics.median(hf.cpu[-steps:]) / statistics.median(r.cpu[-steps:]))
                rates.append(measure_matmul_flops(torch.device("cpu"), seconds=0.2))
                print(f"  round {i + 1}/{opts.rounds}: {steps} steps each, "
                      + ", ".join(f"{r.name} {statistics.median(r.times[-steps:]) * 1e3:.0f} ms" for r in runners)
                      + "; HF/ours wall " + ", ".join(f"{w[-1]:.2f}" for w, _ in ratios.values())
                      + ", CPU " + ", ".join(f"{c[-1]:.2f}" for _, c in ratios.values())
                      + f"; load {load()}", flush=True)
            tokens = opts.batch * opts.seq_len
            for r in runners:
                med = statistics.median(r.times)
                results.append((preset, r, tokens / med, med, flops_per_token, ratios.get(r.name)))
                print(f"  {r.name:<14} {len(r.times):>3} steps, median {med * 1e3:7.1f} ms/step, "
                      f"CPU {statistics.median(r.cpu):.2f} s/step (user {statistics.median(r.user):.2f}), "
                      f"fresh memory {statistics.median(r.faults) * PAGE / 1e6:,.0f} MB/step, "
                      f"loss {r.losses[-1]:.3f}" + (f"  ({r.detail})" if r.detail else ""), flush=True)
            del runners

    peak = max(rates)
    print(f"\nload average at the end {load()}; fp32 matmul rate: best {peak / 1e9:.0f} GFLOP/s of {len(rates)} "
          f"measurements (min {min(rates) / 1e9:.0f})\n")
    header = (f"{'model':<10} {'implementation':<15} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6} {'CPU s':>6} "
              f"{'user s':>6} {'MB/step':>8}  {'vs HF, wall [range]':<21} {'CPU time [range]':<18}")
    print(header)
    print("-" * len(header))
    for preset, r, tps, med, fpt, ratio in results:
        mfu = fpt * tps / peak
        vs = ["1", "1"] if ratio is None else \
            [f"{statistics.median(v):.2f}x [{min(v):.2f}-{max(v):.2f}]" for v in ratio]
        print(f"{preset:<10} {r.name:<15} {med * 1e3:>8.1f} {tps:>9,.0f} {100 * mfu:>5.1f}% "
              f"{statistics.median(r.cpu):>6.2f} {statistics.median(r.user):>6.2f} "
              f"{statistics.median(r.faults) * PAGE / 1e6:>8,.0f}  "
              f"{vs[0]:<21} {vs[1]:<18}")
    print("\nratios: HF's median step time over ours within each interleaved round, then the median of the rounds "
          "[min-max]; CPU time = user + system of this process per step (all threads), user = user only; MB/step = "
          "minor page faults "
          "x page size (fresh memory touched per step)")


if __name__ == "__main__":
    main()
