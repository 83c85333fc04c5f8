"""Training throughput on CPU: our Transformer vs HF transformers' DeepseekV3ForCausalLM built with the same
architecture, trained with the same optimizer (AdamW, weight decay on matrices) on the same batch, fp32, in one run.

    python bench/bench_train.py                              # tiny (vocab 4096) and small-moe (vocab 32768), 8 x 256
    python bench/bench_train.py --models small-moe --seconds 20
    python bench/bench_train.py --compile                    # also our model under torch.compile (inductor)

Each step is forward + cross-entropy + backward + AdamW step + zero_grad (+ the MoE balancing-bias update for ours).
After warm-up steps the two implementations are timed in alternating rounds (so machine noise hits both alike) and
the median step time is reported as tokens/s. MFU = training FLOPs per token (our model's flops_per_token: 6 x
active parameters + attention, the same architecture for both) x tokens/s / the fp32 matmul rate measured in this
run (n=1024, best of several measurements spread over the run). HF's router always scores with a sigmoid, so ours
uses score_func=sigmoid here as well; HF uses its default attention (sdpa) and experts implementation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import ModelArgs, TrainConfig, model_args_from_preset  # noqa: E402
from train import build_optimizer, measure_matmul_flops  # noqa: E402

VOCAB = {"tiny": 4096}  # the tiny preset is meant for a 4k vocabulary; other presets use ModelArgs' 32768


def hf_config(args: ModelArgs):
    """DeepseekV3Config with our architecture."""
    from transformers import DeepseekV3Config

    n_moe = max(args.n_layers - args.n_dense_layers, 0)
    config = DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        n_routed_experts=args.n_routed_experts, n_shared_experts=args.n_shared_experts,
        num_experts_per_tok=args.n_activated_experts,
        first_k_dense_replace=args.n_dense_layers if n_moe else args.n_layers,
        q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim, qk_nope_head_dim=args.qk_nope_head_dim,
        v_head_dim=args.v_head_dim, head_dim=args.qk_rope_head_dim, n_group=max(args.n_expert_groups, 1),
        topk_group=max(args.n_limited_groups, 1), routed_scaling_factor=args.route_scale, norm_topk_prob=True,
        max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, initializer_range=args.init_std, attention_bias=False,
        use_cache=False)
    return config


class Runner:
    """One model + optimizer + a fixed batch; step() runs one full training step."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, batch, after_step=None) -> None:
        self.name, self.model, self.loss_fn, self.batch, self.after_step = name, model, loss_fn, batch, after_step
        self.optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1, optimizer="adamw"), torch.device("cpu"))
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.loss_fn(*self.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        self.loss = loss.item()
        return time.perf_counter() - t0


def build_runners(preset: str, batch: int, seq_len: int, compile_ours: bool) -> tuple[list[Runner], ModelArgs]:
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
    ours.train()
    runners = [Runner("ours", ours, lambda a, b: ours(a, b), (x, y), ours.update_balance_bias)]
    if compile_ours:
        torch.manual_seed(0)
        raw = Transformer(args)
        raw.init_weights()
        raw.train()
        compiled = torch.compile(raw)
        runners.append(Runner("ours+compile", raw, lambda a, b: compiled(a, b), (x, y), raw.update_balance_bias))

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_config(args))
    hf.train()
    for module in hf.modules():  # make sure the router is random (an all-zero router sends every token to 2 experts)
        if type(module).__name__.endswith("TopkRouter") and module.weight.abs().max() == 0:
            torch.nn.init.normal_(module.weight, std=args.init_std)

    def hf_loss(a, b):
        logits = hf(input_ids=a, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), b.reshape(-1))

    runners.append(Runner("HF DeepseekV3", hf, hf_loss, (x, y)))
    experts_impl = getattr(hf.config, "_experts_implementation", None)
    runners[-1].detail = f"attn={hf.config._attn_implementation}, experts={experts_impl}"
    return runners, args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small-moe"], help="presets to benchmark")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per implementation and model")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    rates = [measure_matmul_flops(torch.device("cpu"), seconds=1.0)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul (n=1024): "
          f"{rates[0] / 1e9:.0f} GFLOP/s; batch {opts.batch} x {opts.seq_len}, fp32, AdamW", flush=True)
    results = []
    for preset in opts.models:
        runners, args = build_runners(preset, opts.batch, opts.seq_len, opts.compile)
        probe = runners[0].model
        flops_per_token = probe.flops_per_token(opts.seq_len)
        params, active = probe.num_params(), probe.num_params(active=True)
        total = sum(p.numel() for p in probe.parameters())
        print(f"\n{preset}: {total / 1e6:.1f}M parameters ({params / 1e6:.1f}M without the embedding, "
              f"{active / 1e6:.1f}M active), vocab {args.vocab_size}, {flops_per_token / 1e6:.1f} MFLOP/token",
              flush=True)
        for r in runners:
            for _ in range(opts.warmup):
                r.step()
        # time each implementation for about the same wall time, alternating rounds
        per_round = opts.seconds / opts.rounds
        for _ in range(opts.rounds):
            for r in runners:
                start = time.perf_counter()
                while True:
                    r.times.append(r.step())
                    if time.perf_counter() - start >= per_round and len(r.times) >= 1:
                        break
            rates.append(measure_matmul_flops(torch.device("cpu"), seconds=0.3))
        tokens = opts.batch * opts.seq_len
        for r in runners:
            med = statistics.median(r.times)
            results.append((preset, r, tokens / med, med, flops_per_token))
            print(f"  {r.name:<14} {len(r.times):>3} steps, median {med * 1e3:7.1f} ms/step, loss {r.loss:.3f}"
                  + (f"  ({r.detail})" if hasattr(r, "detail") else ""), flush=True)
        del runners

    peak = max(rates)
    print(f"\nfp32 matmul rate: best {peak / 1e9:.0f} GFLOP/s of {len(rates)} measurements "
          f"(min {min(rates) / 1e9:.0f})\n")
    header = f"{'model':<10} {'implementation':<15} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'vs HF':>7}"
    print(header)
    print("-" * len(header))
    for preset in opts.models:
        rows = [row for row in results if row[0] == preset]
        hf_tps = next(tps for p, r, tps, _, _ in rows if r.name.startswith("HF"))
        for _, r, tps, med, fpt in rows:
            mfu = fpt * tps / peak
            print(f"{preset:<10} {r.name:<15} {med * 1e3:>9.1f} {tps:>10,.0f} {100 * mfu:>6.1f}% "
                  f"{tps / hf_tps:>6.2f}x")
    print("\ntargets: ours >= 1.25x HF tokens/s; MFU >= 60% of the measured fp32 matmul rate")


if __name__ == "__main__":
    main()
