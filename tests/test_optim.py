"""optim.py against independent references: the Muon/AdamW parameter split, the per-expert Muon update against
torch.optim.Muon (E stacked matrices = E independent torch Muon updates, bit for bit) and against a float64
per-matrix Newton-Schulz reference, the state_dict round trip through torch.load(weights_only=True), the
schedules (cosine, WSD) against closed forms; and the recipe options of ModelArgs (zero-initialised output
projections, QK norm, logit soft-cap, dropout) against plain PyTorch computations."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from config import ModelArgs, TrainConfig
from model import Transformer
from optim import (NS_COEFFICIENTS, Combined, ExpertMuon, build_optimizer, decay_start, lr_at, muon_split, set_lr,
                   set_schedule, zeropower_via_newtonschulz)


pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 97


def small_args(**kw) -> ModelArgs:
    base = dict(vocab_size=VOCAB, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=4,
                max_seq_len=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, score_func="sigmoid",
                bias_update_speed=0.01)
    base.update(kw)
    return ModelArgs(**base)


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(small_args(**kw))
    model.init_weights()
    return model


def muon_cfg(**kw) -> TrainConfig:
    base = dict(optimizer="muon", lr=3e-3, muon_lr=0.02, min_lr=3e-4, warm_up=2, steps=10, weight_decay=0.1,
                muon_weight_decay=0.05, embed_lr=0)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------------------------
# The split


@pytest.mark.parametrize("tied", [False, True])
def test_split_sends_hidden_matrices_to_muon_and_the_rest_to_adamw(tied):
    model = build(tie_embeddings=tied)
    opt = build_optimizer(model, muon_cfg(), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    adamw, muon2d, experts = opt.parts
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon2d, torch.optim.Muon)
    assert isinstance(experts, ExpertMuon)
    got = {kind: sorted(names[id(p)] for g in part.param_groups for p in g["params"])
           for kind, part in (("adamw", adamw), ("muon", muon2d), ("experts", experts))}
    # written out independently of muon_split's rule
    expected_experts = sorted(f"layers.{i}.ffn.experts.{w}" for i in (1, 2) for w in ("w1", "w2", "w3"))
    expected_adamw = sorted(
        ["embed.weight"] + ([] if tied else ["head.weight"]) + ["norm.weight"]
        + [f"layers.{i}.{n}" for i in range(3) for n in ("attn_norm.weight", "ffn_norm.weight",
                                                         "attn.kv_norm.weight")]
        + [f"layers.{i}.ffn.gate.weight" for i in (1, 2)])
    assert got["experts"] == expected_experts
    assert got["adamw"] == expected_adamw
    every = sorted(n for n, p in model.named_parameters())   # named_parameters lists a tied weight once
    assert sorted(got["adamw"] + got["muon"] + got["experts"]) == every
    assert all(model.get_parameter(n).dim() == 2 and not n.startswith(("embed", "head")) for n in got["muon"])
    assert {g["weight_decay"] for g in adamw.param_groups} == {0.1, 0.0}
    assert muon2d.param_groups[0]["weight_decay"] == 0.05 and experts.param_groups[0]["weight_decay"] == 0.05


def test_adamw_option_is_plain_adamw():
    model = build()
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1, optimizer="adamw", embed_lr=0), torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert decay == {id(p) for p in model.parameters() if p.dim() >= 2}


def test_muon_split_of_a_dense_model_has_no_expert_part():
    model = build(n_dense_layers=3)
    hidden, experts, decay, no_decay = muon_split(model)
    assert experts == [] and len(hidden) == 3 * (4 + 3)     # wq wkv_a wkv_b wo, w1 w2 w3 per layer
    opt = build_optimizer(model, muon_cfg(), torch.device("cpu"))
    assert [type(p).__name__ for p in opt.parts] == ["AdamW", "Muon"]


# ----------------------------------------------------------------------------------------------------------------
# The per-expert update


@pytest.mark.parametrize("shape", [(3, 24, 16), (3, 16, 24), (2, 12, 12)])
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_expert_muon_equals_torch_muon_per_matrix(shape, rule, nesterov):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen)
    stacked = torch.nn.Parameter(w.clone())
    singles = [torch.nn.Parameter(w[e].clone()) for e in range(shape[0])]
    hyper = dict(lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=rule)
    ours = ExpertMuon([stacked], **hyper)
    ref = torch.optim.Muon(singles, **hyper)
    for _ in range(4):
        g = torch.randn(shape, generator=gen)
        stacked.grad = g.clone()
        for e, p in enumerate(singles):
            p.grad = g[e].clone()
        ours.step()
        ref.step()
    for e, p in enumerate(singles):
        assert torch.equal(stacked[e], p), (e, (stacked[e] - p).abs().max())
        assert torch.equal(ours.state[stacked]["momentum_buffer"][e], ref.state[p]["momentum_buffer"])


def newton_schulz_f64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration of Keller Jordan's Muon in float64 for one matrix."""
    a, b, c = NS_COEFFICIENTS
    x = g.double()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def test_expert_muon_against_float64_newton_schulz():
    gen = torch.Generator().manual_seed(2)
    E, out_dim, in_dim = 4, 32, 16
    w = torch.randn(E, out_dim, in_dim, generator=gen)
    g = torch.randn(E, out_dim, in_dim, generator=gen)
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    lr, wd, mom = 0.02, 0.1, 0.95
    ExpertMuon([p], lr=lr, weight_decay=wd, momentum=mom, nesterov=True).step()
    scale = math.sqrt(max(1.0, out_dim / in_dim))
    for e in range(E):
        buf = (1 - mom) * g[e].double()                       # momentum buffer after one step from zero
        update = (1 - mom) * g[e].double() + mom * buf          # Nesterov: grad.lerp(buf, momentum)
        expected = w[e].double() * (1 - lr * wd) - lr * scale * newton_schulz_f64(update)
        # the iteration runs in bf16 (as torch.optim.Muon's): its error is ~1% of the update, the update is lr
        err = (p[e].double() - expected).abs().max().item()
        assert err < 0.05 * lr * scale, err
    # and the orthogonalisation itself: singular values of the bf16 iteration within Muon's (0.5, 1.5) band
    s = torch.linalg.svdvals(zeropower_via_newtonschulz(g).double())
    assert s.min() > 0.5 and s.max() < 1.5


def test_expert_muon_rejects_matrices():
    with pytest.raises(ValueError, match="3-D"):
        ExpertMuon([torch.nn.Parameter(torch.zeros(3, 3))])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint round trip and determinism


def train(model: Transformer, opt, cfg: TrainConfig, steps: range, seed: int = 5) -> list[float]:
    losses = []
    for step in steps:
        set_lr(opt, step, cfg)
        gen = torch.Generator().manual_seed(seed + step)
        x = torch.randint(0, VOCAB, (4, 17), generator=gen)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balance_bias()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_continues_exactly():
    cfg = muon_cfg(steps=8)
    full = build()
    full_opt = build_optimizer(full, cfg, torch.device("cpu"))
    full_losses = train(full, full_opt, cfg, range(1, 9))

    first = build()
    opt = build_optimizer(first, cfg, torch.device("cpu"))
    losses = train(first, opt, cfg, range(1, 5))
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)          # plain tensors and containers only

    resumed = build(seed=123)                             # other weights: everything must come from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt = build_optimizer(resumed, cfg, torch.device("cpu"))
    resumed_opt.load_state_dict(saved["optimizer"])
    assert len(resumed_opt.state) == len(opt.state) == sum(1 for _ in first.parameters())
    losses += train(resumed, resumed_opt, cfg, range(5, 9))
    assert losses == full_losses
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the parts still see the restored groups: setting a rate on the combined optimizer reaches them
    set_lr(resumed_opt, 9, cfg)
    assert resumed_opt.parts[1].param_groups[0]["lr"] == pytest.approx(lr_at(9, cfg) * cfg.muon_lr / cfg.lr)


def test_training_is_deterministic():
    cfg = muon_cfg()
    runs = []
    for _ in range(2):
        model = build()
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        train(model, opt, cfg, range(1, 4))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_combined_works_with_grad_scaler_unscale():
    model = build()
    opt = build_optimizer(model, muon_cfg(), torch.device("cpu"))
    assert isinstance(opt, Combined)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x = torch.randint(0, VOCAB, (2, 9))
    scaler.scale(model(x[:, :-1], x[:, 1:])).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g / 4.0)
    scaler.step(opt)


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def test_cosine_schedule_closed_form():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warm_up=10, steps=110, lr_schedule="cosine")
    assert lr_at(1, cfg) == pytest.approx(1e-4) and lr_at(10, cfg) == pytest.approx(1e-3)
    for step in (11, 40, 60, 110):
        t = (step - 10) / 100
        assert lr_at(step, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * t)))


def test_wsd_schedule_and_extension():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warm_up=10, steps=100, lr_schedule="wsd", decay_frac=0.2)
    assert decay_start(cfg) == 80
    assert [lr_at(s, cfg) for s in (5, 10, 50, 80)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert lr_at(90, cfg) == pytest.approx(1e-3 - 0.5 * 9e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    # a longer run has the same rates up to the shorter run's decay start: resume from that checkpoint to extend
    longer = TrainConfig(lr=1e-3, min_lr=1e-4, warm_up=10, steps=300, lr_schedule="wsd", decay_frac=0.2)
    assert [lr_at(s, longer) for s in range(1, 81)] == [lr_at(s, cfg) for s in range(1, 81)]


def test_set_lr_runs_muon_groups_at_muon_lr():
    model = build()
    cfg = muon_cfg(lr=2e-3, muon_lr=0.04, warm_up=0, steps=10, lr_schedule="wsd")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    base = set_lr(opt, 1, cfg)
    assert base == pytest.approx(2e-3)
    assert [g["lr"] for g in opt.parts[0].param_groups] == pytest.approx([2e-3, 2e-3])
    assert opt.parts[1].param_groups[0]["lr"] == pytest.approx(0.04)
    assert opt.parts[2].param_groups[0]["lr"] == pytest.approx(0.04)


def test_muon_weight_decay_grows_with_the_passes_over_the_data():
    """set_schedule with the training data's size: Muon's weight decay is --muon_weight_decay until one pass is
    done, then grows by --muon_wd_per_epoch a pass (the passes made before the step); AdamW's stays (at
    --wd_per_epoch 0), and without the data's size nothing changes. A step then decays a hidden matrix as
    torch.optim.Muon with that weight decay does."""
    cpu = torch.device("cpu")
    cfg = muon_cfg(muon_weight_decay=0.05, muon_wd_per_epoch=0.3, wd_per_epoch=0.0, total_batch_size=100, steps=40,
                   warm_up=0, lr_schedule="wsd")
    tokens = 1000                                 # 10 steps a pass
    model = build(seed=4)
    opt = build_optimizer(model, cfg, cpu)
    muon_groups = opt.parts[1].param_groups + opt.parts[2].param_groups
    for step, passes in ((1, 0.0), (10, 0.9), (11, 1.0), (12, 1.1), (31, 3.0), (40, 3.9)):
        set_schedule(opt, step, cfg, tokens)
        want = 0.05 + 0.3 * max(0.0, passes - 1.0)
        assert [g["weight_decay"] for g in muon_groups] == pytest.approx([want] * len(muon_groups))
        assert [g["weight_decay"] for g in opt.parts[0].param_groups] == [0.1, 0.0]
    fresh = build_optimizer(build(seed=4), cfg, cpu)
    set_schedule(fresh, 31, cfg)
    assert {g["weight_decay"] for g in fresh.parts[1].param_groups} == {0.05}

    # one step at pass 3: a hidden matrix moves as torch.optim.Muon with weight decay 0.65 moves it
    p = opt.parts[1].param_groups[0]["params"][0]
    ref = p.detach().clone().requires_grad_()
    ref_opt = torch.optim.Muon([ref], lr=cfg.muon_lr * lr_at(31, cfg) / cfg.lr, weight_decay=0.65,
                               momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn=cfg.muon_lr_rule)
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, x).backward()
    ref.grad = p.grad.clone()
    set_schedule(opt, 31, cfg, tokens)
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("head_lr", [0.0, 7e-3])
def test_adamw_weight_decay_grows_with_the_passes_over_the_data(optimizer, head_lr):
    """--wd_per_epoch: AdamW's groups with decay (the head, the router, with --optimizer adamw every matrix) go
    from --weight_decay to + wd_per_epoch a pass after the first; the embedding on its own rate and the vectors
    keep none, and Muon keeps its own rule. A step then moves the head as torch.optim.AdamW with that decay."""
    cpu = torch.device("cpu")
    cfg = muon_cfg(optimizer=optimizer, wd_per_epoch=0.4, muon_wd_per_epoch=0.3, embed_lr=0.05, head_lr=head_lr,
                   total_batch_size=100, steps=40, warm_up=0, lr_schedule="wsd")
    tokens = 1000                                 # 10 steps a pass
    model = build(seed=5)
    opt = build_optimizer(model, cfg, cpu)
    head, embed = model.head.weight, model.embed.weight
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for step, passes in ((1, 0.0), (11, 1.0), (12, 1.1), (31, 3.0)):
        set_schedule(opt, step, cfg, tokens)
        want, want_muon = 0.1 + 0.4 * max(0.0, passes - 1.0), 0.05 + 0.3 * max(0.0, passes - 1.0)
        for name, p in model.named_parameters():
            adamw = (optimizer == "adamw" or p.dim() < 2 or name.startswith(("embed.", "head."))
                     or name.endswith("gate.weight"))
            expected = (0.0 if p is embed or p.dim() < 2 else want) if adamw else want_muon
            assert group_of[id(p)]["weight_decay"] == pytest.approx(expected), (name, step)
    ref = head.detach().clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], lr=lr_at(31, cfg) * (head_lr or cfg.lr) / cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                eps=1e-8, weight_decay=0.9)
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, x).backward()
    ref.grad = head.grad.clone()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(head.detach(), ref.detach(), rtol=0, atol=1e-7)
    # without the data's size (fine-tuning stages) nothing changes
    fresh = build_optimizer(build(seed=5), cfg, cpu)
    set_schedule(fresh, 31, cfg)
    assert {g["weight_decay"] for g in fresh.param_groups if g.get("repeat_decay")} == {0.1}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("head_lr", [0.0, 7e-3])
def test_embed_lr_steps_the_embedding_alone_without_decay(optimizer, head_lr):
    """--embed_lr: the embedding moves as a plain AdamW at that (scheduled) rate without weight decay would move
    it, while the head keeps --lr (or --head_lr) with decay; both checked against separate torch.optim.AdamW
    references."""
    model = build(seed=3)
    cfg = muon_cfg(optimizer=optimizer, lr=2e-3, embed_lr=0.05, head_lr=head_lr, warm_up=4, steps=10,
                   lr_schedule="cosine")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    embed = model.embed.weight.detach().clone().requires_grad_()
    head = model.head.weight.detach().clone().requires_grad_()
    ref_embed = torch.optim.AdamW([embed], lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=0.0)
    ref_head = torch.optim.AdamW([head], lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=0.1)
    x = torch.randint(0, VOCAB, (2, 16))
    for step in (1, 2, 3):
        base = set_lr(opt, step, cfg)
        model(x, x).backward()
        embed.grad, head.grad = model.embed.weight.grad.clone(), model.head.weight.grad.clone()
        ref_embed.param_groups[0]["lr"] = base * cfg.embed_lr / cfg.lr
        ref_head.param_groups[0]["lr"] = base * (head_lr or cfg.lr) / cfg.lr
        opt.step()
        opt.zero_grad()
        ref_embed.step()
        ref_head.step()
    torch.testing.assert_close(model.embed.weight, embed, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.head.weight, head, rtol=0, atol=1e-7)
    assert (model.embed.weight - build(seed=3).embed.weight).abs().max() > 0.01   # it did move at ~0.05 * 3/4


def test_embed_lr_leaves_a_tied_embedding_with_the_head():
    model = build(tie_embeddings=True)
    for optimizer in ("muon", "adamw"):
        plain = build_optimizer(model, muon_cfg(optimizer=optimizer, embed_lr=0.0), torch.device("cpu"))
        with_rate = build_optimizer(model, muon_cfg(optimizer=optimizer, embed_lr=0.05), torch.device("cpu"))
        shape = [(len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in plain.param_groups]
        assert [(len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in with_rate.param_groups] == shape


# ----------------------------------------------------------------------------------------------------------------
# Recipe options in ModelArgs


def test_zero_init_out_zeroes_output_projections_only():
    model = build(zero_init_out=True)
    for name, p in model.named_parameters():
        if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
            assert not p.any(), name
        elif not name.endswith("norm.weight"):
            assert p.std() > 0, name
    # every block is the identity at step 0: the output is the head applied to the normed embedding
    x = torch.randint(0, VOCAB, (2, 8))
    expected = model.head(model.norm(model.embed(x)))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("attn_type", ["mla", "mha"])
def test_qk_norm_normalises_queries_and_decode_matches_forward(attn_type):
    torch.manual_seed(0)
    model = build(qk_norm=True, attn_type=attn_type).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_head_norm.weight", "k_pe_norm.weight", "k_head_norm.weight")):
                p.uniform_(0.5, 1.5)
    x = torch.randint(0, VOCAB, (2, 10))
    full = model(x)
    model.setup_cache(2, 12)
    steps = [model(x[:, :6], start_pos=0)] + [model(x[:, t:t + 1], start_pos=t) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    # scaling the query projection changes nothing: the query is normalised
    attn = model.layers[0].attn
    q_proj = attn.wq
    before = model(x)
    with torch.no_grad():
        q_proj.weight.mul_(7.0)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)   # up to the norm epsilon


def test_logit_softcap_matches_plain_cross_entropy_on_capped_logits():
    model = build(logit_softcap=2.0)
    with torch.no_grad():
        model.head.weight.mul_(50.0)                  # logits far beyond the cap
    x = torch.randint(0, VOCAB, (2, 9))
    logits = model(x[:, :-1])
    assert logits.abs().max() <= 2.0
    uncapped = build(logit_softcap=0.0)
    uncapped.load_state_dict(model.state_dict())
    z = uncapped(x[:, :-1]).double()
    torch.testing.assert_close(logits.double(), 2.0 * torch.tanh(z / 2.0), rtol=1e-5, atol=1e-5)
    loss = model(x[:, :-1], x[:, 1:])
    expected = F.cross_entropy((2.0 * torch.tanh(z / 2.0)).flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_mode():
    model = build(dropout=0.3)
    plain = build(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, VOCAB, (2, 9))
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train(), plain.train()
    torch.manual_seed(0)
    a = model(x[:, :-1], x[:, 1:])
    torch.manual_seed(0)
    b = plain(x[:, :-1], x[:, 1:])
    assert not torch.allclose(a, b)


def test_hf_export_refuses_what_deepseek_v3_cannot_express():
    from hf_interop import unsupported_options

    assert unsupported_options(small_args(norm_eps=1e-6, dropout=0.1, zero_init_out=True)) == \
        unsupported_options(small_args(norm_eps=1e-6))
    problems = unsupported_options(small_args(qk_norm=True, logit_softcap=15.0))
    assert any(p.startswith("qk_norm") for p in problems)
    assert any(p.startswith("logit_softcap") for p in problems)
