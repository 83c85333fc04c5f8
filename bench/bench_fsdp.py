"""Training throughput of FSDP2 (parallel.apply_fsdp) against DDP at 2 CPU ranks (gloo), same model, same batches.

    python bench/bench_fsdp.py                         # tiny (vocab 4096), 2 ranks x 4 x 256 tokens per step
    python bench/bench_fsdp.py --model small-moe --rounds 5

Both ranks hold a DDP replica and an FSDP-sharded copy of the same initial model. Rounds alternate DDP steps and
FSDP steps (so load from other processes hits both alike); the reported ratio is the median of the per-round
FSDP / DDP tokens/s ratios. tokens/s counts the global batch (both ranks) over the wall time of a step; the
per-process CPU time (time.process_time, summed over the ranks) is printed too, since on a shared machine it moves
less with other load.

What this says and what it does not: on CPU both modes move data through gloo over loopback TCP and the compute is
slow, so the ratio mostly measures FSDP's extra work per step (all-gathering every block's weights for forward and
again for backward, reduce-scattering gradients, DTensor bookkeeping) against DDP's one bucketed all-reduce. It says
little about GPUs, where NCCL over NVLink/InfiniBand overlaps FSDP's all-gathers with compute and the ratio is
usually close to 1; it is not a substitute for measuring on the target cluster.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from config import model_args_from_preset  # noqa: E402

VOCAB = {"tiny": 4096, "tiny-dense": 4096}


def steps(model, optimizer, batches, world: int, rank: int) -> tuple[float, float]:
    """Run one optimizer step per batch (forward, backward, clip, AdamW, MoE balance with counts summed over
    ranks); (wall seconds, this process's CPU seconds)."""
    import parallel

    raw = model.module if hasattr(model, "module") else model
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    for x, y in batches:
        loss = model(x, y)
        loss.backward()
        parallel.local_value(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layers = raw.moe_layers()
        if layers:
            counts = torch.stack([m.tokens_per_expert for m in layers])
            dist.all_reduce(counts)
            for m, c in zip(layers, counts):
                m.tokens_per_expert.copy_(c)
        raw.update_balance_bias()
    dist.barrier()
    return time.perf_counter() - wall, time.process_time() - cpu


def worker(rank: int, world: int, port: int, opts: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import parallel
    from model import Transformer
    from torch.nn.parallel import DistributedDataParallel as DDP

    args = model_args_from_preset(opts["model"], vocab_size=VOCAB.get(opts["model"], 32768),
                                  max_seq_len=opts["seq_len"])
    torch.manual_seed(0)
    base = Transformer(args)
    base.init_weights()
    ddp_raw = copy.deepcopy(base)
    import inspect
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
    ddp = DDP(ddp_raw, **no_buffer_sync)
    fsdp = parallel.apply_fsdp(copy.deepcopy(base), torch.device("cpu"), "fp32", opts["reshard_after_forward"])
    del base
    opt_ddp = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    opt_fsdp = torch.optim.AdamW(fsdp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, args.vocab_size, (opts["batch_size"], opts["seq_len"] + 1), generator=g)
               for _ in range(opts["steps"])]
    batches = [(b[:, :-1], b[:, 1:]) for b in batches]
    steps(ddp, opt_ddp, batches[:1], world, rank)           # warm-up: allocator, DDP buckets, FSDP lazy init
    steps(fsdp, opt_fsdp, batches[:1], world, rank)
    results = []
    for _ in range(opts["rounds"]):
        d_wall, d_cpu = steps(ddp, opt_ddp, batches, world, rank)
        f_wall, f_cpu = steps(fsdp, opt_fsdp, batches, world, rank)
        times = torch.tensor([d_wall, d_cpu, f_wall, f_cpu], dtype=torch.float64)
        cpus = times.clone()
        dist.all_reduce(times, op=dist.ReduceOp.MAX)           # a step ends when the slowest rank ends
        dist.all_reduce(cpus, op=dist.ReduceOp.SUM)
        results.append({"ddp_wall": times[0].item(), "fsdp_wall": times[2].item(),
                        "ddp_cpu": cpus[1].item(), "fsdp_cpu": cpus[3].item()})
    if rank == 0:
        Path(out).write_text(json.dumps({"results": results, "params": sum(p.numel() for p in ddp_raw.parameters())}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="model preset")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating DDP/FSDP rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--reshard_after_forward", type=lambda s: s.lower() in ("1", "true"), default=True)
    opts = vars(parser.parse_args())
    world = 2
    print(f"{opts['model']}: {world} CPU ranks (gloo) x {opts['batch_size']} x {opts['seq_len']} tokens per step, "
          f"{opts['threads']} thread(s) per rank, {opts['rounds']} rounds of {opts['steps']} steps per mode; "
          f"torch {torch.__version__}; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(world, port, opts, out), nprocs=world, join=True)
        data = json.loads(Path(out).read_text())
    tokens = world * opts["batch_size"] * opts["seq_len"] * opts["steps"]
    rows = data["results"]
    ddp_tps = statistics.median(tokens / r["ddp_wall"] for r in rows)
    fsdp_tps = statistics.median(tokens / r["fsdp_wall"] for r in rows)
    ratio_wall = statistics.median(r["ddp_wall"] / r["fsdp_wall"] for r in rows)
    ratio_cpu = statistics.median(r["ddp_cpu"] / r["fsdp_cpu"] for r in rows)
    print(f"model parameters: {data['params'] / 1e6:.2f}M")
    print("| what | DDP | FSDP | FSDP / DDP |")
    print("| --- | --- | --- | --- |")
    print(f"| tokens/s (wall, both ranks) | {ddp_tps:,.0f} | {fsdp_tps:,.0f} | {ratio_wall:.2f}x |")
    print(f"| tokens per CPU-second (summed over ranks) | "
          f"{statistics.median(tokens / r['ddp_cpu'] for r in rows):,.0f} | "
          f"{statistics.median(tokens / r['fsdp_cpu'] for r in rows):,.0f} | {ratio_cpu:.2f}x |")
    per_round = ", ".join(f"{r['ddp_wall'] / r['fsdp_wall']:.2f}" for r in rows)
    print(f"per-round FSDP/DDP wall ratios: {per_round}; "
          f"load average after: {os.getloadavg()[0]:.1f}")
    print("CPU + gloo over loopback: this ratio says little about GPUs with NCCL over NVLink/InfiniBand, where "
          "FSDP's all-gathers overlap compute.")


if __name__ == "__main__":
    main()
