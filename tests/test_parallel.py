"""parallel.py: FSDP2 on CPU with gloo. The sizing function against measured allocations (saved activations,
local shards after a step), DCP checkpoints resharded across world sizes and read without a process group, the
consolidation command; end to end through train.py --parallel fsdp under torchrun (losses against one process,
resume under another world size, one-line errors)."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, run_script
from config import ModelArgs, model_args_from_preset

import parallel


def tiny_args(**kw) -> ModelArgs:
    """tiny's shape, smaller: layer 0 dense, layer 1 MoE (4 experts, top-2)."""
    values = dict(vocab_size=256, dim=64, n_layers=2, n_heads=2, inter_dim=128, moe_inter_dim=64, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_activated_experts=2,
                  max_seq_len=32, bias_update_speed=0.01)
    return model_args_from_preset("tiny", **{**values, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) on `world` gloo ranks."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def build(args: ModelArgs):
    from model import Transformer

    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    return model


def batch(step: int, rows: int, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, args.vocab_size, (rows, args.max_seq_len + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train_steps(model, optimizer, args: ModelArgs, steps, rank: int, world: int, rows: int = 4) -> list[float]:
    """One micro-step per optimizer step on this rank's slice of a global batch of `rows` sequences; the MoE
    counts summed over ranks before the balancing update (as train.py's balance_step). Returns the mean losses."""
    losses = []
    per = rows // world
    for step in steps:
        x, y = batch(step, rows, args)
        loss = model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = torch.cat([loss.detach().reshape(1).double(),
                           *[m.tokens_per_expert.double() for m in model.moe_layers()]])
        if dist.is_initialized():
            dist.all_reduce(stats)
        for i, moe in enumerate(model.moe_layers()):
            moe.tokens_per_expert.copy_(stats[1 + i * args.n_routed_experts:1 + (i + 1) * args.n_routed_experts])
        model.update_balance_bias()
        losses.append(stats[0].item() / world)
    return losses


def local_bytes(model, optimizer) -> dict[str, int]:
    """What this rank holds: the local shards of the parameters, their gradients and AdamW's moments."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = [p for p in model.parameters()]
    out = {"weights": sum(local(p).numel() * local(p).element_size() for p in params),
           "grads": sum(local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None),
           "optimizer": 0}
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            out["optimizer"] += local(state[key]).numel() * local(state[key]).element_size()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The sizing function against measured allocations


def saved_activation_bytes(args: ModelArgs, batch_size: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward (parameters excluded)."""
    model = build(args).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, args.vocab_size, (batch_size, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("kw", [{}, {"n_dense_layers": 2}, {"q_lora_rank": 16}, {"attn_type": "mha"}],
                         ids=["moe", "dense", "q_lora", "mha"])
def test_activation_estimate_matches_saved_tensors(kw) -> None:
    args = tiny_args(vocab_size=1024, max_seq_len=64, **kw)
    for batch_size, seq_len in [(2, 32), (4, 64)]:
        measured = saved_activation_bytes(args, batch_size, seq_len)
        estimate = parallel.activation_bytes(args, batch_size, seq_len, "fp32")
        assert abs(estimate - measured) <= 0.03 * measured, (batch_size, seq_len, estimate, measured)


def _memory_worker(rank: int, world: int, args: ModelArgs, out: Path) -> None:
    model = parallel.apply_fsdp(build(args), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(*batch(0, 2, args)).backward()      # gradients present, as after the backward of a step
    optimizer.step()
    (out / f"rank{rank}.json").write_text(json.dumps(local_bytes(model, optimizer)))


@pytest.mark.slow
def test_fsdp_memory_is_sharded_and_matches_the_sizing_function(tmp_path: Path) -> None:
    args = tiny_args()
    # DDP holds what one process holds: measured on the plain model
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(*batch(0, 2, args)).backward()
    optimizer.step()
    ddp = local_bytes(model, optimizer)
    est = parallel.memory_per_rank(args, 2, args.max_seq_len, 2, "ddp", "fp32")
    assert ddp == {"weights": est.sharded_weights, "grads": est.sharded_grads, "optimizer": est.sharded_optimizer}

    spawn(_memory_worker, 2, args, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    est = parallel.memory_per_rank(args, 2, args.max_seq_len, 2, "fsdp", "fp32")
    # rank 0 owns ceil(rows / 2) of every parameter's rows: exactly what the function counts
    assert ranks[0] == {"weights": est.sharded_weights, "grads": est.sharded_grads,
                        "optimizer": est.sharded_optimizer}
    for r in ranks:
        assert sum(r.values()) <= 0.55 * sum(ddp.values()), (r, ddp)
    # together the ranks hold the model once
    assert ranks[0]["weights"] + ranks[1]["weights"] == ddp["weights"]


def test_sizing_table_in_readme_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    table = parallel.sizing_markdown()
    assert f"{parallel.SIZING_BEGIN}\n{table}\n{parallel.SIZING_END}" in text, \
        "README sizing table is stale: python parallel.py --readme README.md"


def test_sizing_fsdp_shards_and_ddp_does_not() -> None:
    args = model_args_from_preset("moe-1.5b", vocab_size=32768)
    ddp = [parallel.memory_per_rank(args, 1, 1024, w, "ddp") for w in (1, 8, 64)]
    fsdp = [parallel.memory_per_rank(args, 1, 1024, w, "fsdp") for w in (1, 8, 64)]
    assert ddp[0] == ddp[1] == ddp[2] == fsdp[0]
    n = sum(math.prod(s) for s in parallel.param_shapes(args)[0])
    assert ddp[0].weights == 4 * n and ddp[0].optimizer == 8 * n
    assert fsdp[2].sharded_optimizer < fsdp[1].sharded_optimizer < fsdp[0].sharded_optimizer
    assert fsdp[1].sharded_optimizer <= 8 * n / 8 * 1.01


# ----------------------------------------------------------------------------------------------------------------
# DCP checkpoints: any world size reads them, exactly


def _dcp_worker(rank: int, world: int, args: ModelArgs, ckpt: Path, out: Path, mode: str) -> None:
    model = parallel.apply_fsdp(build(args), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if mode == "save":
        train_steps(model, optimizer, args, range(0, 3), rank, world)
        parallel.save_sharded_checkpoint(ckpt, model, optimizer,
                                         lambda tmp: (tmp / "meta.json").write_text(
                                             json.dumps({"model_args": args.to_dict()})))
    else:
        parallel.load_dcp(ckpt, model, optimizer)
    losses = train_steps(model, optimizer, args, range(3, 6), rank, world)
    if rank == 0:
        (out / f"{mode}{world}.json").write_text(json.dumps(losses))


@pytest.mark.slow
def test_dcp_checkpoint_reshards_to_any_world_size(tmp_path: Path) -> None:
    args = tiny_args()
    ckpt = tmp_path / "run" / "step_000003"
    spawn(_dcp_worker, 2, args, ckpt, tmp_path, "save")
    assert parallel.is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in ckpt.parent.iterdir()] == ["step_000003"]           # no temporary folder left
    continued = json.loads((tmp_path / "save2.json").read_text())

    # one process, no process group, plain model and optimizer
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    parallel.load_dcp(ckpt, model, optimizer)
    one = train_steps(model, optimizer, args, range(3, 6), 0, 1)
    assert one == pytest.approx(continued, abs=1e-5)
    spawn(_dcp_worker, 4, args, ckpt, tmp_path, "load")
    assert json.loads((tmp_path / "load4.json").read_text()) == pytest.approx(continued, abs=1e-5)

    # the weights read without a process group, and the consolidation into model.safetensors, agree
    from safetensors.torch import load_file
    full = parallel.load_full_state_dict(ckpt)
    out = parallel.consolidate(ckpt)
    assert out == ckpt / "model.safetensors"
    stored = load_file(str(out))
    assert stored.keys() == full.keys()
    fresh = build(args)
    parallel.load_dcp(ckpt, fresh, None)
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(stored[name], tensor, atol=0, rtol=0, msg=name)
    assert stored["layers.1.ffn.gate.bias"].abs().max() > 0                   # the balancing bias is saved


def test_consolidate_refuses_a_plain_folder(tmp_path: Path) -> None:
    r = run_script("parallel.py", "--consolidate", str(tmp_path))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a sharded checkpoint" in r.stderr
