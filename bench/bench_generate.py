"""Decode speed, peak memory and KV-cache size: our generate() (latent MLA cache, absorbed decode) vs HF
transformers' DeepseekV3ForCausalLM.generate on the same weights, greedy, in one run.

    python bench/bench_generate.py                       # small-moe, contexts 128 and 1024, batch 1 and 8
    python bench/bench_generate.py --compile             # also our decode step under torch.compile (inductor)
    python bench/bench_generate.py --contexts 128 --batches 1 --new_tokens 64

The model is the "small-moe" preset (dim 256, 4 layers, 8 heads, kv_lora_rank 32, rope 16, nope/v 32, 8 routed
experts top-2 + 1 shared, vocab 32768, sigmoid router) with random weights; HF's model gets the same weights through
hf_interop's export, so both compute the same function: the greedy tokens are compared as a check of the mapping.

Also printed: the physical limit of batch-1 decoding (bytes of weights one token reads, fp32, divided by the memory
bandwidth measured here with a large copy) and the cache bytes per token: ours, HF's, and multi-head attention of
the same width.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import resolve_device  # noqa: E402
from config import ModelArgs, model_args_from_preset  # noqa: E402
from generate import generate, make_decode_step  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Memory measurement


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory added during a block: on CUDA the allocator's peak; on CPU the peak resident set size (VmHWM,
    reset through /proc/self/clear_refs) minus the resident size before the block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.peak_mb = (_rss_kb("VmHWM") * 1024 - self.base) / 2**20
        return False


def measure_bandwidth(device: torch.device, mbytes: int = 512, reps: int = 6) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Weights touched per decode token


def active_weight_bytes(model: torch.nn.Module, args: ModelArgs) -> tuple[int, int]:
    """(bytes, params) of the weights one decode token reads at batch 1: every matrix except the embedding table
    (one row) and the routed experts (only n_activated of n_routed), LM head included."""
    total_bytes = total_params = 0
    seen = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        if name == "embed.weight" and not args.tie_embeddings:
            n = args.dim
        elif ".experts." in name and ".shared_experts." not in name:
            n = t.numel() * args.n_activated_experts // args.n_routed_experts
        else:
            n = t.numel()
        total_params += n
        total_bytes += n * t.element_size()
    return total_bytes, total_params


# ----------------------------------------------------------------------------------------------------------------
# HF model with the same weights


def build_hf(model: torch.nn.Module, args: ModelArgs, device: torch.device, tmp_dir: Path):
    """HF DeepseekV3ForCausalLM holding our weights, exported by hf_interop.write_hf_folder and read back with
    from_pretrained (the real export path)."""
    import hf_interop
    from transformers import DeepseekV3ForCausalLM

    folder = hf_interop.write_hf_folder(tmp_dir / "hf", args, model.state_dict(), overwrite=True)
    hf = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    return hf.to(device).eval(), "hf_interop.write_hf_folder + from_pretrained"


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Runs


def run_ours(model, prompts, new_tokens, decode_step=None):
    timings: dict = {}
    out = generate(model, prompts, new_tokens, temperature=0.0, decode_step=decode_step, timings=timings)
    return out, timings["decode_s"] / timings["decode_steps"], timings["prefill_s"], model.cache_bytes()


class _TimingStreamer:
    """Records when generate hands over each new column (the first call is the prompt itself)."""

    def __init__(self):
        self.times: list[float] = []
        self.device = None

    def put(self, value):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def run_hf(hf, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    streamer = _TimingStreamer()
    streamer.device = device
    _sync(device)
    t0 = time.perf_counter()
    o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0, use_cache=True, return_dict_in_generate=True,
                    streamer=streamer)
    _sync(device)
    t_end = time.perf_counter()
    seqs = o.sequences[:, ids.shape[1]:].tolist()
    first = streamer.times[1]            # the first new token is out: prefill done
    return seqs, (t_end - first) / (new_tokens - 1), first - t0, hf_cache_bytes(o.past_key_values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--score_func", default="sigmoid", choices=("sigmoid", "softmax"),
                    help="router scoring; HF's DeepseekV3 only has sigmoid, so sigmoid makes both compute the same")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5,
                    help="timed rounds per case after a warm-up; each round runs every implementation once (the "
                         "order alternating), and the ratio to HF is the median of the per-round ratios")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time our decode step under torch.compile")
    ap.add_argument("--no_hf", action="store_true", help="skip HF (our numbers only)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)

    from model import Transformer

    max_ctx = max(a.contexts) + a.new_tokens
    args = model_args_from_preset(a.preset, max_seq_len=max(max_ctx, 256), score_func=a.score_func,
                                  bias_update_speed=0.0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    model.eval()
    with torch.no_grad():  # a random, non-zero balancing bias so the mapping of the bias is exercised too
        for name, buf in model.named_buffers():
            if name.endswith("ffn.gate.bias"):
                buf.copy_(torch.randn_like(buf) * 0.01)

    bw = measure_bandwidth(device)
    wbytes, wparams = active_weight_bytes(model, args)
    limit_tps = bw / wbytes
    print(f"load average before: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}; preset {a.preset} "
          f"(score_func {a.score_func}): {model.num_params():,} params, {wparams:,} read per decode token "
          f"incl. LM head")
    print(f"memory bandwidth (copy): {bw / 1e9:.1f} GB/s; weights read per decode token (fp32): "
          f"{wbytes / 2**20:.1f} MB -> physical limit at batch 1: {limit_tps:,.0f} tok/s "
          f"({wbytes / bw * 1e3:.2f} ms/token)")

    hf = None
    if not a.no_hf:
        tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
        try:
            hf, how = build_hf(model, args, device, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"HF DeepseekV3ForCausalLM (sdpa) with the same weights via {how}")

    step_compiled = make_decode_step(model, True) if a.compile else None
    gen = torch.Generator().manual_seed(1)
    rows = []
    cache_rows = []
    for ctx in a.contexts:
        for bsz in a.batches:
            prompts = torch.randint(3, args.vocab_size, (bsz, ctx), generator=gen).tolist()
            impls = [("ours", lambda: run_ours(model, prompts, a.new_tokens))]
            if step_compiled is not None:
                impls.append(("ours+compile", lambda: run_ours(model, prompts, a.new_tokens, step_compiled)))
            if hf is not None:
                impls.append(("HF", lambda: run_hf(hf, prompts, a.new_tokens, device)))
            results = {}
            for name, fn in impls:
                fn()  # warm-up (and compilation)
                with PeakMemory(device) as mem:
                    toks, _, _, cache_b = fn()
                results[name] = dict(toks=toks, steps=[], prefills=[], mem=mem.peak_mb, cache=cache_b)
            for r in range(a.rounds):  # interleaved rounds, order alternating: a busy machine slows both sides
                for name, fn in (impls if r % 2 == 0 else impls[::-1]):
                    _, s_per_step, prefill_s, _ = fn()
                    results[name]["steps"].append(s_per_step)
                    results[name]["prefills"].append(prefill_s)
            agree = ""
            if "HF" in results:
                ours_t, hf_t = results["ours"]["toks"], results["HF"]["toks"]
                same = sum(x == y for r1, r2 in zip(ours_t, hf_t) for x, y in zip(r1, r2))
                agree = f"{same}/{sum(len(r) for r in ours_t)}"
            for name, r in results.items():
                step = statistics.median(r["steps"])
                ratios = [hf / ours for hf, ours in zip(results["HF"]["steps"], r["steps"])] \
                    if "HF" in results else [float("nan")]
                rows.append((ctx, bsz, name, step * 1e3, bsz / step, statistics.median(ratios), min(ratios),
                             max(ratios), statistics.median(r["prefills"]) * 1e3, r["mem"], r["cache"] / 2**20,
                             agree if name == "ours" else ""))
            cache_rows.append((ctx, bsz, results))
            print(f"  done: context {ctx}, batch {bsz}", flush=True)

    print()
    print(f"decode, greedy, {a.new_tokens} new tokens after a random prompt of `context` tokens; median of "
          f"{a.rounds} interleaved rounds (wall time; tok/s = batch / time per step; x HF = median of the per-round "
          f"ratios of decode speed, [range]; tokens = greedy tokens equal to HF's)")
    head = f"{'context':>7} {'batch':>5} {'impl':<13} {'ms/step':>8} {'tok/s':>9} {'x HF':>6} {'[range]':>13} " \
           f"{'prefill ms':>10} {'peak MB':>8} {'cache MB':>8} {'tokens':>8}"
    print(head)
    print("-" * len(head))
    for ctx, bsz, name, ms, tps, ratio, low, high, pre_ms, mem, cache_mb, agree in rows:
        print(f"{ctx:>7} {bsz:>5} {name:<13} {ms:>8.2f} {tps:>9.1f} {ratio:>6.2f} {f'[{low:.2f}-{high:.2f}]':>13} "
              f"{pre_ms:>10.1f} {mem:>8.1f} {cache_mb:>8.2f} {agree:>8}")
    print(f"physical limit at batch 1 (weights/bandwidth): {limit_tps:,.0f} tok/s = {wbytes / bw * 1e3:.2f} ms/step")
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    # KV cache per token and layer, in bytes (fp32)
    el = 4
    ours_pt = (args.kv_lora_rank + args.qk_rope_head_dim) * el
    mha_width = 2 * args.dim * el
    mha_heads = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) * el
    print()
    print("KV cache per token per layer (fp32): "
          f"ours (latent {args.kv_lora_rank} + rope key {args.qk_rope_head_dim}) {ours_pt} B | "
          f"MHA of the model width (K,V: 2 x {args.dim}) {mha_width} B = {mha_width / ours_pt:.1f}x ours | "
          f"MHA with MLA's head sizes ({args.n_heads} heads x (qk {args.qk_nope_head_dim + args.qk_rope_head_dim}"
          f" + v {args.v_head_dim})) {mha_heads} B = {mha_heads / ours_pt:.1f}x ours")
    for ctx, bsz, results in cache_rows:
        tokens_ours = bsz * (ctx + a.new_tokens)
        line = f"  context {ctx:>5} batch {bsz}: ours {results['ours']['cache'] / 2**20:7.2f} MB " \
               f"({results['ours']['cache'] / tokens_ours / args.n_layers:.0f} B/token/layer)"
        if "HF" in results:
            tokens_hf = bsz * (ctx + a.new_tokens - 1)
            line += f" | HF {results['HF']['cache'] / 2**20:7.2f} MB " \
                    f"({results['HF']['cache'] / tokens_hf / args.n_layers:.0f} B/token/layer)"
        line += f" | MHA(width) {tokens_ours * args.n_layers * mha_width / 2**20:7.2f} MB"
        print(line)

    batch1 = [ratio for ctx, bsz, name, _, _, ratio, *_ in rows if bsz == 1 and name == "ours"]
    if batch1:
        print(f"\ntargets: batch-1 decode >= 3x HF: {min(batch1):.2f}x at worst "
              f"({'met' if min(batch1) >= 3 else 'NOT met'}); cache <= HF's and >= 10x smaller than MHA of the "
              f"model width: {mha_width / ours_pt:.1f}x ({'met' if mha_width / ours_pt >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
