"""model.py against independent references: naive MLA vs absorbed decode, causality, MoE dispatch vs a per-token
loop (forward and gradients; the gate, group-limited routing and the shared expert included), aux-loss-free
balancing, the sequence-wise balance loss, meta-device construction, parameter and FLOP counts; the fused LM head
+ cross-entropy (every reduction, both gradients) against F.cross_entropy on full float64 logits; every attention
path against explicit-loop float64 softmax(QK^T * scale + mask) V; every preset's counts and a forward pass."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import ModelArgs
from model import MoE, Experts, Transformer, linear_cross_entropy


pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def small_args(**kw) -> ModelArgs:
    base = dict(vocab_size=VOCAB, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=4,
                max_seq_len=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2)
    base.update(kw)
    return ModelArgs(**base)


def build(dtype=torch.float64, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(small_args(**kw))
    model.init_weights()
    # larger weights than the training init so that attention and routing are far from uniform
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.to(dtype).eval()


ATTN_VARIANTS = {
    "mla": dict(),
    "mla-qlora": dict(q_lora_rank=12),
    "mla-window": dict(sliding_window=5, sliding_window_layers="0,2"),
    "mha": dict(attn_type="mha"),
    "gqa-window": dict(attn_type="mha", n_kv_heads=2, sliding_window=4),
}


def decode_logits(model: Transformer, tokens: torch.Tensor, prompt_len: int, pad=None) -> torch.Tensor:
    """Prefill tokens[:, :prompt_len], then decode the rest one token at a time; logits for every slot."""
    B, T = tokens.shape
    model.setup_cache(B, T + 3)
    out = [model(tokens[:, :prompt_len], start_pos=0, pad=pad)]
    for t in range(prompt_len, T):
        out.append(model(tokens[:, t:t + 1], start_pos=t, pad=pad))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@torch.no_grad()
def test_cached_decode_matches_naive_forward(variant, dtype, tol):
    model = build(dtype, **ATTN_VARIANTS[variant])
    tokens = torch.randint(0, VOCAB, (3, 18))
    ref = model(tokens)
    got = decode_logits(model, tokens, prompt_len=5)
    assert (got - ref).abs().max().item() < tol
    model.setup_cache(3, 18)  # a prefill that keeps only the last position's logits (what generate.py asks for)
    last = model(tokens[:, :7], start_pos=0, last_only=True)
    assert last.shape == (3, 1, VOCAB) and (last[:, 0] - ref[:, 6]).abs().max().item() < tol


@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(variant):
    model = build(torch.float64, **ATTN_VARIANTS[variant])
    T = 16
    lengths = [16, 11, 7]
    rows = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    pad = torch.tensor([T - n for n in lengths])
    tokens = torch.stack([torch.cat([torch.zeros(T - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    got = decode_logits(model, tokens, prompt_len=9, pad=pad)
    for b, row in enumerate(rows):
        ref = model(row.unsqueeze(0))[0]
        assert (got[b, pad[b]:] - ref).abs().max().item() < 1e-5


@torch.no_grad()
def test_mla_cache_holds_only_latent_and_rope_key():
    args = small_args()
    model = build(torch.float32)
    model.setup_cache(2, 10)
    per_token = args.kv_lora_rank + args.qk_rope_head_dim
    for layer in model.layers:
        assert tuple(layer.attn.kv_cache.shape) == (2, 10, per_token)
    assert model.cache_bytes() == args.n_layers * 2 * 10 * per_token * 4


@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
@torch.no_grad()
def test_causality(variant):
    model = build(torch.float64, **ATTN_VARIANTS[variant])
    tokens = torch.randint(0, VOCAB, (2, 20))
    ref = model(tokens)
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = model(changed)
        # not bit-exact: a changed token changes how many tokens each expert's matmul sees (BLAS blocking)
        assert (out[:, :t] - ref[:, :t]).abs().max().item() < 1e-12 if t else True
        assert (out[:, t] - ref[:, t]).abs().max().item() > 1e-3


def test_meta_construction_then_init_weights():
    torch.manual_seed(0)
    args = small_args()
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (2, 12))
    loss = model(tokens, tokens)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0
    loss.backward()


# ----------------------------------------------------------------------------------------------------------------
# Mixture of experts: the sorted dispatch, the gate and the shared expert against per-token loops


def swiglu_ref(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One token through one SwiGLU with plain matmuls: x [D], w1/w3 [I, D], w2 [D, I]."""
    a = w1 @ x
    return w2 @ (a * torch.sigmoid(a) * (w3 @ x))


def distinct_indices(n: int, k: int, allowed: list[int], gen: torch.Generator) -> torch.Tensor:
    """[n, k] expert ids drawn from `allowed`, no repeat within a row (a top-k never repeats an expert)."""
    rows = [torch.tensor(allowed)[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(n)]
    return torch.stack(rows)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], probe: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * probe).sum(), inputs, allow_unused=False))


@pytest.mark.parametrize("n,k,allowed", [
    (24, 3, [0, 2, 3, 5, 6]),        # experts 1, 4 and 7 (the last one too) get no token
    (10, 1, [4]),                    # a single expert runs (one output slice, no concatenation)
    (40, 2, list(range(8))),         # every expert
])
def test_experts_dispatch_matches_per_token_loop(n, k, allowed):
    gen = torch.Generator().manual_seed(n)
    E, D, inter = 8, 12, 7
    experts = Experts(E, D, inter).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(n, k, generator=gen, dtype=torch.float64).requires_grad_()
    indices = distinct_indices(n, k, allowed, gen)
    unused = sorted(set(range(E)) - set(allowed))
    assert set(torch.bincount(indices.flatten(), minlength=E).eq(0).nonzero().flatten().tolist()) == set(unused)

    got = experts(x, weights, indices)
    w1, w2, w3 = (p.detach().clone().requires_grad_() for p in (experts.w1, experts.w2, experts.w3))
    ref = torch.stack([sum(weights[t, j] * swiglu_ref(x[t], w1[e], w2[e], w3[e])
                           for j, e in enumerate(indices[t].tolist())) for t in range(n)])
    assert (got - ref).abs().max().item() < 1e-12

    probe = torch.randn(n, D, generator=gen, dtype=torch.float64)
    g_got = grads(got, [x, weights, experts.w1, experts.w2, experts.w3], probe)
    g_ref = grads(ref, [x, weights, w1, w2, w3], probe)
    for name, a, b in zip(("x", "weights", "w1", "w2", "w3"), g_got, g_ref):
        assert (a - b).abs().max().item() < 1e-10, name
    for g in g_got[2:]:                                   # experts without tokens get exactly zero gradient
        assert g[unused].abs().max().item() == 0.0 if unused else True

    # the counts MoE passes in (bincount of the indices) give the same result
    again = experts(x, weights, indices, torch.bincount(indices.flatten(), minlength=E))
    assert torch.equal(again, got)

    # inference on one token (the decode path: its K experts only, no sorting) gives the reference too
    with torch.no_grad():
        for t in (0, n - 1):
            one = experts(x[t:t + 1], weights[t:t + 1], indices[t:t + 1])
            assert (one - ref[t:t + 1]).abs().max().item() < 1e-12


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_linear_decode_path_equals_the_product(rows, threads):
    """model.linear's CPU decode path (weight row blocks x x.T in one bmm) against float64 x @ W.T: values,
    a contiguous row-major result, and F.linear itself whenever autograd needs the graph."""
    from model import linear

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(rows * 10 + threads)
        w = torch.randn(36, 20, generator=gen, dtype=torch.float64)
        x = torch.randn(2, rows, 20, generator=gen, dtype=torch.float64)        # 2 * rows rows
        with torch.no_grad():
            y = linear(x, w)
        assert y.shape == (2, rows, 36) and y.is_contiguous()
        assert (y - x @ w.T).abs().max().item() < 1e-12
        wg = w.clone().requires_grad_()
        y = linear(x, wg)
        y.sum().backward()
        assert y.grad_fn is not None and torch.allclose(wg.grad, x.reshape(-1, 20).sum(0).expand(36, 20))
        y32 = linear(x.float()[:, :1], w.float()[:35])                           # 35 rows: not divisible, F.linear
        assert (y32.double() - x[:, :1] @ w[:35].T).abs().max().item() < 1e-4
    finally:
        torch.set_num_threads(before)


def naive_route(s: list[float], sel: list[float], args: ModelArgs) -> list[int]:
    """Top-k experts by selection score `sel`, restricted to the n_limited_groups best groups when
    n_expert_groups > 1 (a group's score: the sum of its two best selection scores, or its only one)."""
    E, G = len(s), args.n_expert_groups
    allowed = list(range(E))
    if G > 1:
        size = E // G
        group_score = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(G)]
        best_groups = sorted(range(G), key=lambda g: -group_score[g])[:args.n_limited_groups]
        allowed = [e for e in range(E) if e // size in best_groups]
    return sorted(allowed, key=lambda e: -sel[e])[:args.n_activated_experts]


def naive_moe(moe: MoE, x: torch.Tensor, args: ModelArgs, params: dict[str, torch.Tensor]):
    """Per-token reference of MoE.forward from the parameters in `params`: (output [N, D], weights [N, K],
    indices [N, K], scores [N, E])."""
    out, all_w, all_idx, all_scores = [], [], [], []
    bias = moe.gate.bias.tolist()
    for t in range(x.size(0)):
        logits = params["gate"] @ x[t]                                          # [E]
        if args.score_func == "softmax":
            e = torch.exp(logits - logits.max())
            s = e / e.sum()
        else:
            s = 1 / (1 + torch.exp(-logits))
        chosen = naive_route(s.tolist(), [v + b for v, b in zip(s.tolist(), bias)], args)
        w = s[chosen]
        if args.score_func == "sigmoid":
            w = w / w.sum()
        w = w * args.route_scale
        y = sum(w[j] * swiglu_ref(x[t], params["w1"][e], params["w2"][e], params["w3"][e])
                for j, e in enumerate(chosen))
        if args.n_shared_experts:
            y = y + swiglu_ref(x[t], params["s1"], params["s2"], params["s3"])
        out.append(y)
        all_w.append(w)
        all_idx.append(torch.tensor(chosen))
        all_scores.append(s)
    return torch.stack(out), torch.stack(all_w), torch.stack(all_idx), torch.stack(all_scores)


MOE_VARIANTS = {
    "softmax": dict(score_func="softmax", route_scale=1.5),
    "sigmoid": dict(score_func="sigmoid", route_scale=2.5, n_shared_experts=2),
    "softmax-groups": dict(score_func="softmax", n_activated_experts=3, n_expert_groups=4, n_limited_groups=2),
    "sigmoid-groups": dict(score_func="sigmoid", route_scale=2.5, n_activated_experts=3, n_expert_groups=4,
                           n_limited_groups=2, n_shared_experts=0),
    "sigmoid-groups-of-one": dict(score_func="sigmoid", n_expert_groups=8, n_limited_groups=3),
}


def random_moe(seed: int, **kw) -> tuple[MoE, ModelArgs]:
    args = small_args(dim=16, moe_inter_dim=6, **kw)
    torch.manual_seed(seed)
    moe = MoE(args).double()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0.0, 0.6 if name == "gate.weight" else 0.4)
        moe.gate.bias.normal_(0.0, 0.05)          # the balancing bias: it must steer the choice, never the weights
    return moe, args


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_matches_naive_gate_and_per_token_loop(variant):
    moe, args = random_moe(1, **MOE_VARIANTS[variant])
    x = torch.randn(3, 16, args.dim, dtype=torch.float64, requires_grad=True)
    got = moe(x)
    weights, indices, scores = moe.gate(x.view(-1, args.dim))

    live = {"gate": moe.gate.weight, "w1": moe.experts.w1, "w2": moe.experts.w2, "w3": moe.experts.w3}
    if args.n_shared_experts:
        live.update(s1=moe.shared_experts.w1.weight, s2=moe.shared_experts.w2.weight, s3=moe.shared_experts.w3.weight)
    params = {k: v.detach().clone().requires_grad_() for k, v in live.items()}
    ref, ref_w, ref_idx, ref_scores = naive_moe(moe, x.view(-1, args.dim), args, params)

    assert torch.equal(indices, ref_idx)
    assert (weights - ref_w).abs().max().item() < 1e-12
    assert (scores - ref_scores).abs().max().item() < 1e-12
    assert (got.view(-1, args.dim) - ref).abs().max().item() < 1e-12
    # the configuration really exercises what it names: the bias and the group limit change some choices
    unbiased = scores.topk(args.n_activated_experts, dim=-1)[1]
    biased = (scores + moe.gate.bias).topk(args.n_activated_experts, dim=-1)[1]
    assert (unbiased != indices).any()
    if args.n_routed_experts // args.n_expert_groups > 1:
        assert (biased != indices).any() if args.n_expert_groups > 1 else torch.equal(biased, indices)
    else:                   # groups of one expert (the amax branch), n_limited_groups >= k: plain top-k
        assert torch.equal(biased, indices)

    probe = torch.randn_like(ref)
    names = list(live)
    g_got = grads(got.view(-1, args.dim), [x, *live.values()], probe)
    g_ref = grads(ref, [x, *params.values()], probe)
    for name, a, b in zip(["x", *names], g_got, g_ref):
        assert (a - b).abs().max().item() < 1e-10, name


# ----------------------------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing


@pytest.mark.parametrize("score_func,groups", [("softmax", (1, 1)), ("sigmoid", (1, 1)), ("sigmoid", (4, 2))])
def test_aux_loss_free_balancing_evens_out_a_skewed_router(score_func, groups):
    """Tokens share a common direction u and the router's rows for experts 0 and 1 point along it, so those two
    win nearly every token. Training-mode forwards + update_balance_bias alone (no gradient step) must even the
    load out; the bias changes which experts are chosen, never the weights they get."""
    torch.manual_seed(7)
    args = small_args(n_layers=1, n_dense_layers=0, score_func=score_func, n_expert_groups=groups[0],
                      n_limited_groups=groups[1], bias_update_speed=0.002)
    model = Transformer(args)
    model.init_weights()
    D = args.dim
    u = F.normalize(torch.randn(D), dim=0)
    moe = model.layers[0].ffn
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0).add_(3.0 * u)
        moe.gate.weight.normal_(0.0, D ** -0.5)            # token-dependent router logits of spread ~1
        moe.gate.weight[:2] += u                            # experts 0 and 1: about +3 on every token
    tokens = torch.randint(0, VOCAB, (8, 64))
    seen = []
    moe.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().reshape(-1, D)))

    with torch.no_grad():
        model.eval()
        model(tokens)
        assert model.expert_load().sum().item() == 0       # eval forwards are not counted
        model.train()
        loads = []
        for _ in range(300):
            model(tokens)
            loads.append(model.expert_load()[0].double())
            model.update_balance_bias()
            assert model.expert_load().sum().item() == 0   # the counts restart after every update
    loads = torch.stack(loads)                              # [updates, E]
    assert (loads.sum(dim=1) == tokens.numel() * args.n_activated_experts).all()   # no token is dropped
    ratio = loads.amax(dim=1) / loads.mean(dim=1)
    tail = loads[-50:].sum(dim=0)
    assert ratio[0].item() > 2.5
    assert (tail.max() / tail.mean()).item() < 1.3          # the load over the last 50 batches
    assert ratio[-50:].max().item() < 1.8                   # and every single batch's
    bias = moe.gate.bias
    assert bias[:2].mean() < bias[2:].mean() - 0.1          # the favoured experts were pushed down

    # the bias steers the selection only: the weights are the unbiased scores at the chosen experts
    x = seen[-1]
    weights, indices, scores = moe.gate(x)
    logits = x @ moe.gate.weight.t()
    plain = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    assert (scores - plain).abs().max().item() < 1e-6
    expect = plain.gather(1, indices)
    if score_func == "sigmoid":
        expect = expect / expect.sum(dim=-1, keepdim=True)
    assert (weights - expect * args.route_scale).abs().max().item() < 1e-6
    unbiased_choice = plain.topk(args.n_activated_experts, dim=-1)[1].sort(dim=-1)[0]
    assert (unbiased_choice != indices.sort(dim=-1)[0]).any(dim=-1).float().mean().item() > 0.3

    # speed 0: the counts still reset, the bias stays
    model.args.bias_update_speed = 0.0
    before = bias.clone()
    model(tokens)
    model.update_balance_bias()
    assert torch.equal(bias, before) and model.expert_load().sum().item() == 0


# ----------------------------------------------------------------------------------------------------------------
# Sequence-wise auxiliary balance loss


def aux_loss_ref(scores: torch.Tensor, indices: torch.Tensor, E: int, K: int, alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence, averaged over sequences, with explicit loops (DeepSeek-V3 eq. 17-20):
    f_i = E / (K T) * #{t : i chosen at t}, P_i = 1/T * sum_t s_{t,i} / sum_j s_{t,j}."""
    B, T, _ = scores.shape
    total = 0.0
    for b in range(B):
        per_seq = 0.0
        for i in range(E):
            hits = sum(1 for t in range(T) if i in indices[b, t].tolist())
            f = E / (K * T) * hits
            P = sum(scores[b, t, i] / scores[b, t].sum() for t in range(T)) / T
            per_seq = per_seq + f * P
        total = total + alpha * per_seq
    return total / B


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_aux_loss_matches_hand_computation(score_func):
    gen = torch.Generator().manual_seed(3)
    B, T, E, K, alpha = 3, 10, 8, 3, 0.01
    moe, args = random_moe(2, score_func=score_func, n_activated_experts=K, aux_loss_alpha=alpha)
    logits = torch.randn(B, T, E, generator=gen, dtype=torch.float64) * 2
    scores = (logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()).requires_grad_()
    indices = distinct_indices(B * T, K, list(range(E)), gen).view(B, T, K)
    got = moe.sequence_aux_loss(scores, indices)
    ref = aux_loss_ref(scores, indices, E, K, alpha)
    assert abs(got.item() - ref.item()) < 1e-14
    g_got, = torch.autograd.grad(got, scores)
    g_ref, = torch.autograd.grad(ref, scores)
    assert (g_got - g_ref).abs().max().item() < 1e-14
    # perfectly even routing and uniform affinities: f_i = 1 and P_i = 1/E, so the loss is alpha
    flat = torch.full((1, E, E), 1.0 / E, dtype=torch.float64)
    even = torch.arange(E * K).remainder(E).view(1, E, K)
    assert abs(moe.sequence_aux_loss(flat, even).item() - alpha) < 1e-15

    # inside MoE.forward (training mode only), from the gate's own unbiased scores and biased choice
    x = torch.randn(B, T, args.dim, generator=gen, dtype=torch.float64)
    moe.eval()
    moe(x)
    assert moe.aux_loss is None
    moe.train()
    moe(x)
    _, idx, s = moe.gate(x.view(-1, args.dim))
    ref = aux_loss_ref(s.view(B, T, E), idx.view(B, T, K), E, K, alpha)
    assert abs(moe.aux_loss.item() - ref.item()) < 1e-14


def test_training_loss_adds_every_layers_aux_loss():
    model = build(torch.float64, aux_loss_alpha=0.03, n_layers=3, n_dense_layers=1).train()
    tokens = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))
    targets[0, :3] = -1
    routes = []
    for moe in model.moe_layers():
        moe.gate.register_forward_hook(lambda mod, inp, out: routes.append((out[1], out[2])))
    loss = model(tokens, targets)
    assert len(routes) == 2
    aux = sum(aux_loss_ref(s.view(2, 12, -1), idx.view(2, 12, -1), 8, 2, 0.03) for idx, s in routes)
    logits = model(tokens)
    ce = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1)
    assert aux.item() > 0.03     # two layers, each at least alpha-ish
    assert abs(loss.item() - (ce + aux).item()) < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Parameter and FLOP accounting


def count_ref(a: ModelArgs) -> tuple[int, int, int]:
    """(num_params(), num_params(active=True), every stored parameter) from the architecture formula."""
    D, H, V = a.dim, a.n_heads, a.vocab_size
    if a.attn_type == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = D * H * qk if a.q_lora_rank == 0 else D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk
        kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
            + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
        attn = q + kv + H * a.v_head_dim * D
    else:
        hd, kvh = a.head_dim or D // H, a.n_kv_heads or H
        attn = D * H * hd + 2 * D * kvh * hd + H * hd * D
    expert = 3 * D * a.moe_inter_dim
    dense_ffn = 3 * D * a.inter_dim
    moe_ffn = a.n_routed_experts * D + a.n_routed_experts * expert + a.n_shared_experts * expert
    n_moe = a.n_layers - min(a.n_dense_layers, a.n_layers)
    body = a.n_layers * (attn + 2 * D) + (a.n_layers - n_moe) * dense_ffn + n_moe * moe_ffn + D
    total = body + V * D                              # the head (or the tied embedding, counted once)
    active = total - n_moe * (a.n_routed_experts - a.n_activated_experts) * expert
    stored = body + V * D * (1 if a.tie_embeddings else 2)
    return total, active, stored


def flops_ref(a: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token = 3 x forward; forward = 2 FLOPs per active matmul weight + per layer the score
    product q.k (2 * qk per head per attended key) and the value product p.v (2 * v per head per attended key)."""
    _, active, _ = count_ref(a)
    forward = 2.0 * active
    for layer in range(a.n_layers):
        windowed = a.sliding_window > 0 and (not a.sliding_window_layers or
                                             str(layer) in a.sliding_window_layers.split(","))
        keys = min(seq_len, a.sliding_window) if windowed else seq_len
        if a.attn_type == "mla":
            qk_dim, v_dim = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        else:
            qk_dim = v_dim = a.head_dim or a.dim // a.n_heads
        forward += a.n_heads * keys * (2 * qk_dim + 2 * v_dim)
    return 3.0 * forward


COUNT_VARIANTS = {
    "mla": dict(),
    "mla-qlora": dict(q_lora_rank=12),
    "mla-tied": dict(tie_embeddings=True),
    "mla-qlora-tied-window": dict(q_lora_rank=12, tie_embeddings=True, sliding_window=5, sliding_window_layers="0,2"),
    "mla-groups-2shared": dict(n_routed_experts=12, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2,
                               n_shared_experts=2, n_layers=4, n_dense_layers=2),
    "dense": dict(n_dense_layers=3),
    "gqa-window": dict(attn_type="mha", n_kv_heads=2, head_dim=6, sliding_window=4),
}


@pytest.mark.parametrize("variant", list(COUNT_VARIANTS))
def test_num_params_and_flops_match_the_architecture_formula(variant):
    args = small_args(**COUNT_VARIANTS[variant])
    with torch.device("meta"):
        model = Transformer(args)
    total, active, stored = count_ref(args)
    assert sum(p.numel() for p in model.parameters()) == stored
    assert model.num_params() == total
    assert model.num_params(active=True) == active
    if args.n_dense_layers >= args.n_layers:
        assert active == total
    else:
        assert active < total
    for seq_len in (3, 64):
        assert model.flops_per_token(seq_len) == pytest.approx(flops_ref(args, seq_len), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# The fused LM head + cross-entropy against F.cross_entropy on full float64 logits


def loss_inputs(dtype, seed=0, B=3, T=7, D=16, V=53):
    """h [B, T, D], head weight [V, D] (leaf tensors of `dtype`), targets [B, T] with ignored tokens: scattered
    ones and the whole of row 1 (a sequence with nothing to predict)."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=gen, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.8).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, 2] = targets[2, 0] = targets[2, 6] = -1
    targets[1] = -1
    return h, w, targets


def loss_reference(h, w, targets, reduction, probe=None):
    """F.cross_entropy on the full logits, everything in float64 from the same (rounded) input values:
    (loss, dloss/dh, dloss/dw); `probe` weights the per-token losses of reduction "none"."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logits = h64 @ w64.T                                                        # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
    if reduction == "none":
        loss = loss.view(targets.shape)
    out = (loss * probe).sum() if probe is not None else loss * 1.7
    gh, gw = torch.autograd.grad(out, (h64, w64))
    return loss.detach(), gh, gw


def loss_and_grads(h, w, targets, reduction, chunk_size, probe=None):
    loss = linear_cross_entropy(h, w, targets, ignore_index=-1, chunk_size=chunk_size, reduction=reduction)
    out = (loss * probe).sum() if probe is not None else loss * 1.7             # a non-unit upstream gradient
    gh, gw = torch.autograd.grad(out, (h, w))
    return loss.detach(), gh, gw


# 21 tokens: chunks of 4 (six chunks, the last one of a single token), 7 (three even chunks), 21 (one), 64 (> N)
CHUNKS = [4, 7, 21, 64]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_loss_and_both_gradients_match_full_logits(reduction, chunk_size, dtype, tol):
    h, w, targets = loss_inputs(dtype)
    probe = None
    if reduction == "none":
        probe = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, ref_h, ref_w = loss_reference(h, w, targets, reduction, probe)
    got, got_h, got_w = loss_and_grads(h, w, targets, reduction, chunk_size, None if probe is None else probe.to(dtype))
    assert got.shape == ref.shape and got.dtype == torch.promote_types(dtype, torch.float32)
    assert got_h.dtype == h.dtype and got_w.dtype == w.dtype
    assert (got.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())
    for name, a, b in (("h", got_h, ref_h), ("weight", got_w, ref_w)):
        assert (a.double() - b).abs().max().item() < tol * b.abs().max().item(), name
    if reduction == "none":
        assert (got[targets == -1] == 0).all() and (got_h[1] == 0).all()      # ignored tokens: no loss, no gradient


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_bf16_within_stated_tolerance(reduction):
    """bf16 inputs: the logits come out of a bf16 matmul (8 significant bits: each off by up to 2^-9 of its size)
    and dloss/dlogits is rounded to bf16 before its two matmuls. Stated tolerance against float64 math on the same
    bf16 values: each token's loss (log-sum-exp minus the target logit) within 2 x 2^-8 of the largest |logit|
    (the "sum" of n tokens within n times that), each gradient within 2% of its largest entry."""
    h, w, targets = loss_inputs(torch.bfloat16, seed=2)
    per_token = 2 * 2 ** -8 * (h.detach().double() @ w.detach().double().T).abs().max().item()
    probe = None
    if reduction == "none":
        probe = torch.randn(targets.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, ref_h, ref_w = loss_reference(h, w, targets, reduction, probe)
    got, got_h, got_w = loss_and_grads(h, w, targets, reduction, 4, None if probe is None else probe.to(torch.bfloat16))
    assert got.dtype == torch.float32 and got_h.dtype == got_w.dtype == torch.bfloat16
    counted = (targets != -1).sum().item() if reduction == "sum" else 1
    assert (got.double() - ref).abs().max().item() < per_token * counted
    for name, a, b in (("h", got_h, ref_h), ("weight", got_w, ref_w)):
        assert (a.double() - b).abs().max().item() < 0.02 * b.abs().max().item(), name


def test_fused_loss_under_bf16_autocast():
    """fp32 inputs under CPU bf16 autocast (how training runs with --dtype bf16): the logits matmul runs in bf16.
    Every reduction's gradients within 2% of float64 math, and "none" (whose backward recomputes the logits under
    the forward's autocast) weighted by 1/n agrees with "mean" to float32 rounding."""
    h, w, targets = loss_inputs(torch.float32, seed=2)
    n = (targets != -1).sum()
    _, ref_h, ref_w = loss_reference(h, w, targets, "mean")
    got = {}
    for reduction in ("mean", "none"):
        with torch.autocast("cpu", torch.bfloat16):
            loss = linear_cross_entropy(h, w, targets, chunk_size=4, reduction=reduction)
        assert loss.dtype == torch.float32
        got[reduction] = torch.autograd.grad(loss.sum() * 1.7 / (n if reduction == "none" else 1), (h, w))
        for a, b in zip(got[reduction], (ref_h, ref_w)):
            assert a.dtype == torch.float32 and (a.double() - b).abs().max().item() < 0.02 * b.abs().max().item()
    for a, b in zip(got["mean"], got["none"]):
        assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_with_every_token_ignored_is_zero(reduction):
    """Where F.cross_entropy's mean is 0/0 = nan, ours is 0 with zero gradients (an all-padding micro-batch
    must not poison the accumulated gradient)."""
    h, w, targets = loss_inputs(torch.float64)
    targets = torch.full_like(targets, -1)
    got, got_h, got_w = loss_and_grads(h, w, targets, reduction, 4,
                                       torch.ones(targets.shape, dtype=torch.float64) if reduction == "none" else None)
    assert (got == 0).all() and (got_h == 0).all() and (got_w == 0).all()


def test_fused_loss_rejects_an_unknown_reduction():
    h, w, targets = loss_inputs(torch.float64)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, reduction="avg")


# ----------------------------------------------------------------------------------------------------------------
# Transformer.forward's loss path: reductions, gradients through the whole model, no full logits kept


def model_loss_reference(model, tokens, targets, reduction, probe=None):
    """The model's own full logits (its forward without targets) in float64 -> F.cross_entropy, and the gradients
    of every parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens)                                                      # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
    loss = loss.view(targets.shape) if reduction == "none" else loss
    ((loss * probe).sum() if probe is not None else loss).backward()
    grads_ = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads_


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tie,chunk", [(False, 0), (True, 0), (False, 7)])
def test_model_loss_reductions_match_full_logits(reduction, tie, chunk):
    """Chunk 0: the default size (one chunk here); 7: five chunks of the 30 tokens, the last one of 2."""
    model = build(torch.float64, tie_embeddings=tie)
    model.loss_chunk_size = chunk
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (3, 10), generator=gen)
    targets = torch.randint(0, VOCAB, (3, 10), generator=gen)
    targets[0, :4] = -1                                                         # a masked prompt
    targets[2] = -1                                                             # a row with nothing to predict
    probe = torch.randn(3, 10, generator=gen, dtype=torch.float64) if reduction == "none" else None
    ref, ref_grads = model_loss_reference(model, tokens, targets, reduction, probe)
    loss = model(tokens, targets, reduction=reduction)
    assert loss.shape == ref.shape and (loss - ref).abs().max().item() < 1e-12
    ((loss * probe).sum() if probe is not None else loss).backward()
    got_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got_grads.keys() == ref_grads.keys() and ("head.weight" in got_grads) != tie
    for name, g in ref_grads.items():
        assert (got_grads[name] - g).abs().max().item() < 1e-10 * max(1.0, g.abs().max().item()), name
    if reduction == "none":
        assert (loss[targets == -1] == 0).all()


def test_per_sequence_log_probs_for_preference_tuning():
    """What DPO/GRPO/SFT take from the model: log p(completion | prompt) per sequence = -(per-token NLL summed over
    the completion), differentiable. Checked against log_softmax of full float64 logits gathered token by token."""
    model = build(torch.float64, seed=4)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=gen)
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -1
    targets[0, :3] = targets[1, :5] = -1                                        # prompts of 3 and 5 tokens
    coef = torch.tensor([0.7, -1.3], dtype=torch.float64)                      # e.g. DPO's chosen / rejected
    logp = -model(tokens, targets, reduction="none").sum(dim=1)                 # [B]
    (coef * logp).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logprobs = model(tokens).log_softmax(dim=-1)                                # [B, T, V]
    ref = torch.stack([sum(logprobs[b, t, targets[b, t]] for t in range(9) if targets[b, t] >= 0)
                       for b in range(2)])
    (coef * ref).sum().backward()
    assert (logp - ref).abs().max().item() < 1e-12
    for name, p in model.named_parameters():
        assert (got[name] - p.grad).abs().max().item() < 1e-10 * max(1.0, p.grad.abs().max().item()), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_aux_loss_only_in_the_mean_reduction(reduction):
    model = build(torch.float64, aux_loss_alpha=0.05).train()
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=gen)
    targets = torch.randint(0, VOCAB, (2, 12), generator=gen)
    loss = model(tokens, targets, reduction=reduction)
    aux = sum(moe.aux_loss for moe in model.moe_layers())
    logits = model(tokens)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    expect = ce + aux if reduction == "mean" else ce.view_as(loss)
    assert aux.item() > 0.05 and (loss - expect).abs().max().item() < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_path_never_saves_full_logits(reduction):
    """Every tensor autograd saves for backward: none has the shape of the [N, vocab] logits."""
    model = build(torch.float32, n_routed_experts=4, moe_inter_dim=8, n_shared_experts=0)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    N = tokens.numel()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens, reduction=reduction)
    loss.sum().backward()
    assert saved and not [s for s in saved if s and s[-1] == VOCAB and torch.Size(s).numel() >= N * VOCAB]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):          # the check sees full logits
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert [s for s in saved if s and s[-1] == VOCAB and torch.Size(s).numel() >= N * VOCAB]


# ----------------------------------------------------------------------------------------------------------------
# Attention against explicit float64 references: softmax(Q K^T * scale + mask) V per head and query, from each
# attention module's own weights and the inputs it received inside the model (captured with hooks), on every path


def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rope_ref(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """x [..., d] at position pos: pairs (x[2j], x[2j+1]) rotated by the angle pos * theta^(-2j/d)."""
    d, out = x.size(-1), x.clone()
    for j in range(d // 2):
        angle = pos * theta ** (-2 * j / d)
        c, s = math.cos(angle), math.sin(angle)
        out[..., 2 * j] = x[..., 2 * j] * c - x[..., 2 * j + 1] * s
        out[..., 2 * j + 1] = x[..., 2 * j] * s + x[..., 2 * j + 1] * c
    return out


def qkv_ref(attn, x: torch.Tensor, positions: list[int], a: ModelArgs):
    """One sequence x [S, D] at `positions` -> per-head q [S, H, dqk], k [S, H, dqk], v [S, H, dv] and the
    softmax scale 1/sqrt(dqk), written from the architecture (MLA: the latent expanded per head, the RoPE key
    shared by the heads; GQA: query head h reads key/value head h // (H / H_kv))."""
    W = lambda m: m.weight.detach().double()                                   # noqa: E731
    S, H, theta = x.size(0), a.n_heads, a.rope_theta
    if a.attn_type == "mla":
        nope, rope, dv, r = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_lora_rank:
            q = rms_ref(x @ W(attn.wq_a).T, W(attn.q_norm), a.norm_eps) @ W(attn.wq_b).T
        else:
            q = x @ W(attn.wq).T
        q = q.view(S, H, nope + rope)
        latent = x @ W(attn.wkv_a).T                                            # [S, r + rope]
        kv = (rms_ref(latent[:, :r], W(attn.kv_norm), a.norm_eps) @ W(attn.wkv_b).T).view(S, H, nope + dv)
        q = torch.stack([torch.cat([q[t, :, :nope], rope_ref(q[t, :, nope:], positions[t], theta)], -1)
                         for t in range(S)])
        k = torch.stack([torch.cat([kv[t, :, :nope], rope_ref(latent[t, r:], positions[t], theta).expand(H, rope)],
                                   -1) for t in range(S)])
        return q, k, kv[:, :, nope:], (nope + rope) ** -0.5
    hkv = a.n_kv_heads or H
    hd = a.head_dim or a.dim // H
    q = (x @ W(attn.wq).T).view(S, H, hd)
    k = (x @ W(attn.wk).T).view(S, hkv, hd)
    v = (x @ W(attn.wv).T).view(S, hkv, hd)
    q = torch.stack([rope_ref(q[t], positions[t], theta) for t in range(S)])
    k = torch.stack([rope_ref(k[t], positions[t], theta) for t in range(S)])
    kv_head = [h // (H // hkv) for h in range(H)]
    return q, k[:, kv_head], v[:, kv_head], hd ** -0.5


def attend_ref(q, k, v, scale: float, keys_of) -> torch.Tensor:
    """q [Tq, H, dqk], k [S, H, dqk], v [S, H, dv]; keys_of(i): the key slots query i may see -> [Tq, H, dv]."""
    Tq, H, dv = q.size(0), q.size(1), v.size(-1)
    out = torch.zeros(Tq, H, dv, dtype=torch.float64)
    for i in range(Tq):
        keys = keys_of(i)
        for h in range(H):
            scores = [float(q[i, h] @ k[s, h]) * scale for s in keys]
            m = max(scores)
            e = [math.exp(z - m) for z in scores]
            for p, s in zip(e, keys):
                out[i, h] += p / sum(e) * v[s, h]
    return out


def window_of(a: ModelArgs, layer: int) -> int:
    """The sliding window of a layer (0: none), from the options: a window of w slots is the query's own slot and
    the w - 1 before it; sliding_window_layers lists the windowed layers (empty: all)."""
    if a.sliding_window <= 0:
        return 0
    listed = [int(s) for s in a.sliding_window_layers.split(",") if s.strip()]
    return a.sliding_window if not listed or layer in listed else 0


def capture_attention(model: Transformer) -> list[list[tuple]]:
    """Per layer, every call of its attention module: (input [B, T, D], start_pos, output [B, T, D])."""
    calls = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):
        layer.attn.register_forward_hook(
            lambda mod, inp, out, i=i: calls[i].append((inp[0].detach(), inp[2], out.detach())))
    return calls


def check_layer_calls(model: Transformer, calls: list[tuple], layer: int, pad: list[int]) -> float:
    """Each call's output against the reference over the slots written so far: queries at the call's slots,
    keys at slots <= the query's, inside the window, not left padding (pad[b] slots of row b, positions counted
    from the first real slot). Only real query slots are compared. Returns the largest relative error."""
    a, attn = model.args, model.layers[layer].attn
    x_all = torch.cat([x for x, _, _ in calls], dim=1)                          # [B, S, D]: every slot once
    starts = [0 if sp is None else sp for _, sp, _ in calls]
    assert starts == [sum(x.size(1) for x, _, _ in calls[:j]) for j in range(len(calls))]
    w = window_of(a, layer)
    worst = 0.0
    for b in range(x_all.size(0)):
        S = x_all.size(1)
        q, k, v, scale = qkv_ref(attn, x_all[b], [max(s - pad[b], 0) for s in range(S)], a)
        Wo = attn.wo.weight.detach().double()
        for (x, _, out), start in zip(calls, starts):
            slots = [s for s in range(start, start + x.size(1)) if s >= pad[b]]
            if not slots:
                continue
            keys_of = lambda i: [s for s in range(pad[b], slots[i] + 1) if not w or slots[i] - s < w]  # noqa: E731
            o = attend_ref(q[slots], k, v, scale, keys_of)                      # [n, H, dv]
            ref = o.flatten(1) @ Wo.T                                           # [n, D]
            got = out[b, [s - start for s in slots]]
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return worst


ATTN_REF_VARIANTS = {
    "mla": dict(),
    "mla-qlora": dict(q_lora_rank=12),
    "mla-window-all": dict(sliding_window=5),
    "mla-window-layers": dict(sliding_window=5, sliding_window_layers="0,2"),
    "mha": dict(attn_type="mha"),
    "gqa": dict(attn_type="mha", n_kv_heads=2),
    "gqa-window-all": dict(attn_type="mha", n_kv_heads=2, sliding_window=4),
    "mha-window-layers": dict(attn_type="mha", sliding_window=6, sliding_window_layers="1"),
}
ATTN_TOL = 1e-6   # relative; the model builds its RoPE table in float32 (angles off by ~1e-7 relative)


@pytest.mark.parametrize("variant", list(ATTN_REF_VARIANTS))
@torch.no_grad()
def test_attention_training_path_matches_float64_reference(variant):
    model = build(torch.float64, seed=11, **ATTN_REF_VARIANTS[variant])
    calls = capture_attention(model)
    model(torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(12)))
    for layer in range(model.args.n_layers):
        assert check_layer_calls(model, calls[layer], layer, [0, 0]) < ATTN_TOL, layer


@pytest.mark.parametrize("variant", list(ATTN_REF_VARIANTS))
@torch.no_grad()
def test_attention_cached_paths_match_float64_reference(variant):
    """Prefill 5 slots (start_pos 0), a second chunk of 4 (start_pos 5, T > 1: the masked prefill), then single
    tokens (MLA: the absorbed decode against the latent cache) up to 14 slots."""
    model = build(torch.float64, seed=13, **ATTN_REF_VARIANTS[variant])
    tokens = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(14))
    model.setup_cache(2, 16)
    calls = capture_attention(model)
    model(tokens[:, :5], start_pos=0)
    model(tokens[:, 5:9], start_pos=5)
    for t in range(9, 14):
        model(tokens[:, t:t + 1], start_pos=t)
    for layer in range(model.args.n_layers):
        assert [c[0].size(1) for c in calls[layer]] == [5, 4, 1, 1, 1, 1, 1]
        assert check_layer_calls(model, calls[layer], layer, [0, 0]) < ATTN_TOL, layer


@pytest.mark.parametrize("variant", list(ATTN_REF_VARIANTS))
@torch.no_grad()
def test_attention_left_padded_decode_matches_float64_reference(variant):
    """Rows of 14, 9 and 5 real tokens left-padded to 14 slots: prefill 10 slots, then decode one at a time."""
    model = build(torch.float64, seed=15, **ATTN_REF_VARIANTS[variant])
    pad = [0, 5, 9]
    tokens = torch.randint(1, VOCAB, (3, 14), generator=torch.Generator().manual_seed(16))
    model.setup_cache(3, 16)
    calls = capture_attention(model)
    model(tokens[:, :10], start_pos=0, pad=torch.tensor(pad))
    for t in range(10, 14):
        model(tokens[:, t:t + 1], start_pos=t, pad=torch.tensor(pad))
    for layer in range(model.args.n_layers):
        assert check_layer_calls(model, calls[layer], layer, pad) < ATTN_TOL, layer


# ----------------------------------------------------------------------------------------------------------------
# Every preset: its parameter counts against the formula and the figures config.py states, and a forward pass


# (vocab, parameters without the embedding, all parameters, active per token) as config.py's comments state them;
# None where a comment gives no figure. Each figure is checked to its last stated digit.
PRESET_FIGURES = {
    "tiny": (4096, None, "2.7M", "1.3M"),
    "tiny-dense": (4096, None, None, None),
    "small-moe": (32768, None, "24M", "12M"),
    "moe-30m": (32768, "27M", "35M", None),
    "gpt2-small": (32768, "101M", None, None),
    "moe-500m": (32768, "0.49B", "0.52B", "0.15B"),
    "moe-1.5b": (131072, "1.55B", "1.75B", "0.63B"),
}


def matches_stated(value: int, stated: str) -> bool:
    """value rounds to `stated` ("2.7M", "0.49B", "101M") at its last digit."""
    number, unit = stated[:-1], {"M": 1e6, "B": 1e9}[stated[-1]]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return round(value / unit, decimals) == float(number)


def test_every_preset_has_its_stated_figures():
    from config import MODEL_PRESETS
    assert set(PRESET_FIGURES) == set(MODEL_PRESETS)


@pytest.mark.parametrize("preset", list(PRESET_FIGURES))
def test_preset_parameter_count_and_forward_pass(preset):
    """Full size on the meta device: every count against count_ref and the stated figures. Then a forward and
    backward pass of the preset's own layer shapes with a 256-token vocabulary and two layers (its first dense
    layer and, for MoE presets, one MoE layer): counts again, logits, a loss near ln(256) at initialisation and
    finite gradients everywhere."""
    from config import model_args_from_preset
    vocab, no_embed, total, active = PRESET_FIGURES[preset]
    args = model_args_from_preset(preset, vocab_size=vocab)
    with torch.device("meta"):
        model = Transformer(args)
    ref_total, ref_active, ref_stored = count_ref(args)
    assert sum(p.numel() for p in model.parameters()) == ref_stored
    assert model.num_params() == ref_total and model.num_params(active=True) == ref_active
    for value, stated in ((ref_total, no_embed), (ref_stored, total), (ref_active, active)):
        assert stated is None or matches_stated(value, stated), (value, stated)

    moe = args.n_dense_layers < args.n_layers
    small = model_args_from_preset(preset, vocab_size=256, n_layers=2, n_dense_layers=1 if moe else 2)
    torch.manual_seed(0)
    model = Transformer(small)
    model.init_weights()
    assert sum(p.numel() for p in model.parameters()) == count_ref(small)[2]
    assert len(model.moe_layers()) == (1 if moe else 0)
    tokens = torch.randint(0, 256, (2, 9))
    logits = model(tokens)
    assert logits.shape == (2, 9, 256) and torch.isfinite(logits).all()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    spread = small.init_std ** 2 * small.dim          # variance of the initial logits (the final norm gives |h|^2 = dim)
    assert math.log(256) - 0.1 < loss.item() < math.log(256) + spread + 0.2   # near-uniform, plus ~spread / 2
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
