"""Train the Transformer on token shards: one process (CPU or one GPU) or DistributedDataParallel under torchrun.

    python train.py --model tiny --data_file_name data --tokenizer_path tokenizer --steps 300
    torchrun --nproc_per_node=8 train.py --model moe-500m --dtype bf16 --compile_model
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Every optimizer step consumes --total_batch_size tokens: micro-batches of --batch_size sequences of --seq_len tokens
on each of the world_size ranks, accumulated over grad_accum = total / (batch_size * seq_len * world_size)
micro-steps (gradients are synchronised on the last micro-step only). Rerunning the same command continues from
the latest checkpoint in --save_file_name; SIGINT/SIGTERM finish the current step, save a checkpoint and exit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from common import DTYPES, autocast_context, resolve_device, resolve_dtype
from optim import build_optimizer, lr_at, set_lr
from config import ModelArgs, TrainConfig, UserError, model_args_from_preset, parse_config, run_main

# ----------------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU.
    A plain `python train.py` runs as a single process with no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    return Dist(rank, world_size, local_rank, dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Batch, precision, optimizer, schedule


def plan_batch(total: int, batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; a one-line UserError listing the valid choices when it does not divide."""
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"--batch_size ({batch_size}) and --seq_len ({seq_len}) must be positive")
    micro = batch_size * seq_len * world_size
    if total >= micro and total % micro == 0:
        return total // micro
    lower = max(micro, total // micro * micro)
    choices = sorted({lower, lower + micro} - {total})
    msg = (f"--total_batch_size {total} is not a positive multiple of batch_size*seq_len*world_size = "
           f"{batch_size}*{seq_len}*{world_size} = {micro}; valid choices: --total_batch_size "
           f"{' or '.join(map(str, choices))} (any multiple of {micro})")
    per_seq = seq_len * world_size
    if total > 0 and total % per_seq == 0:
        sequences = total // per_seq
        valid = [b for b in range(1, sequences + 1) if sequences % b == 0]
        shown = valid if len(valid) <= 12 else valid[:6] + ["..."] + valid[-5:]
        msg += f", or --batch_size one of {', '.join(map(str, shown))}"
    raise UserError(msg)


# ----------------------------------------------------------------------------------------------------------------
# Throughput accounting

GPU_PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks (no sparsity), per GPU
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
    "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                         seconds: float = 0.3) -> float:
    """FLOP/s of an n x n matmul on this device (does not touch the global RNG)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if iters % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * n**3 * iters / elapsed


def peak_flops(device: torch.device, dtype: str, override: float) -> tuple[float, str]:
    """Per-device peak FLOP/s for MFU: --peak_flops, the GPU table (bf16/fp16), or a measured matmul rate."""
    if override > 0:
        return override, "--peak_flops"
    if device.type == "cuda" and dtype in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} {dtype} peak"
    measure_dtype = DTYPES[dtype] if device.type == "cuda" else torch.float32
    # best of several short trials: on a shared CPU one long trial is dragged down by any other load, and an
    # underestimated peak shows an MFU above 100% once the load goes away
    rate = max(measure_matmul_flops(device, measure_dtype, seconds=0.1) for _ in range(5))
    return rate, f"measured {str(measure_dtype)[6:]} matmul rate, best of 5"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------------------------------------------
# RNG state, signals, MoE balancing


def rng_state(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, saves a checkpoint and exits. A second
    Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                    f"(Ctrl-C again aborts without saving)\n".encode())


def balance_step(model: torch.nn.Module, d: Dist) -> tuple[float, float]:
    """Apply DeepSeek-V3's aux-loss-free bias update after an optimizer step. Under DDP the routed-token counts
    (each MoE layer's `tokens_per_expert` buffer) are summed over ranks first, in one collective, so every rank
    applies the same bias update. Returns the router load max/mean: (mean over MoE layers, max over MoE layers)."""
    layers = model.moe_layers()
    if d.distributed and layers:
        counts = torch.stack([moe.tokens_per_expert for moe in layers])
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        for moe, total in zip(layers, counts):
            moe.tokens_per_expert.copy_(total)
    load = model.expert_load()
    stats = (float("nan"), float("nan"))
    if load.numel() and load.sum() > 0:
        load = load.double()
        ratio = load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-9)  # per MoE layer
        stats = (ratio.mean().item(), ratio.max().item())
    model.update_balance_bias()
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and logging


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, steps: int, d: Dist, dtype: str, show_bar: bool) -> float:
    """Mean validation loss over the first `steps` batches of the split (the same batches every time), averaged
    over ranks."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    batches = loader.eval_batches(steps)
    for x, y in tqdm(batches, total=steps, desc="eval", leave=False, disable=not show_bar, dynamic_ncols=True):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with autocast_context(dtype, d.device):
            total += model(x, y).double()
    all_reduce_sum_(total, d)
    model.train(was_training)
    return total.item() / (steps * d.world_size)


class Logger:
    """One line per step on stdout (rank 0), every record in a JSONL file, TensorBoard scalars when installed."""

    def __init__(self, path: Path | None, tensorboard_dir: Path | None, quiet: bool) -> None:
        self.quiet = quiet
        self.file = None
        self.tb = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard is optional
                self.tb = None

    def print(self, text: str, force: bool = False) -> None:
        if self.file is not None and (force or not self.quiet):
            print(text, flush=True)

    def record(self, kind: str, step: int, **values: Any) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# Setup: tokenizer, data, model


def resolve_model_args(cfg: TrainConfig, overrides: dict[str, Any], data_vocab: int,
                       init_meta: dict[str, Any] | None) -> ModelArgs:
    if init_meta is not None:  # --init_from: the architecture is the stored model's
        stored = ModelArgs.from_dict(init_meta["model_args"])
        conflicts = [f"{k}={v} (stored {getattr(stored, k)})" for k, v in overrides.items()
                     if getattr(stored, k) != v and k != "max_seq_len"]
        if conflicts:
            raise UserError(f"--init_from {cfg.init_from} fixes the architecture; drop the conflicting flags: "
                            + ", ".join(conflicts))
        args = dataclasses.replace(stored, **{k: v for k, v in overrides.items() if k == "max_seq_len"})
    else:
        values = dict(overrides)
        values.setdefault("vocab_size", data_vocab)
        args = model_args_from_preset(cfg.model, **values)
    if args.vocab_size < data_vocab:
        raise UserError(f"--vocab_size {args.vocab_size} is smaller than the tokenizer's vocabulary ({data_vocab}); "
                        f"drop --vocab_size to use the tokenizer's")
    return args


def check_data_folder(path: str) -> None:
    data = Path(path)
    if not data.is_dir():
        raise UserError(f"data folder '{path}' not found; create it with tokenize_data.py --data_file_name {path} "
                        f"or point --data_file_name at an existing one")


def build_model(args: ModelArgs, device: torch.device) -> torch.nn.Module:
    from model import Transformer

    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    return model


def resolved_config(cfg: TrainConfig, **resolved: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(cfg), **resolved}


# ----------------------------------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig, overrides: dict[str, Any], d: Dist) -> int:
    import tokenizer as tokenizer_lib
    from data_loader import ShardedLoader, read_metadata

    # --- tokenizer and data: the fingerprints must agree
    check_data_folder(cfg.data_file_name)
    data_meta = read_metadata(cfg.data_file_name)
    tok = tokenizer_lib.load_tokenizer(cfg)
    data_tok = data_meta.get("tokenizer", {})
    tokenizer_lib.check_fingerprint(tok, data_tok.get("fingerprint", ""), f"the data in '{cfg.data_file_name}'")
    tok_meta = tokenizer_lib.recorded_tokenizer(tok)

    # --- resume point and architecture
    root = Path(cfg.save_file_name)
    resume_dir = checkpoint.latest_checkpoint(root) if cfg.resume else None
    init_model, init_meta = None, None
    if resume_dir is not None:
        init_meta = checkpoint.read_meta(resume_dir)
        stored_args = ModelArgs.from_dict(init_meta["model_args"])
        wanted = resolve_model_args(cfg, overrides, tok.vocab_size, None) if not cfg.init_from else stored_args
        if stored_args != wanted:
            diff = [f"{k}: {v} vs {getattr(wanted, k)}" for k, v in stored_args.to_dict().items()
                    if getattr(wanted, k) != v]
            raise UserError(f"the checkpoint '{resume_dir}' has a different architecture ({'; '.join(diff)}); "
                            f"use a new --save_file_name or --resume false to start over")
        args = stored_args
    elif cfg.init_from:
        init_model, init_meta = checkpoint.load_model(cfg.init_from, device="cpu")
        args = resolve_model_args(cfg, overrides, tok.vocab_size, init_meta)
    else:
        args = resolve_model_args(cfg, overrides, tok.vocab_size, None)
    stored_tok = ((init_meta or {}).get("tokenizer") or {}).get("fingerprint")
    if stored_tok:
        where = resume_dir or cfg.init_from
        tokenizer_lib.check_fingerprint(tok, stored_tok, f"the checkpoint '{where}'")

    seq_len = cfg.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise UserError(f"--seq_len {seq_len} exceeds the model's max_seq_len {args.max_seq_len}; "
                        f"pass --max_seq_len {seq_len} too or a smaller --seq_len")
    grad_accum = plan_batch(cfg.total_batch_size, cfg.batch_size, seq_len, d.world_size)
    if cfg.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {cfg.steps})")
    dtype = resolve_dtype(cfg.dtype, d.device)
    if dtype == "bf16" and d.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --dtype fp16 or fp32")

    # --- model, optimizer, state
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    raw = build_model(args, d.device)
    if init_model is not None:
        raw.load_state_dict(init_model.state_dict(), strict=True)
        del init_model
    raw.train()
    optimizer = build_optimizer(raw, cfg, d.device)
    scaler = torch.amp.GradScaler(d.device.type) if dtype == "fp16" else None

    train_loader = ShardedLoader(cfg.data_file_name, "train", cfg.batch_size, seq_len, rank=d.rank,
                                 world_size=d.world_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                 vocab_size=args.vocab_size, tokenizer_fingerprint=tok.fingerprint)
    val_loader = None
    if cfg.eval_rate > 0 and cfg.eval_steps > 0:
        val_loader = ShardedLoader(cfg.data_file_name, "val", cfg.batch_size, seq_len, rank=d.rank,
                                   world_size=d.world_size, shuffle=False, seed=cfg.seed,
                                   vocab_size=args.vocab_size, tokenizer_fingerprint=tok.fingerprint)

    start_step = 0
    if resume_dir is not None:
        _, state = checkpoint.load_train_state(resume_dir, raw, optimizer)
        start_step = int(state["step"])
        same_world = state.get("world_size") == d.world_size
        if not same_world and d.is_main:
            print(f"note: the checkpoint was written by {state.get('world_size')} ranks, this run has "
                  f"{d.world_size}: the data order continues from rank 0's position", flush=True)
        pick = d.rank if same_world else 0
        train_loader.load_state_dict(state["loader"][pick])
        set_rng_state(state["rng"][pick], d.device)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    # --- wrappers: compile, then DDP; checkpoints always come from `raw`
    model = raw
    if cfg.compile_model:
        model = torch.compile(model, backend=cfg.backend)
    eval_model = model
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # buffers are not broadcast: the routed-token counts are per rank until balance_step sums them, and the
        # balancing bias stays identical on every rank because every rank applies the same update
        import inspect
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_buffer_sync)

    # --- logging and throughput
    log_path = Path(cfg.log_file) if cfg.log_file else root / "log.jsonl"
    logger = Logger(log_path if d.is_main else None, root / "tensorboard" if d.is_main else None, cfg.quiet)
    tokens_per_step = cfg.total_batch_size
    flops_per_token = raw.flops_per_token(seq_len)
    peak, peak_source = peak_flops(d.device, dtype, cfg.peak_flops) if d.is_main else (0.0, "")
    run_config = resolved_config(cfg, seq_len=seq_len, dtype=dtype, grad_accum=grad_accum, world_size=d.world_size,
                                 device=str(d.device.type))
    meta = {"model_args": args.to_dict(), "tokenizer": tok_meta, "train_config": run_config}
    if d.is_main:
        logger.print(f"model: {raw.num_params() / 1e6:.2f}M parameters ({raw.num_params(active=True) / 1e6:.2f}M "
                     f"active per token, embedding excluded), preset {cfg.model}, vocab {args.vocab_size}", True)
        logger.print(f"batch: {tokens_per_step} tokens/step = {cfg.batch_size} seqs x {seq_len} tokens x "
                     f"{d.world_size} ranks x {grad_accum} micro-steps | {dtype} on {d.device} | "
                     f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source})", True)
        if resume_dir is not None:
            logger.print(f"resuming from {resume_dir} at step {start_step}", True)
            logger.record("resume", start_step, checkpoint=str(resume_dir))
        elif cfg.init_from:
            logger.print(f"initialised from {cfg.init_from}", True)

    def save(step: int) -> Path | None:
        loaders = gather_objects(train_loader.state_dict(), d)
        rngs = gather_objects(rng_state(d.device), d)
        path = None
        if d.is_main:
            train_state = {"step": step, "lr": lr_at(step, cfg), "loader": loaders, "rng": rngs,
                           "world_size": d.world_size, "scaler": scaler.state_dict() if scaler else None}
            path = checkpoint.save_checkpoint(root, step, raw, optimizer, {**meta, "step": step}, train_state,
                                              keep=cfg.keep_checkpoints)
        if d.distributed:
            dist.barrier()
        return path

    def run_eval(step: int) -> None:
        val_loss = evaluate(eval_model, val_loader, cfg.eval_steps, d, dtype, d.is_main and not cfg.quiet)
        if d.is_main:
            logger.print(f"step {step:>6d} | val loss {val_loss:.4f}", True)
            logger.record("eval", step, val_loss=val_loss)

    if start_step >= cfg.steps:
        logger.print(f"already trained for {start_step} steps (--steps {cfg.steps}); nothing to do", True)
        logger.close()
        return 0

    stop = StopRequest()
    stop.install()
    step_times: list[float] = []
    step = start_step
    exit_code = 0
    last_saved = start_step if resume_dir is not None else -1
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = set_lr(optimizer, step, cfg)  # Muon groups run at --muon_lr
            loss_sum = torch.zeros((), device=d.device)
            for micro in range(grad_accum):
                x, y = train_loader.next_batch()
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                sync = (model.no_sync() if d.distributed and micro < grad_accum - 1 else contextlib.nullcontext())
                with sync:
                    with autocast_context(dtype, d.device):
                        loss = model(x, y) / grad_accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += loss.detach().float()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                       else float("inf"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            load_mean, load_max = balance_step(raw, d)
            # one collective per step: the mean loss over ranks and whether any rank got a stop signal
            stats = torch.stack([loss_sum, torch.tensor(float(stop.signum is not None), device=d.device)])
            all_reduce_sum_(stats, d)
            loss_value = stats[0].item() / d.world_size
            stop_now = stats[1].item() > 0
            dt = time.perf_counter() - t0
            if d.is_main:
                step_times.append(dt)
                recent = step_times[1:][-20:] or step_times  # the first step includes compilation/warm-up
                avg = sum(recent) / len(recent)
                tok_s = tokens_per_step / dt
                mfu = flops_per_token * tok_s / (peak * d.world_size) if peak > 0 else float("nan")
                gnorm = grad_norm.item()
                eta = avg * (cfg.steps - step)
                logger.record("train", step, loss=loss_value, lr=lr, grad_norm=gnorm, tokens_per_s=tok_s,
                              mfu=mfu, router_load_max_mean=load_max, router_load_mean_max_mean=load_mean,
                              step_time=dt)
                if step % max(cfg.log_every, 1) == 0 or step == cfg.steps or step == start_step + 1:
                    router = f" | load max/mean {load_max:.2f}" if math.isfinite(load_max) else ""
                    logger.print(f"step {step:>6d}/{cfg.steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                                 f"gnorm {gnorm:.3f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}%{router} | "
                                 f"ETA {format_duration(eta)}")
            if val_loader is not None and (step % cfg.eval_rate == 0 or step == cfg.steps):
                run_eval(step)
                if d.is_main and peak_source.startswith("measured"):  # the startup rate may have been taken under load
                    peak = max(peak, peak_flops(d.device, dtype, 0.0)[0])
            if step % cfg.save_rate == 0 or step == cfg.steps or stop_now:
                path = save(step)
                last_saved = step
                if d.is_main:
                    logger.print(f"saved {path}", force=stop_now or step == cfg.steps)
            if stop_now:
                signum = stop.signum or signal.SIGTERM
                if d.is_main:
                    logger.print(f"stopped after step {step} on a signal; rerun the same command to resume", True)
                exit_code = 128 + int(signum)
                break
    finally:
        stop.restore()
        logger.close()
    del last_saved
    return exit_code


def main(argv: list[str] | None = None) -> None:
    cfg, overrides = parse_config(TrainConfig, argv, description=__doc__, with_model_args=True)
    d = setup_distributed(cfg.device)
    code = 0
    try:
        code = train(cfg, overrides, d)
    except UserError:
        if d.rank != 0:  # every rank hits the same mistake: report it once
            raise SystemExit(1)
        raise
    finally:
        teardown_distributed()
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    run_main(main)
