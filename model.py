"""A DeepSeek-V3 style transformer: Multi-Head Latent Attention (MLA) and a Mixture-of-Experts feed-forward.

One readable file in nanoGPT's spirit, with the parameter names of DeepSeek-V3's reference model.py
(https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/model.py). Architecture only: no optimizer, no
distributed code. Classes appear in data-flow order:

    RMSNorm, rotary embeddings  ->  MLA (and standard MHA/GQA for ablations)  ->  MLP (dense SwiGLU)
    ->  Gate, Experts, MoE  ->  Block  ->  Transformer

Shapes: B batch, T tokens in this call, S cache slots attended to, H heads, D model width, E routed experts,
K experts per token, N = B*T tokens, r = kv_lora_rank.

Attention has three paths:
  * start_pos None: training / eval / reference. Naive MLA through F.scaled_dot_product_attention(is_causal=True).
  * start_pos int, T > 1 (prefill): writes the cache, then naive MLA over the cached slots with SDPA.
  * start_pos int, T == 1 (decode): absorbed MLA. The cache holds only the normalised latent and the RoPE key
    (kv_lora_rank + qk_rope_head_dim numbers per token per layer); wkv_b's key half is folded into the query and
    its value half into the output, so keys/values are never expanded per head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelArgs


# ----------------------------------------------------------------------------------------------------------------
# Linear layers


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, as F.linear, with a faster path for decoding on CPU. For a few rows (one token per sequence)
    the product is a matrix-vector one that CPU BLAS runs on one core, reading the weight at a fraction of the
    memory bandwidth; split into one block of weight rows per thread, times x.T in a single bmm, it reads the
    weight on every core: 2-4x faster per layer, and the LM head of a 32k vocabulary 4x (bench/bench_generate.py).
    Training and long inputs take F.linear."""
    shape = x.shape
    k, rows = shape[-1], x.numel() // shape[-1]
    if rows > 16 or not x.is_cpu or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight)
    blocks, out = torch.get_num_threads(), weight.shape[0]
    if blocks < 2 or out % blocks or not (x.is_contiguous() and weight.is_contiguous()):
        return F.linear(x, weight)
    # x.T repeated for every block, as one strided view (this layout is the one BLAS runs fast)
    xt = x.as_strided((blocks, k, rows), (0, 1, k))                             # [blocks, in, rows]
    y = torch.bmm(weight.view(blocks, out // blocks, k), xt)                    # [blocks, out / blocks, rows]
    if rows > 1:
        y = y.permute(2, 0, 1).contiguous()                                     # [rows, blocks, out / blocks]
    return y.view(*shape[:-1], out)                                             # [..., out], row-major


class Linear(nn.Linear):
    """nn.Linear without bias that runs through `linear` (same parameters and state-dict names)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def precompute_freqs_cis(rope_dim: int, seq_len: int, theta: float, device=None) -> torch.Tensor:
    """Complex rotations e^{i * pos * theta^(-2j/d)}: [seq_len, rope_dim // 2] complex64 (DeepSeek's layout)."""
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    return torch.polar(torch.ones(seq_len, rope_dim // 2, device=device), torch.outer(t, freqs))


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) as complex numbers (DeepSeek's / HF rope_interleave layout).
    x: [B, T, H, d]; freqs_cis: [T, d/2] or [B, T, d/2] (per-row positions when prompts are left-padded)."""
    dtype = x.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32    # rotate in fp32 at least
    xc = torch.view_as_complex((x if dtype == work else x.to(work)).unflatten(-1, (-1, 2)))  # [B, T, H, d/2]
    if work == torch.float64:
        freqs_cis = freqs_cis.to(torch.complex128)
    if freqs_cis.dim() == 2:
        freqs_cis = freqs_cis.view(1, x.size(1), 1, -1)
    else:
        freqs_cis = freqs_cis.unsqueeze(2)
    out = torch.view_as_real(xc * freqs_cis).flatten(3)                  # [B, T, H, d]
    return out if dtype == work else out.to(dtype)


def is_sliding_layer(args: ModelArgs, layer_id: int) -> bool:
    if args.sliding_window <= 0:
        return False
    if not args.sliding_window_layers.strip():
        return True
    return layer_id in {int(s) for s in args.sliding_window_layers.split(",") if s.strip()}


# ----------------------------------------------------------------------------------------------------------------
# Attention


class MLA(nn.Module):
    """Multi-Head Latent Attention (DeepSeek-V2/V3)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.dim, self.n_heads = args.dim, args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.window = args.sliding_window if is_sliding_layer(args, layer_id) else 0
        if self.q_lora_rank == 0:
            self.wq = Linear(self.dim, self.n_heads * self.qk_head_dim)
        else:
            self.wq_a = Linear(self.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim)
        self.wkv_a = Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim))
        self.wo = Linear(self.n_heads * self.v_head_dim, self.dim)
        self.softmax_scale = self.qk_head_dim ** -0.5
        if args.qk_norm:  # each head's query, and the shared RoPE key (the nope keys come from the normed latent)
            self.q_head_norm = RMSNorm(self.qk_head_dim, args.norm_eps)
            self.k_pe_norm = RMSNorm(self.qk_rope_head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm
        # [B_max, S_max, r + rope]: the normalised latent | the roped key; allocated by setup_cache
        self.register_buffer("kv_cache", None, persistent=False)

    def setup_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> None:
        cache = torch.zeros(batch_size, max_seq_len, self.kv_lora_rank + self.qk_rope_head_dim,
                            device=device, dtype=dtype)
        self.kv_cache = cache

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        # queries
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)                       # [B, T, H, nope+rope]
        if self.qk_norm:
            q = self.q_head_norm(q)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        # the key/value latent and the shared RoPE key
        kv = self.wkv_a(x)                                                      # [B, T, r + rope]
        kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)                                                   # [B, T, r]
        if self.qk_norm:
            k_pe = self.k_pe_norm(k_pe)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)        # [B, T, rope]

        if start_pos is None:                        # training / reference: no cache
            return self._naive(q_nope, q_pe, kv, k_pe, mask, causal=mask is None)
        end = start_pos + T
        self.kv_cache[:B, start_pos:end] = torch.cat([kv, k_pe], dim=-1)      # [B, T, r + rope]
        if T > 1:                                    # prefill: naive attention over the cached slots
            cache = self.kv_cache[:B, :end]
            kv, k_pe = cache.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            return self._naive(q_nope, q_pe, kv, k_pe, mask, causal=mask is None and start_pos == 0)
        return self._absorbed(q_nope, q_pe, end, mask)

    def _naive(self, q_nope, q_pe, kv, k_pe, mask, causal: bool) -> torch.Tensor:
        """Expand the latent into per-head keys and values and run SDPA."""
        B, T, H, _ = q_nope.shape
        S = kv.size(1)
        kv = self.wkv_b(kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)   # [B, S, H, nope], [B, S, H, v]
        q = torch.cat([q_nope, q_pe], dim=-1)                                    # [B, T, H, qk]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.qk_rope_head_dim)], dim=-1)  # [B, S, H, qk]
        # CPU's fused SDPA kernel needs equal q/k and v head sizes (otherwise it falls back to a much slower
        # unfused path): zero-pad the smaller side; zero columns change neither the scores nor the output
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        elif pad < 0:
            q, k = F.pad(q, (0, -pad)), F.pad(k, (0, -pad))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        y = y.transpose(1, 2)                                                    # [B, T, H, max(qk, v)]
        if pad > 0:
            y = y[..., :self.v_head_dim]
        return self.wo(y.reshape(B, T, H * self.v_head_dim))

    def _absorbed(self, q_nope, q_pe, end: int, mask) -> torch.Tensor:
        """Decode one token per row against the latent cache; wkv_b is folded into the query and the output."""
        B, H = q_nope.size(0), self.n_heads
        r = self.kv_lora_rank
        wkv_b = self.wkv_b.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = wkv_b[:, :self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim:]  # [H, nope, r], [H, v, r]
        q_lat = torch.bmm(q_nope.view(B, H, -1).transpose(0, 1), w_uk)           # [H, B, r]
        q_full = torch.cat([q_lat.transpose(0, 1), q_pe.view(B, H, -1)], dim=-1)  # [B, H, r + rope]
        cache = self.kv_cache[:B, :end]                                          # [B, S, r + rope]
        scores = torch.bmm(q_full, cache.transpose(1, 2)) * self.softmax_scale  # [B, H, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, 0], float("-inf"))          # mask [B, 1, 1, S]
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        if probs.dtype != cache.dtype:
            probs = probs.to(cache.dtype)
        o = torch.bmm(probs, cache[..., :r])                                     # [B, H, r]
        o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2))                  # [H, B, v]
        return self.wo(o.transpose(0, 1).reshape(B, 1, H * self.v_head_dim))   # [B, 1, D]


class Attention(nn.Module):
    """Standard multi-head / grouped-query attention (attn_type="mha"), for ablations against MLA."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.head_dim or args.dim // args.n_heads
        self.window = args.sliding_window if is_sliding_layer(args, layer_id) else 0
        self.wq = Linear(args.dim, self.n_heads * self.head_dim)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim)
        self.wo = Linear(self.n_heads * self.head_dim, args.dim)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            self.q_head_norm = RMSNorm(self.head_dim, args.norm_eps)
            self.k_head_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.register_buffer("k_cache", None, persistent=False)   # [B_max, S_max, H_kv, hd], by setup_cache
        self.register_buffer("v_cache", None, persistent=False)

    def setup_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> None:
        shape = (batch_size, max_seq_len, self.n_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)                 # [B, T, H, hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)              # [B, T, Hkv, hd]
        if self.qk_norm:
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        causal = mask is None
        if start_pos is not None:
            end = start_pos + T
            self.k_cache[:B, start_pos:end] = k
            self.v_cache[:B, start_pos:end] = v
            k, v = self.k_cache[:B, :end], self.v_cache[:B, :end]                # [B, S, Hkv, hd]
            causal = mask is None and start_pos == 0 and T > 1
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU and the Mixture of Experts


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Used for the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router: scores every expert, picks the top-k (optionally within the best groups) and returns their
    weights. `bias` is DeepSeek-V3's auxiliary-loss-free balancing bias: it is added to the scores only to choose
    the experts, never to weight them, and is updated outside backprop (Transformer.update_balance_bias)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups, self.topk_groups = args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale = args.score_func, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.register_buffer("bias", torch.empty(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (weights [N, K] in x's dtype, indices [N, K], scores [N, E] (fp32+) without the bias)."""
        # a bf16 model may hold an fp32 router (as transformers keeps it): its logits are then computed in fp32
        logits = linear(x.to(self.weight.dtype), self.weight)                   # [N, E]
        work = torch.promote_types(logits.dtype, torch.float32)                 # route in fp32 at least
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=work)
        else:
            scores = logits.to(work).sigmoid()
        original_scores = scores
        scores = scores + self.bias                                            # selection only
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)                  # [N, G, E/G]
            if scores.size(-1) >= 2:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)           # [N, G]
            else:
                group_scores = scores.amax(dim=-1)
            group_idx = group_scores.topk(self.topk_groups, dim=-1)[1]          # [N, topk_groups]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            scores = scores.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
        indices = scores.topk(self.topk, dim=-1)[1]                              # [N, K]
        weights = original_scores.gather(1, indices)                            # [N, K]
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return weights.type_as(x), indices, original_scores


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One routed expert: w2 (silu(w1 x) * w3 x)."""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


class Experts(nn.Module):
    """The routed experts' SwiGLU weights stacked along a leading expert axis."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, D], weights/indices: [N, K] -> sum_k weights[:, k] * expert_{indices[:, k]}(x): [N, D].
        Token-expert pairs are sorted by expert, gathered into one contiguous buffer, each expert runs once on
        its slice (experts without tokens are skipped), and the weighted outputs are scattered back."""
        N, K = indices.shape
        E = self.w1.size(0)
        if N == 1 and not torch.is_grad_enabled():  # decoding one sequence: just its K experts, no sorting
            y = None
            for k, e in enumerate(indices[0].tolist()):
                y_k = weights[:, k:k + 1] * swiglu(x, self.w1[e], self.w2[e], self.w3[e])
                y = y_k if y is None else y.add_(y_k)
            return y
        flat = indices.flatten()                                                # [N*K]
        if counts is None:
            counts = torch.bincount(flat, minlength=E)
        order = flat.argsort(stable=True)                                       # pairs grouped by expert
        token_ids = order // K                                                  # [N*K]
        xs = x.index_select(0, token_ids)                                       # [N*K, D] contiguous per expert
        # unbind and split (not w[e], xs[a:b]): their backward stacks / concatenates the per-expert gradients
        # once instead of adding E full-size zero-padded ones
        w1, w2, w3 = self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)
        outs = []
        for e, h in enumerate(xs.split(counts.tolist())):                       # h: [tokens of expert e, D]
            if h.size(0):
                outs.append(swiglu(h, w1[e], w2[e], w3[e]))
        ys = torch.cat(outs) if len(outs) > 1 else outs[0]                      # [N*K, D]
        ys = ys * weights.flatten().index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token_ids, ys)                 # [N, D]


class MoE(nn.Module):
    """Shared experts (always on) + top-k routed experts. No token is ever dropped."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_routed_experts, self.topk = args.n_routed_experts, args.n_activated_experts
        self.aux_loss_alpha = args.aux_loss_alpha
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) \
            if args.n_shared_experts > 0 else None
        # tokens routed to each expert since the last update_balance_bias (counted in training mode)
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts, dtype=torch.long),
                             persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])                                               # [N, D]
        weights, indices, scores = self.gate(x)                                 # [N, K], [N, K], [N, E]
        counts = None  # [E]; Experts counts for itself when inference needs it
        if self.training:
            counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)
            self.tokens_per_expert += counts
        self.aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self.sequence_aux_loss(scores.view(*shape[:-1], -1), indices.view(*shape[:-1], -1))
        y = self.experts(x, weights, indices, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def sequence_aux_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences.
        scores: [B, T, E] (fp32), indices: [B, T, K]."""
        B, T, E = scores.shape
        probs = scores / scores.sum(dim=-1, keepdim=True)                      # normalised affinities
        P = probs.mean(dim=1)                                                   # [B, E]
        selected = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
        selected.scatter_add_(1, indices.flatten(1), torch.ones_like(indices.flatten(1), dtype=scores.dtype))
        f = selected * (E / (self.topk * T))                                    # [B, E]
        return self.aux_loss_alpha * (f * P).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# The loss: LM head + cross-entropy fused, chunked over tokens


def add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [V, D] (fp32+) += g.T @ h for g [n, V], h [n, D] in h's dtype: bf16/fp16 products are summed over
    the chunks in fp32."""
    if h.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    else:
        grad_w += torch.mm(g.t(), h)


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h @ weight.T, targets) in fp32 (fp64 for fp64 inputs) without ever holding the [N, vocab]
    logits, chunk by chunk over tokens. Tokens whose target is ignore_index count for nothing.

    reduction "mean" (over the counted tokens; 0 when there are none) or "sum": the forward also computes
    dloss/dlogits = (softmax - onehot) * scale in place and immediately the gradients of h and of the head weight,
    so each logit is exponentiated once and no [N, vocab] gradient is ever zero-filled; backward only scales the
    stored gradients by the incoming scalar.
    reduction "none": per-token losses [N] (0 where ignored). Their incoming gradient is per token, unknown during
    the forward, so the forward keeps only the log-sum-exp per token and backward recomputes each chunk's logits
    (one more [n, D] x [D, V] matmul per chunk)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, reduction: str) -> torch.Tensor:
        N = h.size(0)                                                           # h: [N, D], weight: [V, D]
        valid = targets != ignore_index                                         # [N]
        safe_targets = torch.where(valid, targets, 0)
        acc = torch.promote_types(h.dtype, torch.float32)                       # fp32 (fp64 for fp64 inputs)
        ctx.reduction, ctx.chunk_size, ctx.weight_dtype = reduction, chunk_size, weight.dtype
        if reduction == "none":
            # backward recomputes the logits as the forward computed them: under the same autocast, if any
            device = h.device.type
            ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            losses = torch.empty(N, device=h.device, dtype=acc)
            lse = torch.empty(N, device=h.device, dtype=acc)                    # log-sum-exp of each row's logits
            for start in range(0, N, chunk_size):
                sl = slice(start, min(start + chunk_size, N))
                logits = torch.mm(h[sl], weight.t()).to(acc)                   # [n, V]
                lse[sl] = logits.logsumexp(dim=1)
                losses[sl] = (lse[sl] - logits.gather(1, safe_targets[sl].unsqueeze(1)).squeeze(1)) * valid[sl]
            ctx.save_for_backward(h, weight, safe_targets, valid, lse)
            return losses
        if reduction == "mean":
            scale = 1.0 / valid.sum().clamp(min=1).to(acc)                      # tensor: no host sync
        else:
            scale = torch.ones((), device=h.device, dtype=acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc)
        loss = torch.zeros((), device=h.device, dtype=acc)
        for start in range(0, N, chunk_size):
            sl = slice(start, min(start + chunk_size, N))
            h_c, t_c, v_c = h[sl], safe_targets[sl], valid[sl]
            logits = torch.mm(h_c, weight.t())                                  # [n, V]
            logits = logits.to(acc)                                             # no-op unless bf16/fp16
            target_logit = logits.gather(1, t_c.unsqueeze(1))                   # [n, 1]
            m = logits.amax(dim=1, keepdim=True)                                # [n, 1]
            probs = logits.sub_(m).exp_()                                       # unnormalised softmax, in place
            s = probs.sum(dim=1, keepdim=True)                                  # [n, 1]
            loss += ((m + s.log() - target_logit).squeeze(1) * v_c).sum()
            if need_h or need_w:
                row_scale = v_c.unsqueeze(1) * scale                            # scale, 0 for ignored tokens
                g = probs.mul_(row_scale / s)                                   # softmax * scale
                g.scatter_add_(1, t_c.unsqueeze(1), -row_scale.to(g.dtype))     # - onehot * scale
                g = g.to(h.dtype)                                               # dloss/dlogits: [n, V]
                if need_h:
                    torch.mm(g, weight, out=grad_h[sl])                         # [n, D]
                if need_w:
                    add_weight_grad(grad_w, g, h_c)                             # [V, D]
        ctx.save_for_backward(grad_h, grad_w)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.reduction == "none":
            return LinearCrossEntropy._backward_none(ctx, grad_out) + (None, None, None, None)
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None

    @staticmethod
    def _backward_none(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """grad_out [N]: per token, dloss/dlogits = (softmax - onehot) * grad_out, from recomputed logits."""
        h, weight, safe_targets, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, acc = h.size(0), lse.dtype
        row_scale = (grad_out.to(acc) * valid).unsqueeze(1)                     # [N, 1], 0 for ignored tokens
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        device = h.device.type
        for start in range(0, N, ctx.chunk_size):
            sl = slice(start, min(start + ctx.chunk_size, N))
            with torch.autocast(device, ctx.autocast or torch.bfloat16, enabled=ctx.autocast is not None):
                logits = torch.mm(h[sl], weight.t())                            # [n, V]
            g = logits.to(acc).sub_(lse[sl].unsqueeze(1)).exp_().mul_(row_scale[sl])  # softmax * grad_out
            g.scatter_add_(1, safe_targets[sl].unsqueeze(1), -row_scale[sl])    # - onehot * grad_out
            g = g.to(h.dtype)                                                   # dloss/dlogits: [n, V]
            if need_h:
                torch.mm(g, weight, out=grad_h[sl])                             # [n, D]
            if need_w:
                add_weight_grad(grad_w, g, h[sl])                               # [V, D]
        return grad_h, grad_w if grad_w is None else grad_w.to(ctx.weight_dtype)


REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         chunk_size: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits h @ weight.T against targets (ignore_index tokens count for nothing).
    h: [..., D], targets: [...]. reduction "mean" (over counted tokens) or "sum" -> scalar; "none" -> per-token
    losses shaped like targets, 0 at ignored tokens. fp32 (fp64 for fp64 inputs)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if chunk_size <= 0:
        chunk_size = max(16, (1 << 23) // weight.size(0))     # about 32 MiB of fp32 logits per chunk
    loss = LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), ignore_index,
                                    chunk_size, reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn = MLA(args, layer_id) if args.attn_type == "mla" else Attention(args, layer_id)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.dropout = args.dropout   # on each branch's output, training mode only

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        if self.dropout and self.training:
            x = x + F.dropout(self.attn(self.attn_norm(x), freqs_cis, start_pos, mask), self.dropout)
            return x + F.dropout(self.ffn(self.ffn_norm(x)), self.dropout)
        x = x + self.attn(self.attn_norm(x), freqs_cis, start_pos, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        """Allocates every parameter and buffer; no initialisation (works under torch.device("meta"))."""
        super().__init__()
        if args.attn_type not in ("mla", "mha"):
            raise ValueError(f"unknown attn_type {args.attn_type!r}")
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rope_dim = args.qk_rope_head_dim if args.attn_type == "mla" else (args.head_dim or args.dim // args.n_heads)
        # the RoPE table [positions, rope_dim/2] complex64: a plain attribute rather than a buffer so that
        # model.to(dtype) never casts it; (re)built on first use on a device (see rope_table)
        self.freqs_cis: torch.Tensor | None = None
        self.window_layers = [i for i in range(args.n_layers) if is_sliding_layer(args, i)]
        self.loss_chunk_size = 0      # tokens per chunk of the fused head + loss; 0: about 32 MiB of fp32 logits
        self.cache_batch_size = 0
        self.cache_len = 0
        if self.embed.weight.device.type != "meta":
            self.init_buffers()

    # -- initialisation -------------------------------------------------------------------------------------------

    def init_buffers(self, device=None) -> None:
        """(Re)compute the non-persistent state: the RoPE table and the routed-token counters. Called by
        init_weights, and automatically by forward when the model was materialised without it (e.g. built on the
        meta device and then loaded with load_state_dict(assign=True))."""
        device = device or self.embed.weight.device
        self.freqs_cis = precompute_freqs_cis(self.rope_dim, self.args.max_seq_len, self.args.rope_theta, device)
        for moe in self.moe_layers():
            moe.tokens_per_expert = torch.zeros(moe.n_routed_experts, dtype=torch.long, device=device)

    def rope_table(self, length: int, device) -> torch.Tensor:
        """The RoPE table on `device` covering at least `length` positions."""
        f = self.freqs_cis
        if f is None or f.is_meta or f.device != device or f.size(0) < length:
            self.freqs_cis = precompute_freqs_cis(self.rope_dim, max(length, self.args.max_seq_len),
                                                  self.args.rope_theta, device)
            for moe in self.moe_layers():
                if moe.tokens_per_expert.is_meta:
                    moe.tokens_per_expert = torch.zeros(moe.n_routed_experts, dtype=torch.long, device=device)
        return self.freqs_cis

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation: N(0, init_std) for matrices and the embedding, output projections (wo, w2) scaled
        by 1/sqrt(2 * n_layers) as in GPT-2 (zero with zero_init_out), ones for norms, zero balancing bias."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * max(self.args.n_layers, 1))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                if self.args.zero_init_out:  # every block starts as the identity
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for moe in self.moe_layers():
            moe.gate.bias.zero_()
        self.init_buffers()

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int | None = None,
                pad: torch.Tensor | None = None, last_only: bool = False, reduction: str = "mean") -> torch.Tensor:
        """tokens: [B, T]. Without targets: logits [B, T, vocab], or [B, 1, vocab] for the last position only with
        last_only (a prefill needs no more, and B x T x vocab logits can outweigh the model).
        With targets [B, T] (-1 = ignored), the cross-entropy through the fused chunked head (fp32, no full logits):
          reduction "mean": scalar mean over counted tokens + every MoE layer's auxiliary balance loss (training);
          reduction "sum":  scalar sum of the token NLLs, no auxiliary loss;
          reduction "none": per-token NLL [B, T] (0 at ignored positions), no auxiliary loss; e.g. summed over a row
          it is minus the sequence's log-probability, as preference tuning and SFT need, with gradients.
        The auxiliary loss is a batch-level regulariser: it belongs to the training objective ("mean"), not to a
        log-probability. start_pos: see the module docstring; pad[b] is the number of left-padding slots of row b
        (only with start_pos)."""
        B, T = tokens.shape
        end = T if start_pos is None else start_pos + T
        rope = self.rope_table(end, tokens.device)                             # [>= end, rope/2] complex
        full_mask, window_mask = None, None
        if start_pos is None:
            if pad is not None:
                raise ValueError("pad is only supported together with start_pos (the cached path)")
            freqs_cis = rope[:T]
            if self.window_layers:
                window_mask = self._mask(0, T, None, self.args.sliding_window, tokens.device)
        else:
            if end > self.cache_len or B > self.cache_batch_size:
                raise ValueError(f"cache too small for batch {B} and {end} positions; call setup_cache first "
                                 f"(have batch {self.cache_batch_size}, length {self.cache_len})")
            if pad is None:
                freqs_cis = rope[start_pos:end]                       # [T, rope/2]
            else:
                pos = (torch.arange(start_pos, end, device=tokens.device) - pad.view(B, 1)).clamp_(min=0)
                freqs_cis = rope[pos]                                 # [B, T, rope/2]
            if pad is not None or (start_pos > 0 and T > 1):
                full_mask = self._mask(start_pos, T, pad, 0, tokens.device)
            if self.window_layers:
                window_mask = self._mask(start_pos, T, pad, self.args.sliding_window, tokens.device)
        h = self.embed(tokens)                                                  # [B, T, D]
        for i, layer in enumerate(self.layers):
            mask = window_mask if layer.attn.window else full_mask
            h = layer(h, freqs_cis, start_pos, mask)
        if last_only:
            h = h[:, -1:]                                                       # [B, 1, D]
        h = self.norm(h)
        cap = self.args.logit_softcap
        if targets is None:
            logits = self.head(h)                                               # [B, T, vocab]
            return logits if not cap else cap * torch.tanh(logits / cap)
        if cap:  # unfused: the cap sits between the head and the softmax
            logits = self.head(h)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, as the fused loss
            logits = cap * torch.tanh(logits / cap)                             # [B, T, vocab]
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)
            loss = loss.view(targets.shape) if reduction == "none" else loss    # [B, T] or scalar
        else:
            loss = linear_cross_entropy(h, self.head.weight, targets, ignore_index=-1,
                                        chunk_size=self.loss_chunk_size, reduction=reduction)
        if reduction != "mean":
            return loss                                                         # [B, T] or scalar
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                loss = loss + moe.aux_loss
        return loss

    @staticmethod
    def _mask(start_pos: int, T: int, pad: torch.Tensor | None, window: int, device) -> torch.Tensor | None:
        """Boolean attention mask (True = attend) for queries in slots [start_pos, start_pos+T) over keys in slots
        [0, start_pos+T): causal, within the window, and not a left-padding slot (a padding query sees itself
        only, so that no row is fully masked). [1 or B, 1, T, S]."""
        q = torch.arange(start_pos, start_pos + T, device=device).view(T, 1)
        k = torch.arange(start_pos + T, device=device).view(1, -1)
        allowed = k <= q                                                        # [T, S]
        if window > 0:
            allowed &= k > q - window
        if pad is None:
            return allowed.view(1, 1, T, -1)
        allowed = allowed & ((k >= pad.view(-1, 1, 1)) | (k == q))             # [B, T, S]
        return allowed.unsqueeze(1)

    # -- generation cache -------------------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Preallocate every layer's cache for batch_size rows and max_seq_len slots (MLA: the latent and the RoPE
        key; MHA: keys and values)."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        for layer in self.layers:
            layer.attn.setup_cache(batch_size, max_seq_len, device, dtype)
        self.cache_batch_size, self.cache_len = batch_size, max_seq_len
        self.rope_table(max_seq_len, torch.device(device))

    def cache_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            for name in ("kv_cache", "k_cache", "v_cache"):
                t = getattr(layer.attn, name, None)
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    # -- MoE load balancing -------------------------------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free balancing: bias_i += speed * sign(mean load - load_i) from the tokens counted
        (in training mode) since the last call; then reset the counts."""
        speed = self.args.bias_update_speed
        for moe in self.moe_layers():
            load = moe.tokens_per_expert.float()
            if speed > 0 and load.sum() > 0:
                moe.gate.bias += speed * torch.sign(load.mean() - load)
            moe.tokens_per_expert.zero_()

    def expert_load(self) -> torch.Tensor:
        """[n_moe_layers, n_routed_experts]: tokens routed to each expert since the last update_balance_bias."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.args.n_routed_experts, dtype=torch.long)
        return torch.stack([moe.tokens_per_expert.clone() for moe in layers])

    # -- accounting -------------------------------------------------------------------------------------------------

    def num_params(self, active: bool = False) -> int:
        """Parameters excluding the token embedding (the head counts; a tied head counts once). active: only what
        one token uses (top-k of the routed experts)."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name == "embed.weight" and not self.args.tie_embeddings:
                continue
            total += p.numel()
        if active:
            a = self.args
            for moe in self.moe_layers():
                # numel / rows rather than p[0].numel(): indexing an FSDP-sharded DTensor is a collective
                per_expert = sum(p.numel() // p.size(0) for p in moe.experts.parameters())
                total -= (a.n_routed_experts - a.n_activated_experts) * per_expert
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 * active parameters (matmuls incl. the head) plus the
        attention score and value products, 6 * S * H * (qk_head_dim + v_head_dim) per layer with S the attended
        span (seq_len, or the sliding window), counted over the full square as in PaLM's MFU formula."""
        a = self.args
        flops = 6.0 * self.num_params(active=True)
        for i in range(a.n_layers):
            span = min(seq_len, a.sliding_window) if is_sliding_layer(a, i) else seq_len
            if a.attn_type == "mla":
                qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
            else:
                qk = v = a.head_dim or a.dim // a.n_heads
            flops += 6.0 * span * a.n_heads * (qk + v)
        return flops
