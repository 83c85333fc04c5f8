"""Export a checkpoint as a Hugging Face `DeepseekV3` model folder, and load such folders back into our model.

    python hf_interop.py --save_file_name checkpoints --output_dir hf_model
    python hf_interop.py --save_file_name checkpoints/step_000300 --output_dir hf_model --max_shard_size 500MB
    python hf_interop.py --save_file_name checkpoints --output_dir hf_model --load_mistral_tokenizer

The folder holds `config.json` (model_type deepseek_v3), `model.safetensors` (or shards + an index above
--max_shard_size) under HF's weight names, `generation_config.json` and the tokenizer (`tokenizer.json`,
`tokenizer_config.json`), so that

    AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)

load it as is. `load_hf_model(folder)` goes the other way, and `load_any_model(path)` loads either kind of model
(a HF folder or one of our checkpoints; generate.py and train.py --init_from use it); it also reads folders
transformers itself wrote (per-expert or fused expert tensors, sharded or not, rope_interleave true or false).

Weight names (ours <-> HF, `L` = layers.{i}, `M` = model.layers.{i}):

    embed.weight                  model.embed_tokens.weight
    L.attn_norm.weight            M.input_layernorm.weight
    L.attn.wq.weight              M.self_attn.q_proj.weight               (q_lora_rank = 0 / null)
    L.attn.wq_a.weight            M.self_attn.q_a_proj.weight             (q_lora_rank > 0)
    L.attn.q_norm.weight          M.self_attn.q_a_layernorm.weight
    L.attn.wq_b.weight            M.self_attn.q_b_proj.weight
    L.attn.wkv_a.weight           M.self_attn.kv_a_proj_with_mqa.weight   rows [kv_lora_rank | rope]
    L.attn.kv_norm.weight         M.self_attn.kv_a_layernorm.weight
    L.attn.wkv_b.weight           M.self_attn.kv_b_proj.weight            rows per head [nope | v], same order
    L.attn.wo.weight              M.self_attn.o_proj.weight
    L.ffn_norm.weight             M.post_attention_layernorm.weight
    L.ffn.w1/w3/w2.weight         M.mlp.gate_proj/up_proj/down_proj.weight          (i < n_dense_layers)
    L.ffn.gate.weight             M.mlp.gate.weight                                  (MoE layers)
    L.ffn.gate.bias               M.mlp.gate.e_score_correction_bias
    L.ffn.experts.w1[j]           M.mlp.experts.{j}.gate_proj.weight
    L.ffn.experts.w3[j]           M.mlp.experts.{j}.up_proj.weight
    L.ffn.experts.w2[j]           M.mlp.experts.{j}.down_proj.weight
    L.ffn.shared_experts.w1/w3/w2 M.mlp.shared_experts.gate_proj/up_proj/down_proj.weight
    norm.weight                   model.norm.weight
    head.weight                   lm_head.weight                          (absent when tie_embeddings)

RoPE: our rotary dimensions are DeepSeek's interleaved pairs (x0,x1),(x2,x3)...; HF applies exactly that with
`rope_interleave: true`, so the exported weights are unchanged. Folders with `rope_interleave: false` (pairs
(x_i, x_{i+d/2})) are imported by permuting the rotary rows of the query and of kv_a_proj_with_mqa.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError

import checkpoint
from common import DTYPES, atomic_folder, first_line, recover_atomic_folder
from config import ExportConfig, ModelArgs, UserError, parse_config, run_main

HF_MODEL_TYPE = "deepseek_v3"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# our ModelArgs, stored in config.json too (transformers keeps unknown keys), so that fields HF has no name for
# (training-only ones such as bias_update_speed) survive an export -> import round trip
TOOLKIT_KEY = "toolkit_model_args"
# DeepSeek's reference (and HF's) q_a_layernorm / kv_a_layernorm use this epsilon, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def moe_layer_ids(args: ModelArgs) -> list[int]:
    return list(range(max(args.n_dense_layers, 0), args.n_layers))


def unsupported_options(args: ModelArgs) -> list[str]:
    """Options of ours the HF DeepseekV3 architecture cannot express (each entry names the option)."""
    problems = []
    if args.attn_type != "mla":
        problems.append(f"attn_type={args.attn_type} (HF DeepseekV3 only has Multi-Head Latent Attention; "
                        f"train with --attn_type mla)")
    if args.sliding_window:
        problems.append(f"sliding_window={args.sliding_window} (HF DeepseekV3 attends to the full causal "
                        f"context; train with --sliding_window 0)")
    if args.norm_eps != LATENT_NORM_EPS:
        problems.append(f"norm_eps={args.norm_eps} (HF DeepseekV3 normalises the query/key-value latents with "
                        f"epsilon {LATENT_NORM_EPS} whatever rms_norm_eps is, while our model uses norm_eps for "
                        f"every norm; train with --norm_eps {LATENT_NORM_EPS})")
    if args.qk_norm:
        problems.append("qk_norm=True (HF DeepseekV3 has no query/key normalisation; train with --qk_norm false)")
    if args.logit_softcap:
        problems.append(f"logit_softcap={args.logit_softcap} (HF DeepseekV3 has no logit soft-capping; train with "
                        f"--logit_softcap 0)")
    if moe_layer_ids(args):
        if args.score_func != "sigmoid":
            problems.append(f"score_func={args.score_func} (HF DeepseekV3's router scores experts with a sigmoid "
                            f"only; train the MoE layers with --score_func sigmoid, or use dense layers only)")
        per_group = args.n_routed_experts // max(args.n_expert_groups, 1)
        if per_group < 2:
            problems.append(f"n_routed_experts={args.n_routed_experts} with n_expert_groups="
                            f"{args.n_expert_groups} (HF's router scores each expert group by its top-2 experts, "
                            f"so every group needs at least 2 experts)")
        if args.n_expert_groups > 1 and not 1 <= args.n_limited_groups <= args.n_expert_groups:
            problems.append(f"n_limited_groups={args.n_limited_groups} (must be between 1 and "
                            f"n_expert_groups={args.n_expert_groups})")
    return problems


def check_exportable(args: ModelArgs) -> None:
    problems = unsupported_options(args)
    if problems:
        raise UserError("this model cannot be expressed in the HF DeepseekV3 format: " + "; ".join(problems))


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_hf_config(args: ModelArgs, tokenizer: Any = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json content for a DeepseekV3ForCausalLM equivalent to `args`. `tokenizer` (ours) gives the
    bos/eos/pad ids; without it the trained tokenizer's convention (pad 0, bos 1, eos 2) is used."""
    check_exportable(args)
    n_moe = len(moe_layer_ids(args))
    bos, eos, pad = _special_ids(tokenizer)
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": min(args.n_dense_layers, args.n_layers) if n_moe else args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,  # MLA: keys/values are expanded per head from the latent
        "max_position_embeddings": args.max_seq_len,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "head_dim": args.qk_rope_head_dim,  # what transformers itself writes (its rotary embedding size)
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rope_theta)},
        "rope_theta": float(args.rope_theta),  # for transformers 4.x readers
        "rope_scaling": None,
        "rope_interleave": True,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": max(args.n_expert_groups, 1),
        "topk_group": max(args.n_limited_groups, 1) if args.n_expert_groups > 1 else 1,
        "routed_scaling_factor": float(args.route_scale),
        "norm_topk_prob": True,  # DeepSeek-V3 renormalises sigmoid top-k weights
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "rms_norm_eps": float(args.norm_eps),
        "initializer_range": float(args.init_std),
        "tie_word_embeddings": bool(args.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        TOOLKIT_KEY: args.to_dict(),
    }
    if dtype is not None:
        config["dtype"] = _torch_dtype_name(dtype)
        config["torch_dtype"] = _torch_dtype_name(dtype)  # transformers 4.x name
    return config


_REQUIRED = object()
_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _value(config: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """config[key] checked to be of `kind` (int, float, bool or str); `default` when absent or null. A required
    key that is missing, or a value of the wrong kind, is a UserError naming the key."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"config.json lacks '{key}', which a DeepseekV3 model needs; the folder is incomplete "
                            f"or its config.json was edited")
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and abs(value) != float("inf") and (kind is float or float(value).is_integer())
    if not ok:
        raise UserError(f"config.json has {key}={json.dumps(value)}; it must be {_KINDS[kind]}")
    return kind(value)


def from_hf_config(config: Mapping[str, Any]) -> ModelArgs:
    """ModelArgs equivalent to a DeepseekV3 config.json (ours or one transformers wrote). UserError for
    configurations our model cannot reproduce exactly, and for missing or malformed keys (naming the key)."""
    model_type = config.get("model_type")
    if model_type != HF_MODEL_TYPE:
        raise UserError(f"config.json has model_type {json.dumps(model_type)}; only '{HF_MODEL_TYPE}' (DeepSeek-V3 "
                        f"architecture) folders are supported")
    problems = []
    if config.get("quantization_config"):
        problems.append("quantization_config (quantized weights, e.g. fp8) is not supported; use a "
                        "bf16/fp32 checkpoint")
    if _value(config, "hidden_act", str, "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']} (only silu)")
    if config.get("attention_bias"):
        problems.append("attention_bias=true (our attention has no biases)")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, section in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(section, dict):
            raise UserError(f"config.json has {key}={json.dumps(section)}; it must be an object")
    for section in (rope, scaling):  # transformers 5 writes rope_parameters, 4.x rope_scaling
        rope_type = section.get("rope_type") or section.get("type") or "default"
        if rope_type != "default":
            problems.append(f"rope type {rope_type!r} (only plain RoPE; YaRN/other scaling is not supported)")
            break
    norm_eps = _value(config, "rms_norm_eps", float, LATENT_NORM_EPS)
    if norm_eps != LATENT_NORM_EPS:
        problems.append(f"rms_norm_eps={config['rms_norm_eps']} (our model uses one epsilon for every norm, "
                        f"while HF uses {LATENT_NORM_EPS} for the latent norms)")
    n_heads = _value(config, "num_attention_heads", int)
    if _value(config, "num_key_value_heads", int, n_heads) != n_heads:
        problems.append(f"num_key_value_heads={config['num_key_value_heads']} differs from "
                        f"num_attention_heads={n_heads}")
    n_layers = _value(config, "num_hidden_layers", int)
    n_dense = _value(config, "first_k_dense_replace", int, 0)
    has_moe = n_dense < n_layers
    if has_moe:
        if _value(config, "scoring_func", str, "sigmoid") != "sigmoid":
            problems.append(f"scoring_func={config['scoring_func']} (transformers' DeepseekV3 routes with sigmoid)")
        if not _value(config, "norm_topk_prob", bool, True):
            problems.append("norm_topk_prob=false (our sigmoid router always renormalises the top-k weights)")
    if problems:
        raise UserError("this HF model cannot be loaded exactly: " + "; ".join(problems))

    theta = _value(rope, "rope_theta", float, _value(config, "rope_theta", float, 10000.0))
    n_group = _value(config, "n_group", int, 1)
    inter_dim = _value(config, "intermediate_size", int)
    values = dict(
        vocab_size=_value(config, "vocab_size", int),
        dim=_value(config, "hidden_size", int),
        inter_dim=inter_dim,
        moe_inter_dim=_value(config, "moe_intermediate_size", int, inter_dim),
        n_layers=n_layers,
        n_dense_layers=n_dense,
        n_heads=n_heads,
        max_seq_len=_value(config, "max_position_embeddings", int, 4096),
        attn_type="mla",
        q_lora_rank=_value(config, "q_lora_rank", int, 0),
        kv_lora_rank=_value(config, "kv_lora_rank", int),
        qk_nope_head_dim=_value(config, "qk_nope_head_dim", int),
        qk_rope_head_dim=_value(config, "qk_rope_head_dim", int),
        v_head_dim=_value(config, "v_head_dim", int),
        rope_theta=theta,
        sliding_window=0,
        n_routed_experts=_value(config, "n_routed_experts", int, 1),
        n_shared_experts=_value(config, "n_shared_experts", int, 0),
        n_activated_experts=_value(config, "num_experts_per_tok", int, 1),
        n_expert_groups=n_group,
        n_limited_groups=_value(config, "topk_group", int, 1) if n_group > 1 else 1,
        score_func="sigmoid",
        route_scale=_value(config, "routed_scaling_factor", float, 1.0),
        norm_eps=norm_eps,
        tie_embeddings=_value(config, "tie_word_embeddings", bool, False),
        init_std=_value(config, "initializer_range", float, 0.02),
    )
    try:
        derived = ModelArgs(**values)
    except UserError as e:
        raise UserError(f"config.json describes an invalid model: {e}") from e
    # A folder we exported also records our ModelArgs: when the architecture it implies is the one config.json
    # describes (nobody edited it), use the record, which also keeps the fields HF has no name for
    # (training-only ones such as bias_update_speed, or router options of a dense-only model).
    stored = config.get(TOOLKIT_KEY)
    if isinstance(stored, dict):
        try:
            recorded = ModelArgs.from_dict(stored)
            if _architecture(to_hf_config(recorded)) == _architecture(to_hf_config(derived)):
                return recorded
        except (UserError, TypeError, ValueError):
            pass
    return derived


_ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                      "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "max_position_embeddings",
                      "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "rope_parameters", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                      "topk_group", "routed_scaling_factor", "rms_norm_eps", "tie_word_embeddings")


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json fields that decide the function the model computes."""
    arch = {k: config.get(k) for k in _ARCHITECTURE_KEYS}
    if config["first_k_dense_replace"] >= config["num_hidden_layers"]:  # no router: its settings decide nothing
        for k in ("moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                  "topk_group", "routed_scaling_factor"):
            arch.pop(k)
    return arch


# ----------------------------------------------------------------------------------------------------------------
# Weights


_ATTN = {  # ours -> HF, inside layers.{i}.attn / model.layers.{i}.self_attn
    "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _weight_names(args: ModelArgs) -> list[tuple[str, str]]:
    """(ours, HF) for every tensor both formats hold, routed experts excluded (stacked vs per-expert)."""
    names = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not args.tie_embeddings:
        names.append(("head.weight", "lm_head.weight"))
    moe = set(moe_layer_ids(args))
    attn = ["wq_a", "q_norm", "wq_b"] if args.q_lora_rank else ["wq"]
    attn += ["wkv_a", "kv_norm", "wkv_b", "wo"]
    for i in range(args.n_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        names += [(f"{ours}.attn_norm.weight", f"{hf}.input_layernorm.weight"),
                  (f"{ours}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")]
        names += [(f"{ours}.attn.{a}.weight", f"{hf}.self_attn.{_ATTN[a]}.weight") for a in attn]
        if i in moe:
            names += [(f"{ours}.ffn.gate.weight", f"{hf}.mlp.gate.weight"),
                      (f"{ours}.ffn.gate.bias", f"{hf}.mlp.gate.e_score_correction_bias")]
            if args.n_shared_experts:
                names += [(f"{ours}.ffn.shared_experts.{w}.weight", f"{hf}.mlp.shared_experts.{m}.weight")
                          for w, m in _MLP.items()]
        else:
            names += [(f"{ours}.ffn.{w}.weight", f"{hf}.mlp.{m}.weight") for w, m in _MLP.items()]
    return names


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state_dict -> HF DeepseekV3ForCausalLM tensors (per-expert layout, as on the hub). Tensors are views of
    ours where possible (no copies); buffers of ours that hold training statistics are left out."""
    check_exportable(args)
    out: dict[str, torch.Tensor] = {}
    for ours, hf in _weight_names(args):
        if ours not in state_dict:
            raise UserError(f"the checkpoint has no tensor '{ours}', which its model_args require; it is damaged "
                            f"or was written by an incompatible version")
        out[hf] = state_dict[ours]
    for i in moe_layer_ids(args):
        hf = f"model.layers.{i}.mlp"
        if not args.n_shared_experts:
            # HF always builds a shared-expert MLP; with no shared expert it has zero width (and adds zero)
            out[f"{hf}.shared_experts.gate_proj.weight"] = state_dict["embed.weight"].new_zeros(0, args.dim)
            out[f"{hf}.shared_experts.up_proj.weight"] = state_dict["embed.weight"].new_zeros(0, args.dim)
            out[f"{hf}.shared_experts.down_proj.weight"] = state_dict["embed.weight"].new_zeros(args.dim, 0)
        for w, m in _MLP.items():
            stacked = state_dict[f"layers.{i}.ffn.experts.{w}"]
            if stacked.shape[0] != args.n_routed_experts:
                raise UserError(f"layers.{i}.ffn.experts.{w} holds {stacked.shape[0]} experts but model_args say "
                                f"n_routed_experts={args.n_routed_experts}")
            for j in range(args.n_routed_experts):
                out[f"{hf}.experts.{j}.{m}.weight"] = stacked[j]
    return out


_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _unfuse_experts(hf_sd: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers' in-memory layout (experts.gate_up_proj [E, 2*inter, dim], experts.down_proj [E, dim, inter])
    -> the per-expert layout of files on the hub."""
    out = dict(hf_sd)
    for name in list(hf_sd):
        m = _FUSED.match(name)
        if not m:
            continue
        tensor = out.pop(name)
        prefix = f"model.layers.{m.group(1)}.mlp.experts"
        for j in range(tensor.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{prefix}.{j}.down_proj.weight"] = tensor[j]
            else:
                gate, up = tensor[j].chunk(2, dim=0)
                out[f"{prefix}.{j}.gate_proj.weight"] = gate
                out[f"{prefix}.{j}.up_proj.weight"] = up
    return out


def _deinterleave_permutation(rope_dim: int) -> torch.Tensor:
    """perm with ours[r] = hf_half_split[perm[r]]: our pair (2i, 2i+1) is HF's non-interleaved pair (i, i+d/2)."""
    half = rope_dim // 2
    perm = torch.empty(rope_dim, dtype=torch.long)
    perm[0::2] = torch.arange(half)
    perm[1::2] = torch.arange(half) + half
    return perm


def _interleave_rope_rows(q: torch.Tensor | None, kv_a: torch.Tensor, args: ModelArgs
                          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Rows of a rope_interleave=false checkpoint -> our interleaved layout (a pure row permutation)."""
    perm = _deinterleave_permutation(args.qk_rope_head_dim)
    nope, rope = args.qk_nope_head_dim, args.qk_rope_head_dim
    if q is not None:
        heads = q.view(args.n_heads, nope + rope, q.shape[-1])
        q = torch.cat([heads[:, :nope], heads[:, nope:][:, perm]], dim=1).reshape(q.shape)
    kv_a = torch.cat([kv_a[:args.kv_lora_rank], kv_a[args.kv_lora_rank:][perm]], dim=0)
    return q, kv_a


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], args: ModelArgs,
                       rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """HF DeepseekV3 tensors (per-expert or fused experts) -> our state_dict (parameters and the router bias).
    The exact inverse of to_hf_state_dict. Extra HF tensors (multi-token-prediction layers beyond
    num_hidden_layers, rotary caches) are ignored; missing ones raise UserError."""
    hf_sd = _unfuse_experts(hf_sd, args)
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, hf in _weight_names(args):
        if hf in hf_sd:
            out[ours] = hf_sd[hf]
        elif not ours.endswith(".ffn.gate.bias"):
            missing.append(hf)
        else:  # a router without correction bias (never trained with aux-free balancing): zero bias
            device = next(iter(hf_sd.values())).device
            out[ours] = torch.zeros(args.n_routed_experts, dtype=torch.float32, device=device)
    for i in moe_layer_ids(args):
        hf = f"model.layers.{i}.mlp.experts"
        for w, m in _MLP.items():
            names = [f"{hf}.{j}.{m}.weight" for j in range(args.n_routed_experts)]
            absent = [n for n in names if n not in hf_sd]
            if absent:
                missing += absent
                continue
            out[f"layers.{i}.ffn.experts.{w}"] = torch.stack([hf_sd[n] for n in names])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"the HF weights lack {shown}; the folder is incomplete or does not match its config.json")
    if not rope_interleave:
        for i in range(args.n_layers):
            qname = f"layers.{i}.attn.{'wq_b' if args.q_lora_rank else 'wq'}.weight"
            kvname = f"layers.{i}.attn.wkv_a.weight"
            out[qname], out[kvname] = _interleave_rope_rows(out[qname], out[kvname], args)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _special_ids(tokenizer: Any) -> tuple[int | None, int | None, int | None]:
    if tokenizer is None:
        return 1, 2, 0  # the trained tokenizer's convention: <|pad|>=0, <|bos|>=1, <|eos|>=2
    return int(tokenizer.bos_id), int(tokenizer.eos_id), int(tokenizer.pad_id)


def _backend(tokenizer: Any):
    """The tokenizers.Tokenizer inside our Tokenizer."""
    from tokenizers import Tokenizer as RustTokenizer

    if isinstance(tokenizer, RustTokenizer):
        return tokenizer
    inner = getattr(tokenizer, "backend", None)  # tokenizer.Tokenizer
    if isinstance(inner, RustTokenizer):
        return inner
    raise TypeError(f"cannot find the tokenizers.Tokenizer inside {type(tokenizer).__name__}")


def save_hf_tokenizer(tokenizer: Any, folder: Path, max_seq_len: int) -> None:
    """tokenizer.json (with a post-processor that prepends bos, as our documents start with it) and
    tokenizer_config.json naming bos/eos/pad, for AutoTokenizer / PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.processors import TemplateProcessing

    backend = RustTokenizer.from_str(_backend(tokenizer).to_str())  # a copy: the caller's stays untouched
    bos_id, eos_id, pad_id = _special_ids(tokenizer)
    bos, eos, pad = (backend.id_to_token(i) for i in (bos_id, eos_id, pad_id))
    if None in (bos, eos, pad):
        raise UserError("the tokenizer lacks its bos/eos/pad tokens; it is damaged")
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                special_tokens=[(bos, bos_id)])
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = False  # HF convention: "<|eos|>" written in text is the control token
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        # who we are, so that importing the folder need not re-parse a large tokenizer.json to identify it
        # (trusted only while tokenizer.json is byte-identical to what was written)
        "toolkit_tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                              "vocab_size": tokenizer.vocab_size,
                              "file_sha256": _file_sha256(folder / "tokenizer.json")},
    }
    if getattr(tokenizer, "chat_template", None):  # chat.py's template as Jinja, for apply_chat_template
        tokenizer_config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": eos, "pad_token": pad}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading folders


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '10KiB', '1234' -> bytes (decimal units, binary with 'i')."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"cannot read the size '{text}'; write it like 2GB, 500MB or 1000000")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise UserError(f"the size '{text}' must be positive")
    return size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_hf_weights(hf_sd: Mapping[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json when the weights
    exceed max_shard_size bytes. Returns the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_sd.items():
        n = _nbytes(tensor)
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += n
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_WEIGHTS), metadata=metadata)
        return [SAFE_WEIGHTS]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        files.append(file)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in hf_sd.values())}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [SAFE_INDEX]


def load_hf_weights(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: model.safetensors or the shards its index names (memory-mapped on CPU)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"'{folder / SAFE_INDEX}' is unreadable ({first_line(e)}); the folder is "
                            f"damaged") from None
    elif (folder / SAFE_WEIGHTS).is_file():
        files = [SAFE_WEIGHTS]
    else:
        hint = ""
        if any(folder.glob("*.bin")):  # pickles: never loaded here (they can run code); transformers converts them
            hint = (f" (it has only PyTorch .bin weights; if you trust its source, convert them with transformers: "
                    f"AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained('<new folder>') writes "
                    f"safetensors)")
        raise UserError(f"'{folder}' holds no {SAFE_WEIGHTS} or {SAFE_INDEX}{hint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(folder / file), device=str(device)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(f"could not read '{folder / file}' ({first_line(e)}); the folder is damaged or "
                            f"incomplete") from None
    return state


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an --output_dir that holds something we must not replace (after cleaning what a killed export left
    beside it)."""
    recover_atomic_folder(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir '{output_dir}' is a file; choose another --output_dir")
    if output_dir.exists() and not overwrite:
        raise UserError(f"'{output_dir}' already exists; choose another --output_dir or pass --overwrite")
    if output_dir.exists() and not (output_dir / "config.json").is_file() and any(output_dir.iterdir()):
        raise UserError(f"'{output_dir}' exists and is not a HF model folder; refusing to replace it")


def write_hf_folder(output_dir: Path | str, args: ModelArgs, state_dict: Mapping[str, torch.Tensor],
                    tokenizer: Any = None, max_shard_size: int | str = "2GB", overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a complete HF folder atomically (common.atomic_folder): a failure or a kill never leaves a
    half-written model under output_dir, and an existing one is replaced only once the new one is complete."""
    output_dir = Path(output_dir)
    hf_sd = to_hf_state_dict(state_dict, args)  # checks that HF can express the model
    check_output_dir(output_dir, overwrite)
    limit = parse_size(max_shard_size)
    if dtype is not None:  # the router stays fp32, as transformers keeps it (_keep_in_fp32_modules_strict)
        hf_sd = {k: v if _is_router(k) or not v.is_floating_point() else v.to(dtype) for k, v in hf_sd.items()}
    weight_dtype = dtype or state_dict["embed.weight"].dtype
    with atomic_folder(output_dir, "--output_dir") as tmp:
        config = to_hf_config(args, tokenizer, dtype=weight_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        bos, eos, pad = config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]
        generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        try:
            save_hf_weights(hf_sd, tmp, limit)
        except SafetensorError as e:  # how safetensors reports a full disk: atomic_folder makes it one line
            raise OSError(first_line(e)) from None
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, args.max_seq_len)
    return output_dir


def _is_router(hf_name: str) -> bool:
    return hf_name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))


def export_source(checkpoint_path: Path | str) -> tuple[Path, dict[str, Any], ModelArgs]:
    """The checks of an export made before any weight is read: the checkpoint (root or step folder) ->
    (step folder, meta, model args), UserError when HF cannot express the model."""
    step_dir = checkpoint.resolve_checkpoint(checkpoint_path)
    meta = checkpoint.read_meta(step_dir)
    try:
        args = ModelArgs.from_dict(meta["model_args"])
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint '{step_dir}' has no usable model_args in its {checkpoint.META_FILE} "
                        f"({first_line(e)}); it is damaged") from None
    check_exportable(args)
    return step_dir, meta, args


def export_hf(checkpoint_path: Path | str, output_dir: Path | str, tokenizer: Any = None,
              max_shard_size: int | str = "2GB", overwrite: bool = False, dtype: torch.dtype | None = None,
              source: tuple[Path, dict[str, Any], ModelArgs] | None = None) -> Path:
    """A checkpoint (root or step folder) -> a HF DeepseekV3 folder at output_dir. `tokenizer` (ours) is written
    alongside when given; its fingerprint must match the one the checkpoint records. `source`: what
    export_source(checkpoint_path) returned, when the caller has already checked it."""
    step_dir, meta, args = source or export_source(checkpoint_path)
    if tokenizer is not None:
        stored = (meta.get("tokenizer") or {}).get("fingerprint")
        if stored:
            import tokenizer as tokenizer_mod

            tokenizer_mod.check_fingerprint(tokenizer, stored, f"the checkpoint {step_dir}")
        if tokenizer.vocab_size > args.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{args.vocab_size}; use the tokenizer the model was trained with")
    check_output_dir(Path(output_dir), overwrite)  # before reading the weights
    try:
        state_dict = checkpoint.load_weights(step_dir / checkpoint.WEIGHTS_FILE)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"could not read the weights of '{step_dir}' ({first_line(e)}); the checkpoint is "
                        f"damaged") from None
    return write_hf_folder(output_dir, args, state_dict, tokenizer, max_shard_size, overwrite, dtype)


def read_hf_config(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"'{folder}' has no config.json; it is not a HF model folder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"the HF model folder's config '{path}' is unreadable ({first_line(e)}); it is damaged: "
                        f"restore or re-export it") from None
    if not isinstance(config, dict):
        raise UserError(f"the HF model folder's config '{path}' is unreadable (a JSON object was expected); it is "
                        f"damaged: restore or re-export it")
    return config


def is_hf_model_folder(path: Path | str) -> bool:
    """A folder with a config.json that is not one of our checkpoints: loaded (and checked) as a HF folder, so
    that a folder of another architecture, or a damaged config.json, is reported as such."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / checkpoint.META_FILE).exists()


def load_any_model(path: Path | str, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A HF DeepseekV3 folder (load_hf_model) or one of our checkpoints, a root or a step folder
    (checkpoint.load_model) -> (model in eval mode, meta). dtype=None keeps the stored dtype (memory-mapped
    weights on CPU, no copy); another dtype converts every weight except the router's, which stays fp32 as
    transformers keeps it."""
    if is_hf_model_folder(path):
        return load_hf_model(path, device=device, dtype=dtype)
    model, meta = checkpoint.load_model(path, device=device)  # verified; the newest intact step of a run folder
    if dtype is not None:
        cast_keeping_router(model, dtype)
    return model, meta


def cast_keeping_router(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(dtype), except that below fp32 the router's weight and balancing bias stay fp32: rounding them
    to bf16 changes which experts are chosen (transformers keeps them fp32 for the same reason)."""
    router = {id(t) for moe in model.moe_layers() for t in (*moe.gate.parameters(), *moe.gate.buffers())} \
        if dtype.itemsize < 4 else set()
    for tensor in (*model.parameters(), *model.buffers()):
        target = torch.float32 if id(tensor) in router else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return model


def load_folder_tokenizer(folder: Path | str):
    """Our Tokenizer for the tokenizer.json of a HF folder: the trained kind when it has our special tokens,
    else Mistral's kind when it has <s>/</s>; UserError otherwise."""
    import tokenizer as tokenizer_mod

    file = Path(folder) / "tokenizer.json"
    try:
        return tokenizer_mod.load_trained_tokenizer(file)
    except UserError:
        return tokenizer_mod.load_mistral_tokenizer(file)


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_tokenizer_meta(folder: Path | str) -> dict[str, Any] | None:
    """{kind, fingerprint, vocab_size} of a HF folder's tokenizer.json (like a checkpoint's meta), or None."""
    import tokenizer as tokenizer_mod

    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    try:  # written by our export and unchanged since: no need to parse it
        recorded = json.loads((Path(folder) / "tokenizer_config.json").read_text())["toolkit_tokenizer"]
        if recorded["file_sha256"] == _file_sha256(file):
            return {k: recorded[k] for k in ("kind", "fingerprint", "vocab_size")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return load_folder_tokenizer(folder).describe()
    except UserError:  # some other tokenizer: still identify it
        try:
            from tokenizers import Tokenizer as RustTokenizer

            backend = RustTokenizer.from_file(str(file))
        except Exception:
            return None
        return {"kind": "hf", "fingerprint": tokenizer_mod.compute_fingerprint(backend),
                "vocab_size": backend.get_vocab_size(with_added_tokens=True)}


def load_hf_model(folder: Path | str, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A HF DeepseekV3 folder -> (our Transformer in eval mode, meta like a checkpoint's: model_args, tokenizer,
    source). Weights are memory-mapped on CPU and assigned without copies when no dtype is asked for."""
    from model import Transformer

    folder = Path(folder)
    config = read_hf_config(folder)
    try:
        args = from_hf_config(config)
    except UserError as e:
        raise UserError(f"'{folder}': {e}") from None
    hf_sd = load_hf_weights(folder, device=device)
    state_dict = from_hf_state_dict(hf_sd, args, rope_interleave=_value(config, "rope_interleave", bool, True))
    del hf_sd
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in expected:
            raise UserError(f"'{folder}': our model has no tensor '{name}' (an incompatible model version)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"'{folder}': tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(expected[name].shape)}; the weights do not match config.json")
    if args.tie_embeddings:
        state_dict["head.weight"] = state_dict["embed.weight"]
    # one dtype for the weights, except the router (weight and balancing bias), which stays fp32 below fp32 as
    # transformers keeps it (_keep_in_fp32_modules_strict): rounding it changes which experts are chosen
    weight_dtype = dtype or state_dict["embed.weight"].dtype
    router_dtype = torch.float32 if weight_dtype.itemsize < 4 else weight_dtype
    for name, tensor in list(state_dict.items()):
        target = router_dtype if ".ffn.gate." in name else weight_dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            state_dict[name] = tensor.to(target)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise UserError(f"'{folder}': no weights for {', '.join(missing[:5])}")
    # the tensors themselves (memory-mapped) become the parameters: no second copy of the model
    model.load_state_dict(state_dict, strict=True, assign=True)
    if args.tie_embeddings:
        model.head.weight = model.embed.weight
    model.init_buffers(torch.device(device))
    tokenizer_meta = folder_tokenizer_meta(folder)
    if tokenizer_meta is not None:  # where generate.py finds it without a tokenizer flag
        tokenizer_meta["path"] = str((folder / "tokenizer.json").resolve())
    meta = {"model_args": args.to_dict(), "tokenizer": tokenizer_meta, "source": "hf", "hf_folder": str(folder)}
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> None:
    cfg: ExportConfig = parse_config(ExportConfig, argv, description=__doc__.split("\n\n")[0])
    parse_size(cfg.max_shard_size)  # a malformed size fails before any work
    source = export_source(cfg.save_file_name)
    step_dir, meta, _ = source
    check_output_dir(Path(cfg.output_dir), cfg.overwrite)
    tok = None
    if cfg.save_tokenizer:
        import tokenizer as tokenizer_mod

        tok = tokenizer_mod.load_recorded_tokenizer(cfg, meta.get("tokenizer"), f"the checkpoint {step_dir}")
    dtype = None if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    out = export_hf(step_dir, cfg.output_dir, tok, max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite,
                    dtype=dtype, source=source)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    size = sum((out / f).stat().st_size for f in shards)
    others = [f for f in files if f not in shards]
    print(f"exported {step_dir} -> {out}: {len(shards)} safetensors file(s), {size / 1e6:.1f} MB; "
          f"{', '.join(others)}")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained('{out}'), "
          f"AutoTokenizer.from_pretrained('{out}')")


if __name__ == "__main__":
    run_main(main)
