"""Optimizers and learning-rate schedules for every training script.

--optimizer adamw: AdamW on every parameter (weight decay on matrices only).
--optimizer muon: Muon (momentum, then the update orthogonalised by a Newton-Schulz iteration) for the hidden
weight matrices, AdamW for the rest (the embedding, the output head, the norms and the router), as in
modded-nanogpt and nanochat:
    * 2-D hidden matrices (attention and dense/shared-expert projections): torch.optim.Muon.
    * the routed experts' stacked 3-D weights [n_experts, out, in]: ExpertMuon below, the same update applied to
      each expert's matrix on its own (torch.optim.Muon accepts 2-D parameters only).
Both use --muon_lr with the spectral rule lr * sqrt(max(1, out/in)) (torch's adjust_lr_fn="original"): the
orthogonalised update has spectral norm ~1 whatever the matrix size, so one --muon_lr transfers across widths.
The schedule (lr_at) multiplies every group's own peak rate (--lr for AdamW groups, --muon_lr for Muon groups).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from config import TrainConfig

# torch.optim.Muon's Newton-Schulz coefficients, steps and epsilon (Keller Jordan's values), used for the experts
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


# ----------------------------------------------------------------------------------------------------------------
# Muon for stacked expert weights


def zeropower_via_newtonschulz(grad: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                               steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation in bf16, batched over the leading dimensions:
    grad [..., A, B] -> ~U V^T of each matrix, each matrix normalised by its own Frobenius norm."""
    a, b, c = coefficients
    x = grad.bfloat16()
    transposed = grad.size(-2) > grad.size(-1)
    if transposed:                                                 # iterate on the wide side: [..., min, max]
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)     # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT                                            # [..., min, min]
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if gram.dim() == 3 else \
            torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a) if x.dim() == 3 else torch.addmm(x, update, x, beta=a)
    return x.mT if transposed else x


def spectral_lr(lr: float, rule: str, rows: int, cols: int) -> float:
    """torch.optim.Muon's per-matrix rate: 'original' sqrt(max(1, rows/cols)) (spectral), 'match_rms_adamw'
    0.2 * sqrt(max(rows, cols)) (update RMS of AdamW's)."""
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def closure_loss(closure: Any) -> Any:
    """An optimizer's step(closure): the loss the closure recomputes, with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class ExpertMuon(torch.optim.Optimizer):
    """Muon for stacked weights [n_experts, out, in]: exactly torch.optim.Muon's update (Nesterov momentum,
    bf16 Newton-Schulz, decoupled weight decay lr * weight_decay, per-matrix rate rule) applied to each
    expert's [out, in] matrix independently, all experts in one batched iteration."""

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = NS_EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 3:
                    raise ValueError(f"ExpertMuon takes stacked 3-D weights, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-spectral_lr(lr, group["adjust_lr_fn"] or "original", p.size(1), p.size(2)))
        return loss


# ----------------------------------------------------------------------------------------------------------------
# Several optimizers as one


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, seen as one: one param_groups list (the parts' own group
    dicts, so setting a group's lr reaches the part), one state, one state_dict of plain tensors and containers
    (loadable with torch.load(weights_only=True)), one step and zero_grad. GradScaler, gradient clipping and
    checkpointing treat it as any optimizer."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        groups = [g for part in parts for g in part.param_groups]
        super().__init__(groups, {})
        self._link()

    def _link(self) -> None:
        """Point every part at its slice of self.param_groups and at the shared state (parameters are disjoint)."""
        start = 0
        for part in self.parts:
            count = len(part.param_groups)
            part.param_groups = self.param_groups[start:start + count]
            part.state = self.state
            start += count

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)   # replaces self.param_groups and self.state: link them again
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for part in self.parts:
            part.step()
        return loss


# ----------------------------------------------------------------------------------------------------------------
# The split and the builder


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter],
                                                list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(2-D hidden matrices, 3-D expert stacks, AdamW with decay, AdamW without decay). AdamW keeps the token
    embedding and the output head (even when tied), the router's weight (its scale sets the routing, and a few
    rows of [n_experts, dim] are not a hidden transformation) and every vector (norms)."""
    hidden, experts, decay, no_decay = [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        adamw_matrix = name.startswith(("embed.", "head.")) or name.endswith("gate.weight")
        if p.dim() == 3:
            experts.append(p)
        elif p.dim() == 2 and not adamw_matrix:
            hidden.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return hidden, experts, decay, no_decay


def adamw_groups(model: torch.nn.Module, cfg: TrainConfig, decay: list[torch.nn.Parameter],
                 no_decay: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """AdamW's groups: matrices with weight decay, vectors without, and with --embed_lr the token embedding on its
    own at that rate without decay (its rows are read through the first RMSNorm, so only their direction counts,
    and a row is updated only when its token occurs; modded-nanogpt and nanochat step it 50-100x faster than the
    head). A tied embedding is the head and stays in `decay`. With --head_lr the output head (tied or not) gets its
    own rate, with decay. The groups with decay carry `repeat_decay`: set_schedule grows their decay by
    --wd_per_epoch as the data repeats."""
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "repeat_decay": True},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    embed = getattr(getattr(model, "embed", None), "weight", None)
    head = getattr(getattr(model, "head", None), "weight", None)
    if cfg.embed_lr > 0 and embed is not None and embed is not head and any(p is embed for p in decay):
        groups[0]["params"] = [p for p in decay if p is not embed]
        groups.append({"params": [embed], "weight_decay": 0.0, "lr_scale": cfg.embed_lr / cfg.lr})
    if cfg.head_lr > 0 and head is not None and any(p is head for p in groups[0]["params"]):
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not head]
        groups.append({"params": [head], "weight_decay": cfg.weight_decay, "lr_scale": cfg.head_lr / cfg.lr,
                       "repeat_decay": True})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """--optimizer adamw: AdamW with weight decay on matrices (>= 2-D: embeddings, projections, stacked experts)
    only. --optimizer muon: see the module docstring. Every group carries `lr_scale`, its peak rate over --lr,
    which set_lr applies."""
    params = [p for p in model.parameters() if p.requires_grad]
    extra = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adamw":
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return torch.optim.AdamW(adamw_groups(model, cfg, decay, no_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=1e-8, **extra)
    hidden, experts, decay, no_decay = muon_split(model)
    parts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adamw_groups(model, cfg, decay, no_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                          eps=1e-8, **extra)]
    muon = dict(lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                adjust_lr_fn=cfg.muon_lr_rule)
    scale = cfg.muon_lr / cfg.lr
    if hidden:
        parts.append(torch.optim.Muon([{"params": hidden, "lr_scale": scale}], **muon))
    if experts:
        parts.append(ExpertMuon([{"params": experts, "lr_scale": scale}], **muon))
    return Combined(parts)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedules


def decay_start(cfg: TrainConfig) -> int:
    """The last step at the full rate: the cosine decays from the end of the warm-up, WSD (warmup-stable-decay)
    holds the peak until the last decay_frac of --steps. A WSD run's checkpoint at this step does not depend on
    --steps, so a finished run is extended by resuming from it with a larger --steps."""
    if cfg.lr_schedule == "wsd":
        return max(cfg.warm_up, cfg.steps - int(round(cfg.decay_frac * cfg.steps)))
    return cfg.warm_up


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak rate at optimizer step `step` (1-based): linear warm-up (non-zero at step 1),
    then the cosine or WSD's constant-then-linear decay, down to min_lr / lr at the last step."""
    if cfg.warm_up > 0 and step <= cfg.warm_up:
        return step / cfg.warm_up
    start = decay_start(cfg)
    if cfg.steps <= start or step <= start:
        return 1.0
    floor = cfg.min_lr / cfg.lr
    progress = min(1.0, (step - start) / (cfg.steps - start))
    if cfg.lr_schedule == "wsd":
        return 1.0 - (1.0 - floor) * progress
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The base learning rate (--lr's group) of optimizer step `step`."""
    return cfg.lr * lr_factor(step, cfg)


def weight_decay_rule(cfg: TrainConfig, muon: bool = True) -> tuple[float, float]:
    """Muon's (muon=True) or AdamW's weight decay during the first pass over the training data, and what each
    further pass adds: (--muon_weight_decay, --muon_wd_per_epoch) or (--weight_decay, --wd_per_epoch)."""
    return (cfg.muon_weight_decay, cfg.muon_wd_per_epoch) if muon else (cfg.weight_decay, cfg.wd_per_epoch)


def repeat_weight_decay(cfg: TrainConfig, passes: float, muon: bool = True) -> float:
    """Muon's (muon=True) or AdamW's weight decay once `passes` passes over the training data are done: the
    first pass's plus the per-pass increment for each pass beyond the first (weight_decay_rule). Weight decay helps
    a run over repeated data (it overfits without it) and slows a single pass, so it grows as the data repeats
    (README, "Training recipe"). It depends on the tokens seen, not on --steps, so a WSD run's stable checkpoint
    still extends exactly."""
    base, per_pass = weight_decay_rule(cfg, muon)
    return base + per_pass * max(0.0, passes - 1.0)


def passes_before(step: int, cfg: TrainConfig, train_tokens: int) -> float:
    """Passes over `train_tokens` training tokens made before optimizer step `step` (step --steps + 1: the run's)."""
    return (step - 1) * cfg.total_batch_size / train_tokens


def set_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, train_tokens: int = 0) -> float:
    """Set the rates of optimizer step `step`: every group's learning rate (set_lr) and, when the training data's
    size is known, the weight decay of the Muon groups and of AdamW's decaying groups for the passes made before
    this step. Returns the base rate."""
    lr = set_lr(optimizer, step, cfg)
    if train_tokens:
        passes = passes_before(step, cfg, train_tokens)
        muon, adamw = repeat_weight_decay(cfg, passes), repeat_weight_decay(cfg, passes, muon=False)
        for part in getattr(optimizer, "parts", [optimizer]):
            is_muon = isinstance(part, (torch.optim.Muon, ExpertMuon))
            for group in part.param_groups:
                if is_muon:
                    group["weight_decay"] = muon
                elif group.get("repeat_decay"):
                    group["weight_decay"] = adamw
    return lr


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every parameter group's learning rate for optimizer step `step` (its lr_scale times the base rate:
    Muon groups run at --muon_lr); returns the base rate."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
