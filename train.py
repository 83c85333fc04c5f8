"""Pretrain the Transformer on token shards, and the training core that every training script shares.

    python train.py --model tiny --data_file_name data --tokenizer_path tokenizer --steps 300
    torchrun --nproc_per_node=8 train.py --model moe-500m --dtype bf16 --compile_model
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Every optimizer step consumes --total_batch_size tokens: micro-batches of --batch_size sequences of --seq_len tokens
on each of the world_size ranks, accumulated over grad_accum = total / (batch_size * seq_len * world_size)
micro-steps (gradients are synchronised on the last micro-step only). Rerunning the same command continues from
the latest checkpoint in --save_file_name; SIGINT/SIGTERM finish the current step, save a checkpoint and exit.

The core, in the order a run uses it (sft.py, dpo.py and rl.py plug their own Task into the same functions):
    setup_distributed -> prepare (the Run: model, optimizer, run folder, logger) -> restore (resume or --init_from)
    -> wrap (compile, DDP) -> fit (the loop: train_step, evaluate, save) -> teardown_distributed
A Task supplies what differs between stages: its micro-batches (`train_source`), its loss, and its evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import parallel
from common import DTYPES, atomic_write, autocast_context, first_line, resolve_device, resolve_dtype
from config import (ModelArgs, TrainConfig, UserError, make_writable_folder, model_args_from_preset, parse_config,
                    run_main)
from optim import (build_optimizer, decay_start, lr_at, passes_before, repeat_weight_decay, set_schedule,
                   weight_decay_rule)

# ----------------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class DistInfo:
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


def setup_distributed(device: str = "auto", always_group: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, or any world size with always_group:
    FSDP needs one even on a single rank): NCCL on GPUs, gloo on CPU. A plain `python train.py` runs as a single
    process with no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 or always_group:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, d: DistInfo) -> torch.Tensor:
    if d.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, d: DistInfo) -> list[Any]:
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: DistInfo) -> Any:
    """Rank 0's value of obj on every rank (decisions that read the file system are made once, on rank 0)."""
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------
# Batch plan, throughput accounting


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
    """Every RNG's state as tensors and numbers (a checkpoint loads it with torch.load(weights_only=True))."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, np_gauss = np.random.get_state()
    state = {"python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(np_gauss)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
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


def balance_step(model: torch.nn.Module, d: DistInfo) -> tuple[float, float]:
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
# Logging


class Logger:
    """One line per step on stdout (rank 0), every record in a JSONL file, TensorBoard scalars when installed.
    Resuming at step N first drops the records after N, so a log never repeats a step or mixes two runs."""

    def __init__(self, path: Path | None, tensorboard_dir: Path | None, quiet: bool, keep_until: int = 0) -> None:
        self.quiet = quiet
        self.file = None
        self.tb = None
        if path is not None:
            if path.is_dir():
                raise UserError(f"--log_file '{path}' is a folder; pass a file path")
            make_writable_folder(path.parent, "--log_file")
            kept = [line for line in (path.read_text().splitlines() if path.is_file() else [])
                    if keep_until and _record_step(line) <= keep_until]
            atomic_write(path, "".join(line + "\n" for line in kept), "--log_file")
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
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf  # a torn last line from a kill: dropped


# ----------------------------------------------------------------------------------------------------------------
# The run and the task


class BatchSource(Protocol):
    """Where a stage's training micro-batches come from; its position is saved for an exact resume."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShuffledItems:
    """The order in which a stage reads a list of n examples: --batch_size indices at a time, a new seeded order
    every epoch (random.Random(seed + epoch)), rank r of w taking every w-th index from r. The position is the
    state, so a resume continues exactly. Stages subclass it and turn the indices into a batch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_indices(self) -> list[int]:
        picked = []
        while len(picked) < self.batch_size:
            index = self.position * self.world_size + self.rank
            if index >= len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._order(self.epoch)
                continue
            picked.append(self.order[index])
            self.position += 1
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = self._order(self.epoch)


class Task(Protocol):
    """What differs between training stages. loss() returns the loss to minimise and named scalar metrics (both
    averaged over micro-steps and ranks in the log); evaluate() returns named figures for the log (or {})."""

    train_source: BatchSource

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, run: "Run") -> dict[str, float]: ...


@dataclass
class Run:
    """Everything a training loop holds. `raw` is the bare module (checkpoints, evaluation, generation); `model`
    is what the training forward calls (compiled and/or DDP-wrapped by wrap())."""

    cfg: TrainConfig
    dist: DistInfo
    args: ModelArgs
    tokenizer: Any
    raw: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dtype: str
    grad_accum: int
    seq_len: int
    root: Path
    run_id: str | None
    logger: Logger
    meta: dict[str, Any]
    resume_dir: Path | None = None
    pending_dcp: Path | None = None  # a sharded checkpoint restore() leaves to wrap(): read once sharded (FSDP)
    init_state: dict[str, torch.Tensor] | None = None
    start_step: int = 0
    replaces: list[Path] = field(default_factory=list)
    model: torch.nn.Module | None = None
    eval_model: torch.nn.Module | None = None
    closers: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    train_tokens: int = 0  # the training data's size, from a task that knows it: Muon's weight decay follows it

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.total_batch_size


def resolve_model_args(cfg: TrainConfig, overrides: dict[str, Any], vocab_size: int,
                       stored: ModelArgs | None = None) -> ModelArgs:
    """The architecture of a run. A new model: the --model preset, then every ModelArgs flag given, with the
    tokenizer's vocabulary. From stored weights (--init_from or a resume): the stored architecture, where only
    max_seq_len may be changed by a flag and any other conflicting flag is an error."""
    if stored is not None:
        conflicts = [f"{k}={v} (stored {getattr(stored, k)})" for k, v in overrides.items()
                     if getattr(stored, k) != v and k != "max_seq_len"]
        if conflicts:
            raise UserError(f"the stored model ({cfg.init_from or cfg.save_file_name}) fixes the architecture; "
                            f"drop the conflicting flags: " + ", ".join(conflicts))
        args = dataclasses.replace(stored, **{k: v for k, v in overrides.items() if k == "max_seq_len"})
    else:
        args = model_args_from_preset(cfg.model, **{"vocab_size": vocab_size, **overrides})
    if args.vocab_size < vocab_size:
        raise UserError(f"--vocab_size {args.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size}); "
                        f"drop --vocab_size to use the tokenizer's")
    return args


def build_model(args: ModelArgs, device: torch.device) -> torch.nn.Module:
    from model import Transformer

    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    return model


def claim_run_folder(cfg: TrainConfig, d: DistInfo, closers: contextlib.ExitStack) -> tuple[Path | None, list[Path]]:
    """Lock the run folder, clear what killed saves left, and decide where the run starts. The rule:
    - with --resume (the default), the newest intact checkpoint of the run that owns the folder is continued
      (damaged newer ones are named and skipped; --init_from then only applies to a folder without checkpoints);
    - with --resume=False, a folder that already holds a run is refused, unless --overwrite: the old run's
      checkpoints and log are then moved into `replaced_<run id>/` and removed once this run has saved its final
      checkpoint.
    Rank 0 decides (and reports a mistake); every rank gets the decision. Returns (the checkpoint to resume or
    None, what this run replaces)."""
    root = Path(cfg.save_file_name)
    decision: dict[str, Any] = {}
    if d.is_main:
        try:
            make_writable_folder(root, "--save_file_name")
            closers.enter_context(checkpoint.run_lock(root))
            checkpoint.remove_stale_temporaries(root)
            decision = _decide_start(cfg, root)
        except UserError as e:
            decision = {"error": str(e)}
    decision = broadcast_object(decision, d)
    if "error" in decision:
        raise UserError(decision["error"])
    return (Path(decision["resume"]) if decision.get("resume") else None), [Path(p) for p in decision["replaces"]]


def _decide_start(cfg: TrainConfig, root: Path) -> dict[str, Any]:
    owner = checkpoint.read_run(root)
    steps = checkpoint.step_folders(root)
    log = Path(cfg.log_file) if cfg.log_file else root / "log.jsonl"
    if cfg.resume_from:
        return _resume_from(cfg, root, owner, steps)
    if not cfg.resume and (owner or steps):
        if not cfg.overwrite:
            raise UserError(f"'{root}' already holds a run ({len(steps)} checkpoint(s)); rerun without "
                            f"--resume=False to continue it, add --overwrite to replace it, or choose another "
                            f"--save_file_name")
        aside = root / f"replaced_{(owner or {}).get('run_id') or 'run'}"
        aside.mkdir(exist_ok=True)
        for path in [*steps, log, root / BEST, root / STABLE]:
            if path.exists():
                os.replace(path, aside / path.name)
        return {"resume": None, "replaces": [str(aside)]}
    if cfg.resume and (owner or steps):
        found = checkpoint.find_checkpoint(root, (owner or {}).get("run_id"), deep=True)
        return {"resume": str(found) if found else None, "replaces": []}
    if log.is_file() and log.stat().st_size:
        raise UserError(f"--log_file '{log}' already holds another run's log; choose another --log_file")
    return {"resume": None, "replaces": []}


def _resume_from(cfg: TrainConfig, root: Path, owner: dict[str, Any] | None, steps: list[Path]) -> dict[str, Any]:
    """--resume_from: an earlier checkpoint of this run (e.g. the end of a WSD run's stable phase). The run's later
    step folders are set aside, so that a later plain resume never jumps back to them."""
    path = Path(cfg.resume_from)
    problem = checkpoint.verify_checkpoint(path, deep=True) if path.is_dir() else "it does not exist"
    if problem:
        raise UserError(f"--resume_from '{path}' cannot be resumed: {problem}")
    meta = checkpoint.read_meta(path)
    if not owner or meta.get("run_id") != owner.get("run_id"):
        raise UserError(f"--resume_from '{path}' is not a checkpoint of the run in '{root}'; pass one of its "
                        f"checkpoints, or start from other weights with --init_from")
    later = [p for p in steps if int(p.name[len("step_"):]) > int(meta["step"])]
    aside = root / f"replaced_after_{int(meta['step']):06d}"
    if later:
        aside.mkdir(exist_ok=True)
        for p in later:
            os.replace(p, aside / p.name)
    return {"resume": str(path), "replaces": [str(aside)] if later else []}


STABLE = "stable"


def prepare(cfg: TrainConfig, overrides: dict[str, Any], d: DistInfo, tokenizer: Any) -> Run:
    """Build a run: the run folder and its lock, the architecture, the model (initialised, or with --init_from's
    weights kept for restore), the optimizer, the gradient scaler and the logger. Checkpoint state is loaded by
    restore(); wrappers are added by wrap()."""
    import tokenizer as tokenizer_lib

    closers = contextlib.ExitStack()
    root = Path(cfg.save_file_name)
    created = not root.exists()
    try:
        resume_dir, replaces = claim_run_folder(cfg, d, closers)
        init_state, stored_meta, stored = None, None, None
        if resume_dir is not None:
            stored_meta = checkpoint.read_meta(resume_dir)
        elif cfg.init_from:
            from hf_interop import load_any_model  # a HF DeepseekV3 folder or one of our checkpoints

            init_model, stored_meta = load_any_model(cfg.init_from, device="cpu")
            init_state = init_model.state_dict()
        if stored_meta is not None:
            stored = ModelArgs.from_dict(stored_meta["model_args"])
            where = resume_dir or cfg.init_from
            tokenizer_lib.check_fingerprint(tokenizer, (stored_meta.get("tokenizer") or {}).get("fingerprint"),
                                            f"the checkpoint '{where}'")
        if resume_dir is not None and not cfg.init_from:
            wanted = resolve_model_args(cfg, overrides, tokenizer.vocab_size)
            if wanted != stored:
                diff = [f"{k}: {v} vs {getattr(wanted, k)}" for k, v in stored.to_dict().items()
                        if getattr(wanted, k) != v]
                raise UserError(f"the checkpoint '{resume_dir}' has a different architecture ({'; '.join(diff)}); "
                                f"use a new --save_file_name, or --resume=False --overwrite to start over")
        args = resolve_model_args(cfg, overrides, tokenizer.vocab_size, stored)

        seq_len = cfg.seq_len or args.max_seq_len
        if seq_len > args.max_seq_len:
            raise UserError(f"--seq_len {seq_len} exceeds the model's max_seq_len {args.max_seq_len}; "
                            f"pass --max_seq_len {seq_len} too or a smaller --seq_len")
        grad_accum = plan_batch(cfg.total_batch_size, cfg.batch_size, seq_len, d.world_size)
        dtype = resolve_dtype(cfg.dtype, d.device)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        raw = build_model(args, d.device)
        raw.train()
        optimizer = build_optimizer(raw, cfg, d.device)
        scaler = torch.amp.GradScaler(d.device.type) if dtype == "fp16" else None

        run_id = None
        if d.is_main:
            owner = checkpoint.read_run(root)
            if resume_dir is not None:
                run_id = (owner or {}).get("run_id") or checkpoint.read_meta(resume_dir).get("run_id")
            else:
                run_id = checkpoint.new_run(root, {"argv": sys.argv[1:]})
        run_id = broadcast_object(run_id, d)
        start_step = int(stored_meta["step"]) if resume_dir is not None else 0
        log_path = Path(cfg.log_file) if cfg.log_file else root / "log.jsonl"
        logger = Logger(log_path if d.is_main else None, root / "tensorboard" if d.is_main else None, cfg.quiet,
                        keep_until=start_step)
        closers.callback(logger.close)
        run_config = {**dataclasses.asdict(cfg), "seq_len": seq_len, "dtype": dtype, "grad_accum": grad_accum,
                      "world_size": d.world_size, "device": str(d.device.type)}
        meta = {"model_args": args.to_dict(), "tokenizer": tokenizer_lib.recorded_tokenizer(tokenizer),
                "train_config": run_config}
        return Run(cfg=cfg, dist=d, args=args, tokenizer=tokenizer, raw=raw, optimizer=optimizer, scaler=scaler,
                   dtype=dtype, grad_accum=grad_accum, seq_len=seq_len, root=root, run_id=run_id, logger=logger,
                   meta=meta, resume_dir=resume_dir, init_state=init_state, start_step=start_step,
                   replaces=replaces, closers=closers)
    except BaseException:
        closers.close()
        if created and d.is_main:  # a run that never started leaves nothing behind
            shutil.rmtree(root, ignore_errors=True)
        raise


def restore(run: Run, task: Task) -> None:
    """Load what the run starts from: a resumed checkpoint (weights, optimizer, the task's data position, RNG,
    gradient scaler) or --init_from's weights. A resume that cannot be exact is an error, never a silent restart."""
    if run.init_state is not None:
        run.raw.load_state_dict(run.init_state, strict=True)
        run.init_state = None
        return
    if run.resume_dir is None:
        return
    if checkpoint.is_sharded(run.resume_dir):  # DCP: read by any world size, sharded or not
        state = checkpoint.safe_torch_load(run.resume_dir / checkpoint.TRAIN_STATE_FILE)
        if run.cfg.parallel == "fsdp":
            run.pending_dcp = run.resume_dir  # into the shards, once wrap() has made them
        else:
            parallel.load_dcp(run.resume_dir, run.raw, run.optimizer)
        _restore_position(run, task, state)
        return
    weights, optimizer_state, state = checkpoint.load_train_state(run.resume_dir)
    run.raw.load_state_dict(weights, strict=True)
    if optimizer_state is None:
        raise UserError(f"the checkpoint '{run.resume_dir}' has no optimizer state, so the run cannot continue "
                        f"exactly; start a new run from its weights with --init_from {run.resume_dir} "
                        f"--resume=False --overwrite")
    try:
        run.optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in '{run.resume_dir}' does not fit this run's optimizer "
                        f"({first_line(e)}); resume with the same --optimizer, --embed_lr and --head_lr "
                        f"settings") from None
    _restore_position(run, task, state)


def _restore_position(run: Run, task: Task, state: dict[str, Any]) -> None:
    """The task's data position, the RNG states and the gradient scaler of a resumed checkpoint."""
    d = run.dist
    same_world = state.get("world_size") == d.world_size
    if not same_world and d.is_main:
        print(f"note: the checkpoint was written by {state.get('world_size')} ranks, this run has "
              f"{d.world_size}: the data order continues from rank 0's position", flush=True)
    pick = d.rank if same_world else 0
    task.train_source.load_state_dict(state["loader"][pick])
    set_rng_state(state["rng"][pick], d.device)
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])


def wrap(run: Run) -> None:
    """Add the wrappers the training forward runs through: torch.compile, then DDP. Checkpoints always come from
    run.raw; evaluation uses the compiled module without DDP. Under --parallel fsdp, run.raw itself is sharded in
    place instead (see wrap_fsdp)."""
    if run.cfg.parallel == "fsdp":
        wrap_fsdp(run)
        return
    model = run.raw
    if run.cfg.compile_model:
        model = torch.compile(model, backend=run.cfg.backend)
    run.eval_model = model
    d = run.dist
    if d.distributed:
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP
        # buffers are not broadcast: the routed-token counts are per rank until balance_step sums them, and the
        # balancing bias stays identical on every rank because every rank applies the same update
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_buffer_sync)
    run.model = model


def wrap_fsdp(run: Run) -> None:
    """--parallel fsdp: compile each block in place (module names unchanged), fully_shard every block and the root,
    and rebuild the optimizer over the shards. A restored plain checkpoint's optimizer state is carried over into
    the shards; a sharded checkpoint is read straight into them. run.raw, run.model and run.eval_model are then
    the same sharded module (its forward all-gathers each block's weights as it runs)."""
    cfg, d = run.cfg, run.dist
    restored = parallel.full_optimizer_state(run.raw, run.optimizer)
    if cfg.compile_model:
        for block in run.raw.layers:
            block.compile(backend=cfg.backend)
    parallel.apply_fsdp(run.raw, d.device, run.dtype, cfg.reshard_after_forward)
    run.optimizer = build_optimizer(run.raw, cfg, d.device)
    if restored is not None:
        parallel.load_full_optimizer_state(run.raw, run.optimizer, restored)
    if run.pending_dcp is not None:
        parallel.load_dcp(run.pending_dcp, run.raw, run.optimizer)
        run.pending_dcp = None
    run.model = run.eval_model = run.raw


# ----------------------------------------------------------------------------------------------------------------
# One step, evaluation, checkpoint


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0)
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        rows = batch_rows(item)
        if rows:
            return rows
    return 1 if not items else 0


def mean_over_ranks(sums: dict[str, torch.Tensor], count: float, d: DistInfo) -> dict[str, float]:
    """{name: sum over this rank's items} -> {name: mean over every rank's items}, in one collective."""
    names = sorted(sums)
    stacked = torch.stack([sums[n].detach().double().reshape(()) for n in names]
                          + [torch.tensor(float(count), dtype=torch.float64, device=d.device)])
    all_reduce_sum_(stacked, d)
    total = stacked[-1].item()
    return {n: v / max(total, 1e-12) for n, v in zip(names, stacked[:-1].tolist())}


def train_step(run: Run, step: int, task: Task, stop_requested: bool = False) -> tuple[dict[str, float], bool]:
    """One optimizer step: grad_accum micro-batches (gradient sync on the last one only), unscale/clip, step,
    MoE bias update. Returns the metrics averaged over micro-steps and ranks, and whether any rank got a stop
    signal (both in one collective)."""
    cfg, d = run.cfg, run.dist
    lr = set_schedule(run.optimizer, step, cfg, run.train_tokens)
    sums: dict[str, torch.Tensor] = {}
    for micro in range(run.grad_accum):
        batch = to_device(task.train_source.next_batch(), d.device)
        last = micro == run.grad_accum - 1
        sync = run.model.no_sync() if d.distributed and not last and hasattr(run.model, "no_sync") \
            else contextlib.nullcontext()
        if hasattr(run.model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter on the last micro-step only
            run.model.set_requires_gradient_sync(last)
        with sync:
            with autocast_context(run.dtype, d.device):
                loss, metrics = task.loss(run.model, batch)
            scaled = loss / run.grad_accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                               else float("inf"))
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    load_mean, load_max = balance_step(run.raw, d)
    sums["stop"] = torch.tensor(float(stop_requested) * run.grad_accum, device=d.device)
    means = mean_over_ranks(sums, run.grad_accum, d)
    stop = means.pop("stop") > 0
    grad_norm = parallel.local_value(grad_norm)  # FSDP: a DTensor
    return {**means, "lr": lr, "grad_norm": grad_norm.item(), "router_load_max_mean": load_max,
            "router_load_mean_max_mean": load_mean}, stop


@torch.no_grad()
def evaluate_loss(run: Run, batches: Iterable[Any], loss_fn: Any, total: int | None = None) -> dict[str, float]:
    """Mean of loss_fn's loss and metrics over this rank's evaluation batches, averaged over every rank's batches
    (ranks should split one fixed set of batches, so the figure does not depend on the world size)."""
    from tqdm import tqdm

    model = run.eval_model if run.eval_model is not None else run.raw
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    show = run.dist.is_main and not run.cfg.quiet
    for batch in tqdm(batches, total=total, desc="eval", leave=False, disable=not show, dynamic_ncols=True):
        batch = to_device(batch, run.dist.device)
        with autocast_context(run.dtype, run.dist.device):
            loss, metrics = loss_fn(model, batch)
        rows = batch_rows(batch)  # a short last batch counts by its rows
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0) + value.double() * rows
        count += rows
    model.train(was_training)
    if not sums:
        sums = {"loss": torch.zeros((), dtype=torch.float64, device=run.dist.device)}
    return mean_over_ranks(sums, count, run.dist)


def save(run: Run, step: int, task: Task, name: str | None = None, **meta: Any) -> Path | None:
    """A checkpoint of the raw module, the optimizer, every rank's data position and RNG state, as
    <run folder>/step_NNNNNN (or <run folder>/<name>, never pruned), with `meta` added to its meta.json. Rank 0
    writes it (atomically; under FSDP every rank writes its shards); every rank waits for it."""
    d = run.dist
    loaders = gather_objects(task.train_source.state_dict(), d)
    rngs = gather_objects(rng_state(d.device), d)
    path = None
    train_state = {"step": step, "lr": lr_at(step, run.cfg), "loader": loaders, "rng": rngs,
                   "world_size": d.world_size, "scaler": run.scaler.state_dict() if run.scaler else None}
    if parallel.is_fsdp(run.raw):  # every rank writes its shards (DCP); rank 0 the rest, then publishes
        def write_rest(tmp: Path) -> None:  # rank 0, once every rank's shards are in tmp/dcp
            checkpoint.write_step_files(tmp, step, None, None, {**run.meta, **meta}, train_state, run.run_id,
                                        run.tokenizer.source)

        path = parallel.save_sharded_checkpoint(run.root / (name or checkpoint.step_name(step)), run.raw,
                                                run.optimizer, write_rest)
        if d.is_main and name is None:
            checkpoint.prune(run.root, run.run_id, run.cfg.keep_checkpoints)
    elif d.is_main:
        path = checkpoint.save_checkpoint(run.root, step, run.raw, run.optimizer, {**run.meta, **meta}, train_state,
                                          keep=run.cfg.keep_checkpoints, run_id=run.run_id,
                                          tokenizer_file=run.tokenizer.source, name=name)
    if d.distributed:
        dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------------
# The loop


class Throughput:
    """Tokens/s, MFU and ETA for the progress line."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.flops_per_token = run.raw.flops_per_token(run.seq_len)
        self.peak, self.source = peak_flops(run.dist.device, run.dtype, run.cfg.peak_flops) if run.dist.is_main \
            else (0.0, "")
        self.times: list[float] = []

    def update(self, seconds: float, step: int) -> dict[str, float]:
        self.times.append(seconds)
        recent = self.times[1:][-20:] or self.times  # the first step includes compilation/warm-up
        tok_s = self.run.tokens_per_step / seconds
        mfu = self.flops_per_token * tok_s / (self.peak * self.run.dist.world_size) if self.peak > 0 else math.nan
        return {"tokens_per_s": tok_s, "mfu": mfu, "step_time": seconds,
                "eta": sum(recent) / len(recent) * (self.run.cfg.steps - step)}

    def remeasure(self) -> None:
        if self.run.dist.is_main and self.source.startswith("measured"):  # the startup rate may have been taken
            self.peak = max(self.peak, peak_flops(self.run.dist.device, self.run.dtype, 0.0)[0])  # under load


def log_summary(run: Run, speed: Throughput) -> None:
    cfg, d = run.cfg, run.dist
    run.logger.print(f"model: {run.raw.num_params() / 1e6:.2f}M parameters ({run.raw.num_params(active=True) / 1e6:.2f}M "
                     f"active per token, embedding excluded), preset {cfg.model}, vocab {run.args.vocab_size}", True)
    run.logger.print(f"batch: {run.tokens_per_step} tokens/step = {cfg.batch_size} seqs x {run.seq_len} tokens x "
                     f"{d.world_size} ranks x {run.grad_accum} micro-steps | {run.dtype} on {d.device} | "
                     f"peak {speed.peak / 1e9:.0f} GFLOP/s ({speed.source})", True)
    if run.train_tokens:
        passes = passes_before(cfg.steps + 1, cfg, run.train_tokens)
        last = passes_before(cfg.steps, cfg, run.train_tokens)  # made before the last step, whose decay is shown
        parts = [("Muon", True), ("AdamW", False)] if cfg.optimizer == "muon" else [("AdamW", False)]
        wd = " | weight decay, growing after the first pass: " + ", ".join(
            "{} {:g} + {:g} a pass -> {:.3g}".format(name, *weight_decay_rule(cfg, muon),
                                                      repeat_weight_decay(cfg, last, muon))
            for name, muon in parts)
        run.logger.print(f"data: {run.train_tokens:,} training tokens, {passes:.2f} passes in {cfg.steps} steps{wd}",
                         True)
    if run.resume_dir is not None:
        run.logger.print(f"resuming from {run.resume_dir} at step {run.start_step}", True)
        run.logger.record("resume", run.start_step, checkpoint=str(run.resume_dir))
    elif cfg.init_from:
        run.logger.print(f"initialised from {cfg.init_from}", True)


def log_step(run: Run, step: int, metrics: dict[str, float]) -> None:
    eta = metrics.pop("eta")
    run.logger.record("train", step, **metrics)
    if step % run.cfg.log_every == 0 or step == run.cfg.steps or step == run.start_step + 1:
        load = metrics["router_load_max_mean"]
        router = f" | load max/mean {load:.2f}" if math.isfinite(load) else ""
        extra = "".join(f" | {k} {v:.4g}" for k, v in metrics.items() if k not in STANDARD_METRICS)
        run.logger.print(f"step {step:>6d}/{run.cfg.steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                         f"gnorm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:,.0f} tok/s | "
                         f"MFU {100 * metrics['mfu']:.1f}%{router}{extra} | ETA {format_duration(eta)}")


STANDARD_METRICS = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time", "router_load_max_mean",
                    "router_load_mean_max_mean"}


def log_eval(run: Run, step: int, results: dict[str, float]) -> None:
    run.logger.print(f"step {step:>6d} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in results.items()),
                     True)
    run.logger.record("eval", step, **results)


BEST = "best"


def best_val_loss(run: Run) -> float:
    """The validation loss of this run's best checkpoint so far (<run folder>/best), or inf."""
    meta = checkpoint.read_meta(run.root / BEST) if (run.root / BEST / checkpoint.META_FILE).is_file() else {}
    return float(meta["val_loss"]) if meta.get("run_id") == run.run_id and "val_loss" in meta else math.inf


def finish(run: Run) -> None:
    """A run that reached its last step replaces the run it was started over (--overwrite) only now."""
    if run.dist.is_main:
        for path in run.replaces:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def fit(run: Run, task: Task) -> int:
    """Train from run.start_step to cfg.steps: step, log, evaluate every eval_rate steps, checkpoint every
    save_rate steps, at the end and on a stop signal. Returns the process exit code (128 + signal on a stop)."""
    cfg = run.cfg
    speed = Throughput(run)
    if run.dist.is_main:
        log_summary(run, speed)
    if run.start_step >= cfg.steps:
        run.logger.print(f"already trained for {run.start_step} steps (--steps {cfg.steps}); nothing to do", True)
        return 0
    best = best_val_loss(run) if cfg.keep_best else math.inf
    stop = StopRequest()
    stop.install()
    try:
        for step in range(run.start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            metrics, stop_now = train_step(run, step, task, stop.signum is not None)
            if run.dist.is_main:
                log_step(run, step, {**metrics, **speed.update(time.perf_counter() - t0, step)})
            if cfg.eval_rate and (step % cfg.eval_rate == 0 or step == cfg.steps):
                results = task.evaluate(run)
                if results and run.dist.is_main:
                    log_eval(run, step, results)
                if cfg.keep_best and results.get("val_loss", math.inf) < best:
                    best = results["val_loss"]
                    path = save(run, step, task, name=BEST, val_loss=best)
                    run.logger.print(f"new best val loss {best:.4f}: saved {path}")
                speed.remeasure()
            if cfg.lr_schedule == "wsd" and step == decay_start(cfg) < cfg.steps:  # extendable: see --resume_from
                save(run, step, task, name=STABLE)
            if step % cfg.save_rate == 0 or step == cfg.steps or stop_now:
                path = save(run, step, task)
                run.logger.print(f"saved {path}", force=stop_now or step == cfg.steps)
            if stop_now:
                run.logger.print(f"stopped after step {step} on a signal; rerun the same command to resume", True)
                return 128 + int(stop.signum or signal.SIGTERM)
        finish(run)
        return 0
    finally:
        stop.restore()


def run_stage(cfg: TrainConfig, overrides: dict[str, Any], make_task: Any, load_tokenizer: Any) -> None:
    """main() of a training script: distributed setup, tokenizer, prepare, the stage's task, restore, wrap, fit,
    teardown. A user mistake on any rank is reported once (by rank 0); a rank whose peer died reports one line."""
    try:
        parallel.check_setup(cfg.parallel, cfg.dtype, cfg.optimizer)
    except UserError:
        if int(os.environ.get("RANK", "0")) != 0:  # every rank hits the same mistake: report it once
            raise SystemExit(1)
        raise
    d = setup_distributed(cfg.device, always_group=cfg.parallel == "fsdp")
    code = 0
    try:
        tokenizer = load_tokenizer(cfg)
        run = prepare(cfg, overrides, d, tokenizer)
        with run.closers:
            task = make_task(run)
            restore(run, task)
            wrap(run)
            code = fit(run, task)
    except UserError:
        if d.rank != 0:  # every rank hits the same mistake: report it once
            raise SystemExit(1)
        raise
    except (RuntimeError, dist.DistBackendError) as e:
        if d.distributed and any(word in str(e) for word in ("Connection", "peer", "gloo", "NCCL", "closed")):
            raise UserError(f"rank {d.rank}: another rank stopped ({first_line(e, 120)}); its own error is "
                            f"above or in torchrun's summary") from None
        raise
    finally:
        teardown_distributed()
    if code:
        raise SystemExit(code)


# ----------------------------------------------------------------------------------------------------------------
# What the post-training stages share (sft.py, dpo.py, rl.py, tasks.py)


def token_logps(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token [B, T] (0 where the target is -1) from the model's forward: the fused
    per-token NLL (reduction='none') when the model has it, full logits otherwise."""
    if _has_reduction(model):
        return -model(tokens, targets, reduction="none")
    logits = model(tokens)                                                   # [B, T, V]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in fp32 at least
        logits = logits.float()
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets < 0, 0.0)


def _has_reduction(model: torch.nn.Module) -> bool:
    import inspect

    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    inner = getattr(inner, "_orig_mod", inner)
    try:
        return "reduction" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def stored_meta(cfg) -> dict[str, Any] | None:
    """The meta (model_args, tokenizer) of the model this run continues: its own latest checkpoint when resuming,
    else --init_from (a checkpoint or a HF folder); None for a new model."""
    import checkpoint

    root = Path(cfg.save_file_name)
    if cfg.resume and root.is_dir():
        found = checkpoint.find_checkpoint(root, (checkpoint.read_run(root) or {}).get("run_id"))
        if found is not None:
            return checkpoint.read_meta(found)
    if cfg.init_from:
        from hf_interop import load_any_model

        return load_any_model(cfg.init_from)[1]  # memory-mapped weights: the meta is what is read
    return None


def load_stage_tokenizer(cfg):
    """The tokenizer of the starting model (the one it records, checked by fingerprint; a HF folder's
    tokenizer.json), or the options' one."""
    import tokenizer as tokenizer_lib

    if cfg.init_from and not Path(cfg.init_from).exists():
        raise UserError(f"--init_from '{cfg.init_from}' does not exist; pass the pretrained model (a checkpoint "
                        f"folder written by train.py, or a HF model folder)")
    meta = stored_meta(cfg)
    if meta is None:
        return tokenizer_lib.load_tokenizer(cfg)
    return tokenizer_lib.load_recorded_tokenizer(cfg, meta.get("tokenizer"), cfg.init_from or cfg.save_file_name)


def count_batches_in_examples(cfg, overrides: dict[str, Any]) -> None:
    """Preference pairs and prompts are counted in examples, not tokens: --total_batch_size is examples per
    optimizer step (0: one micro-batch of --batch_size per rank). The core plans its micro-steps in tokens, so the
    count is turned into padded tokens of --seq_len (0: the model's max_seq_len), which caps every sequence."""
    import os

    from config import model_args_from_preset

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.seq_len == 0:
        meta = stored_meta(cfg)
        if "max_seq_len" in overrides:
            cfg.seq_len = int(overrides["max_seq_len"])
        elif meta is not None:
            cfg.seq_len = int(meta["model_args"]["max_seq_len"])
        else:
            cfg.seq_len = model_args_from_preset(cfg.model).max_seq_len
    per_step = cfg.total_batch_size or cfg.batch_size * world
    if per_step % (cfg.batch_size * world):
        raise UserError(f"--total_batch_size {per_step} (examples per step) is not a multiple of --batch_size x "
                        f"ranks = {cfg.batch_size * world}; use {cfg.batch_size * world * max(1, per_step // (cfg.batch_size * world))}")
    cfg.examples_per_step = per_step
    cfg.total_batch_size = per_step * cfg.seq_len


def run_example_stage(config_cls: type, make_task: Any, argv: list[str] | None, doc: str) -> None:
    """main() of a stage whose batches are counted in examples (DPO, GRPO, task SFT): parse its options, plan
    its batches in examples, and run it on the core from the starting model's tokenizer."""
    cfg, overrides = parse_config(config_cls, argv, description=doc.split("\n\n")[0], with_model_args=True)
    count_batches_in_examples(cfg, overrides)
    run_stage(cfg, overrides, make_task, load_stage_tokenizer)


def reference_model(run) -> torch.nn.Module:
    """A frozen copy of the --init_from weights (also when resuming: the reference never moves)."""
    from hf_interop import load_any_model

    if not run.cfg.init_from:
        raise UserError(f"{Path(__import__('sys').argv[0]).name} needs --init_from (the model to tune, which is "
                        f"also the reference); resume with the same --init_from")
    model = build_model(run.args, run.dist.device)
    if run.init_state is not None:
        model.load_state_dict(run.init_state, strict=True)
    else:
        loaded, _ = load_any_model(run.cfg.init_from, device="cpu")
        model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Pretraining: next-token prediction over token shards


class PretrainTask:
    """Next-token loss over the shards of --data_file_name; evaluation on the val split (loss and bits per
    byte)."""

    def __init__(self, run: Run) -> None:
        from data_loader import ShardedLoader

        cfg, d = run.cfg, run.dist
        common = dict(rank=d.rank, world_size=d.world_size, seed=cfg.seed, vocab_size=run.args.vocab_size,
                      tokenizer_fingerprint=run.tokenizer.fingerprint)
        self.train_source = ShardedLoader(cfg.data_file_name, "train", cfg.batch_size, run.seq_len,
                                          shuffle=cfg.shuffle, **common)
        run.train_tokens = self.train_source.tokens
        self.val_loader = None
        if cfg.eval_rate > 0 and cfg.eval_steps > 0:
            self.val_loader = ShardedLoader(cfg.data_file_name, "val", cfg.batch_size, run.seq_len, shuffle=False,
                                            **common)

    @staticmethod
    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return model(x, y), {}

    def evaluate(self, run: Run) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        from data_loader import bits_per_byte, bytes_per_token

        # ranks split one fixed set of eval_steps x batch_size windows: the figure does not depend on world size.
        # Under FSDP every forward is a collective, so every rank must run as many: each evaluates the whole set
        steps, d = run.cfg.eval_steps, run.dist
        split = not parallel.is_fsdp(run.raw)
        batches = self.val_loader.eval_batches(steps, *((d.rank, d.world_size) if split else (0, 1)))
        results = evaluate_loss(run, batches, self.loss, total=math.ceil(steps / d.world_size) if split else steps)
        out = {"val_loss": results["loss"]}
        ratio = bytes_per_token(run.cfg.data_file_name, "val")
        if ratio:
            out["val_bpb"] = bits_per_byte(results["loss"], ratio)
        return out


def load_pretrain_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer the options name, checked against the one the shards were made with."""
    import tokenizer as tokenizer_lib
    from data_loader import read_metadata

    if not Path(cfg.data_file_name).is_dir():
        raise UserError(f"data folder '{cfg.data_file_name}' not found; create it with tokenize_data.py "
                        f"--data_file_name {cfg.data_file_name} or point --data_file_name at an existing one")
    data_meta = read_metadata(cfg.data_file_name)
    tok = tokenizer_lib.load_tokenizer(cfg)
    tokenizer_lib.check_fingerprint(tok, data_meta.get("tokenizer", {}).get("fingerprint", ""),
                                    f"the data in '{cfg.data_file_name}'")
    return tok


def main(argv: list[str] | None = None) -> None:
    cfg, overrides = parse_config(TrainConfig, argv, description=__doc__, with_model_args=True)
    run_stage(cfg, overrides, PretrainTask, load_pretrain_tokenizer)


if __name__ == "__main__":
    run_main(main)
