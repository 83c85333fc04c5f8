"""Fully sharded data parallel training (PyTorch's FSDP2, `fully_shard`) and its sharded checkpoints (PyTorch
Distributed Checkpoint, DCP), as torchtitan uses them; plus the memory sizing table of DDP against FSDP.

    torchrun --nproc_per_node=8 train.py --parallel fsdp --model moe-1.5b ...
    python parallel.py --consolidate checkpoints/step_001000    # DCP shards -> model.safetensors in the same folder
    python parallel.py --sizing_table                           # memory per rank, DDP vs FSDP (README table)

Under DDP every rank holds the whole model, its gradients and AdamW's two moments: 16 bytes per parameter. Under
FSDP each rank keeps 1/world_size of them; a transformer block's full weights exist only while that block runs
(all-gathered before its forward and backward, the gradients reduce-scattered after). Sharding is PyTorch's: this
module only decides where the shard boundaries go (every Block, then the root) and wires the training loop.

A sharded checkpoint is a step folder like a DDP one, but with the weights and optimizer state in DCP's format:

    <root>/step_000500/
        dcp/            .metadata + one __<rank>_0.distcp file per rank, written by all ranks in parallel
        meta.json       as for DDP; its file list (sizes, sha256) includes the dcp/ files
        train_state.pt  as for DDP (data-loader positions of every rank, RNG states, step)

DCP stores every tensor with its global shape, so any number of ranks (or one process without a process group)
can read it back: a 2-rank run resumes on 1, 3 or 4 ranks and continues exactly.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import checkpoint
from config import MODEL_PRESETS, ModelArgs, ParallelConfig, UserError, model_args_from_preset, parse_config, run_main

DCP_DIR = checkpoint.DCP_DIR        # the DCP folder inside a step folder

# ----------------------------------------------------------------------------------------------------------------
# Setup checks


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every worker, also with --nproc_per_node=1."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def check_setup(parallel: str, dtype: str = "auto") -> None:
    """One-line errors for setups FSDP cannot run, before any process group exists: no torchrun (FSDP needs a
    process group, even of one rank), fp16 (its gradient scaler does not handle sharded gradients; bf16 needs
    none)."""
    if parallel != "fsdp":
        return
    if not launched_by_torchrun():
        raise UserError("--parallel fsdp needs torchrun: launch with torchrun --nproc_per_node=N train.py "
                        "--parallel fsdp ... (also for N=1), or train in one process with --parallel ddp")
    if dtype == "fp16":
        raise UserError("--parallel fsdp does not support --dtype fp16 (its gradient scaler cannot unscale sharded "
                        "gradients); use --dtype bf16 or fp32")


# ----------------------------------------------------------------------------------------------------------------
# Wrapping


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def mixed_precision(device: torch.device, dtype: str):
    """On GPU with bf16/fp16 compute: parameters all-gathered in the compute dtype, gradients reduced in fp32 (the
    sharded master weights and AdamW stay fp32). On CPU (and for fp32) None: full precision everywhere, autocast
    as under DDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from common import DTYPES

    if device.type != "cuda" or dtype == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)


def apply_fsdp(model: torch.nn.Module, device: torch.device, dtype: str = "fp32",
               reshard_after_forward: bool = True) -> torch.nn.Module:
    """fully_shard every transformer block, then the root (the embedding, final norm and head form the root's own
    group). In place: `model` itself becomes the sharded module (its parameters become DTensor shards), so any
    optimizer must be built (or rebuilt) afterwards. Buffers are not sharded: the MoE gates' balancing `bias`
    stays a full, replicated tensor on every rank, kept identical by `balance_step` (counts summed over ranks
    before every rank applies the same update)."""
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    policy = mixed_precision(device, dtype)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the gradient norm clip_grad_norm_ returns under FSDP); other tensors as
    they are."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer state of an unsharded model keyed by parameter names (None when it holds none yet): taken
    before sharding, so that `load_full_optimizer_state` can carry a restored plain checkpoint into the shards."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer) if optimizer.state else None


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state into the optimizer of a sharded model: each rank keeps the slices of
    its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (DCP)


def is_sharded_checkpoint(step_dir: Path | str) -> bool:
    """A step folder whose weights are DCP shards; complete only once DCP's .metadata is there (written last)."""
    return checkpoint.is_sharded(step_dir)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_dcp(folder: Path | str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: every rank writes its own shards of the model and optimizer state into folder/dcp at the same
    time (one file per rank, fsynced); rank 0 writes DCP's .metadata last."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(Path(folder) / DCP_DIR), single_file_per_rank=True, sync_files=True)
    dcp.save(_state(model, optimizer), storage_writer=writer)


def _single_process_quiet() -> contextlib.AbstractContextManager:
    """DCP warns on every load without a process group, even when asked for exactly that (no_dist=True)."""
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return stack


def load_dcp(step_dir: Path | str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into `model` (sharded or not) and `optimizer`, in place, whatever the world size that
    wrote it: each rank reads the pieces of the global tensors that its shards cover. Collective under a process
    group; plain reads without one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _state(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=FileSystemReader(str(Path(step_dir) / DCP_DIR)),
                     no_dist=not dist.is_initialized())
    except Exception as error:  # DCP wraps the per-rank failures in its own exception types
        from common import first_line

        raise UserError(f"could not read the sharded checkpoint '{step_dir}' ({first_line(error)}); it is "
                        f"damaged or was written by an incompatible version") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_state_dict(step_dir: Path | str) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read without a process group (checkpoint.py's reader,
    which generate.py, hf_interop.py and --init_from use through checkpoint.load_weights/load_model)."""
    return checkpoint.load_sharded_weights(step_dir)


def _broadcast(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_checkpoint(final: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                            write_rest: Callable[[Path], None], flag: str = "--save_file_name") -> Path:
    """Write a sharded step folder atomically. Rank 0 opens a temporary folder beside `final` (common.atomic_folder)
    and tells every rank its name; all ranks write their shards into it in parallel (save_dcp); rank 0 then adds the
    rest (`write_rest(tmp)`: meta.json, train state) and, once every rank has finished, publishes the folder with
    one rename. A crash at any point leaves only a `.tmp_*` folder, never a step folder that looks complete.
    Collective: every rank must call it with the same `final`."""
    from common import atomic_folder

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_folder(final, flag)) if rank0 else None
        tmp = Path(_broadcast(str(tmp) if tmp is not None else None))
        save_dcp(tmp, model, optimizer)          # returns on every rank once rank 0 has written .metadata
        if rank0:
            write_rest(tmp)
    if dist.is_initialized():
        dist.barrier()                           # nobody moves on (or prunes) before the rename
    return final


def consolidate(step_dir: Path | str) -> Path:
    """Write step_dir/model.safetensors from the DCP shards, atomically (a temporary file renamed into place):
    afterwards the folder is also a plain checkpoint for any tool that reads model.safetensors."""
    from common import fsync_dir

    step_dir = Path(step_dir)
    if not is_sharded_checkpoint(step_dir):
        raise UserError(f"'{step_dir}' is not a sharded checkpoint (no {DCP_DIR}/.metadata); pass a step "
                        f"folder written by train.py --parallel fsdp")
    out = step_dir / checkpoint.WEIGHTS_FILE
    tmp = step_dir / f".{checkpoint.WEIGHTS_FILE}.tmp-{os.getpid()}"
    try:
        checkpoint.save_weights(tmp, load_full_state_dict(step_dir))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(step_dir)
    except OSError as error:
        from common import first_line

        raise UserError(f"cannot write '{out}' ({first_line(error)}); free some space") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Memory sizing: bytes per rank under DDP and FSDP
#
# What is counted (AdamW, fp32 master weights, as train.py trains):
#   weights     fp32 parameters: all of them under DDP, a 1/N shard under FSDP plus, in flight, the all-gathered
#               compute-dtype copies of the root's own parameters (embedding, final norm, head: all-gathered for
#               the whole step) and of two blocks (the one running and the one prefetched)
#   grads       fp32 gradients: all under DDP, a shard under FSDP plus the unsharded compute-dtype gradients of the
#               root and one block waiting for their reduce-scatter
#   optimizer   AdamW's exp_avg and exp_avg_sq in fp32: 8 bytes per (local) parameter
#   activations tensors saved for backward at one micro-batch (batch_size x seq_len tokens), the same under both
# Not counted: DDP's gradient buckets (another 4 bytes per parameter unless gradient_as_bucket_view), allocator
# fragmentation, the CUDA context, temporary buffers of single kernels.


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    sharded_weights: int       # the persistent part: the fp32 parameters this rank owns
    sharded_grads: int
    sharded_optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def _local_numel(shape: torch.Size, world: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 split as torch.chunk does (ceil(d0 / world) rows first)."""
    if not shape:
        return 1
    rest = math.prod(shape[1:])
    return min(shape[0], math.ceil(shape[0] / world)) * rest


def activation_bytes(args: ModelArgs, batch_size: int, seq_len: int, dtype: str = "fp32") -> int:
    """Bytes of the tensors autograd saves for backward in one forward of batch_size x seq_len tokens, counted from
    the model's shapes (model.py's forward, tensor by tensor; fp32 softmax/log-sum-exp statistics ignored).
    bf16/fp16: 2 bytes per saved element (autocast's matmul outputs), fp32: 4."""
    a = args
    b = 4 if dtype == "fp32" else 2
    n = batch_size * seq_len
    D = a.dim
    norm = lambda width: 3 * width + 1                   # RMSNorm: input, normalised input, output, 1/rms
    if a.attn_type == "mla":
        H, v = a.n_heads, a.v_head_dim
        r, rope = a.kv_lora_rank, a.qk_rope_head_dim
        pad = max(a.qk_nope_head_dim + rope, v)
        attn = (r + rope + norm(r) - r                   # wkv_a output (holds kv_norm's input), kv_norm
                + 4 * H * pad + H                        # SDPA: q, k, v (zero-padded to one size), output, lse
                + (H * v if pad > v else 0))             # wo input: a copy when the output was sliced
        if a.q_lora_rank:
            attn += norm(a.q_lora_rank)                  # wq_a output, q_norm
    else:
        H, hkv = a.n_heads, a.n_kv_heads or a.n_heads
        hd = a.head_dim or a.dim // a.n_heads
        attn = 2 * H * hd + 2 * hkv * hd + H             # SDPA: q, k, v, output (also wo's input), lse
    per_token, index_bytes = 0, 0
    for i in range(a.n_layers):
        per_token += 2 * norm(D) + attn
        if i < a.n_dense_layers:
            per_token += 4 * a.inter_dim                 # SwiGLU: w1 x, silu(w1 x), w3 x, their product
        else:
            K, E = a.n_activated_experts, a.n_routed_experts
            per_token += (E + 1 + 2 * K                  # router scores, top-k weights and their sum
                          + 3 * K * D                    # tokens gathered per expert, outputs, weighted outputs
                          + 4 * K * a.moe_inter_dim      # each chosen expert's SwiGLU
                          + 4 * a.n_shared_experts * a.moe_inter_dim)
            index_bytes += 3 * K * 8                     # int64: chosen experts, sort order, token ids
    per_token += norm(D)                                 # final norm
    per_token += D                                       # the fused loss keeps dloss/dh
    head = a.vocab_size * D * 4                          # ... and dloss/dhead in fp32 (per micro-batch)
    return n * (per_token * b + index_bytes) + head


def param_shapes(args: ModelArgs) -> tuple[list[torch.Size], list[list[torch.Size]], list[torch.Size]]:
    """(all parameter shapes, the shapes of each block, the root's own (embedding, norm, head)), from a model built
    on the meta device (no memory). A tied head counts once."""
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    seen = set()
    everything, root = [], []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        everything.append(p.shape)
        if not name.startswith("layers."):
            root.append(p.shape)
    blocks = [[p.shape for p in layer.parameters()] for layer in model.layers]
    return everything, blocks, root


def memory_per_rank(args: ModelArgs, batch_size: int, seq_len: int, world: int, parallel: str,
                    dtype: str = "bf16") -> MemoryEstimate:
    """Per-rank memory of training `args` with AdamW at micro-batch batch_size x seq_len on `world` ranks."""
    everything, blocks, root = param_shapes(args)
    compute = 4 if dtype == "fp32" else 2
    acts = activation_bytes(args, batch_size, seq_len, dtype)
    if parallel == "ddp":
        p = sum(math.prod(s) for s in everything)
        return MemoryEstimate(4 * p, 4 * p, 8 * p, acts, 4 * p, 4 * p, 8 * p)
    if parallel != "fsdp":
        raise ValueError(f"unknown parallel mode {parallel!r}")
    local = sum(_local_numel(s, world) for s in everything)
    root_full = sum(math.prod(s) for s in root)
    block_full = max((sum(math.prod(s) for s in blk) for blk in blocks), default=0)
    gathered_w = compute * (root_full + 2 * block_full) if world > 1 else 0
    gathered_g = compute * (root_full + block_full) if world > 1 else 0
    return MemoryEstimate(4 * local + gathered_w, 4 * local + gathered_g, 8 * local, acts,
                          4 * local, 4 * local, 8 * local)


# A MoE model at a few billion parameters (DeepSeek-V3's proportions at 2k width): 5.2B parameters, 0.8B active
SIZING_MOE = dict(dim=2048, inter_dim=8192, moe_inter_dim=1024, n_layers=24, n_dense_layers=1, n_heads=16,
                  max_seq_len=4096, q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128, n_routed_experts=32, n_shared_experts=2, n_activated_experts=6, n_expert_groups=8,
                  n_limited_groups=4, score_func="sigmoid", route_scale=2.5)


def sizing_models(vocab_size: int = 32768) -> dict[str, ModelArgs]:
    models = {name: model_args_from_preset(name, vocab_size=vocab_size) for name in MODEL_PRESETS}
    models["moe-5b (table only)"] = ModelArgs(**{**SIZING_MOE, "vocab_size": vocab_size})
    return models


def _gib(n: int) -> str:
    g = n / 2**30
    return f"{g:.2f}" if g < 10 else f"{g:.1f}" if g < 100 else f"{g:.0f}"


def sizing_markdown(batch_size: int = 4, seq_len: int = 2048, dtype: str = "bf16", worlds=(1, 8, 64),
                    vocab_size: int = 32768) -> str:
    """The README's sizing table: GiB per rank for weights / grads / optimizer / activations and their total."""
    rows = [f"Per-rank GiB at a micro-batch of {batch_size} x {seq_len} tokens, {dtype} compute, AdamW, "
            f"vocabulary {vocab_size}; W/G/O/A = weights / gradients / optimizer state / activations.", "",
            "| model | params | GPUs | DDP W / G / O / A | DDP total | FSDP W / G / O / A | FSDP total |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, args in sizing_models(vocab_size).items():
        n_params = sum(math.prod(s) for s in param_shapes(args)[0])
        for world in worlds:
            ddp = memory_per_rank(args, batch_size, seq_len, world, "ddp", dtype)
            fsdp = memory_per_rank(args, batch_size, seq_len, world, "fsdp", dtype)
            parts = lambda m: " / ".join(_gib(x) for x in (m.weights, m.grads, m.optimizer, m.activations))
            rows.append(f"| {name} | {n_params / 1e9:.2f}B | {world} | {parts(ddp)} | {_gib(ddp.total)} | "
                        f"{parts(fsdp)} | {_gib(fsdp.total)} |")
    return "\n".join(rows)


SIZING_BEGIN, SIZING_END = "<!-- sizing table -->", "<!-- /sizing table -->"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ParallelConfig, argv, description=__doc__)
    if cfg.consolidate:
        out = consolidate(cfg.consolidate)
        print(f"wrote {out}")
    if cfg.readme:
        update_readme(Path(cfg.readme))
        print(f"updated the sizing table in {cfg.readme}")
    elif cfg.sizing_table or not cfg.consolidate:
        print(sizing_markdown(cfg.batch_size, cfg.seq_len, cfg.dtype))


def update_readme(path: Path) -> None:
    """Replace the table between SIZING_BEGIN and SIZING_END with the current sizing_markdown() (defaults)."""
    import re

    from common import atomic_write

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read '{path}' ({error.strerror or error}); pass the README's path") from None
    pattern = re.escape(SIZING_BEGIN) + ".*?" + re.escape(SIZING_END)
    if not re.search(pattern, text, flags=re.S):
        raise UserError(f"'{path}' has no {SIZING_BEGIN} ... {SIZING_END} block; add the two markers where the "
                        f"table belongs")
    block = f"{SIZING_BEGIN}\n{sizing_markdown()}\n{SIZING_END}"
    atomic_write(path, re.sub(pattern, lambda m: block, text, flags=re.S), "--readme")


if __name__ == "__main__":
    run_main(main)
