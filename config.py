"""The configuration shared by every script.

`ModelArgs` holds every architecture field under DeepSeek-V3's names. Each script has one options dataclass;
its command-line parser is generated from the dataclass (`parse_config`), so a field is declared exactly once
with its default and help text.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, TypeVar


def opt(default: Any, help: str, choices: Sequence[Any] | None = None, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with help text, optional choices and an optional range (ge/gt/le/lt bounds, checked by
    `check_options` when the dataclass is built) for the generated parser."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


def redefault(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """`cls`'s field `name` (its help, choices and range) with another default, and optionally another help: a
    stage's own default for an inherited option, without retyping the option."""
    parent = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=default, metadata={**parent.metadata, **({"help": help} if help else {})})


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
             "lt": lambda v, b: v < b}


def check_options(obj: Any) -> None:
    """Range-check every field of an options dataclass against the bounds declared with `opt`; the first
    problem is a one-line ConfigError naming the flag, the allowed range and the value given."""
    import math

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        bounds = f.metadata.get("bounds") or {}
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number (got {value})")
        for kind, bound in bounds.items():
            if not _BOUND_OK[kind](value, bound):
                allowed = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())
                raise ConfigError(f"--{f.name} must be {allowed} (got {value:g})")


class Options:
    """Base of every options dataclass: building one range-checks its fields."""

    def __post_init__(self) -> None:
        check_options(self)


# ----------------------------------------------------------------------------------------------------------------
# Model architecture


@dataclass
class ModelArgs(Options):
    """Every architecture field, named as in DeepSeek-V3's reference `ModelArgs`."""

    vocab_size: int = opt(32768, "vocabulary size; train.py sets it from the tokenizer unless given explicitly",
                          ge=1, le=2**24)
    dim: int = opt(256, "model width (hidden size)", ge=1)
    inter_dim: int = opt(1024, "hidden size of the dense SwiGLU feed-forward layers", ge=1)
    moe_inter_dim: int = opt(256, "hidden size of each routed and shared expert", ge=1)
    n_layers: int = opt(4, "number of transformer blocks", ge=1)
    n_dense_layers: int = opt(1, "the first n_dense_layers blocks use a dense SwiGLU; the rest use MoE", ge=0)
    n_heads: int = opt(8, "attention heads", ge=1)
    max_seq_len: int = opt(256, "context length in tokens", ge=1)
    # attention
    attn_type: str = opt("mla", "attention: DeepSeek Multi-Head Latent Attention or standard multi-head/GQA",
                         choices=("mla", "mha"))
    n_kv_heads: int = opt(0, "key/value heads for attn_type=mha (grouped-query); 0 means n_heads", ge=0)
    head_dim: int = opt(0, "head size for attn_type=mha; 0 means dim // n_heads", ge=0)
    q_lora_rank: int = opt(0, "rank of the low-rank query projection; 0 means a full-rank query", ge=0)
    kv_lora_rank: int = opt(64, "rank of the compressed key/value latent (what the KV cache stores)", ge=1)
    qk_nope_head_dim: int = opt(32, "per-head query/key size without rotary embedding", ge=0)
    qk_rope_head_dim: int = opt(32, "per-head query size with rotary embedding; the RoPE key is shared by heads", ge=0)
    v_head_dim: int = opt(32, "per-head value size", ge=1)
    rope_theta: float = opt(10000.0, "rotary embedding base", gt=0)
    sliding_window: int = opt(0, "attend only to the last sliding_window tokens; 0 means full causal attention", ge=0)
    sliding_window_layers: str = opt("", "comma-separated layer indices that use the sliding window; "
                                         "empty means every layer (when sliding_window > 0)")
    # mixture of experts
    n_routed_experts: int = opt(8, "routed experts per MoE layer", ge=1)
    n_shared_experts: int = opt(1, "always-active shared experts per MoE layer", ge=0)
    n_activated_experts: int = opt(2, "routed experts each token is sent to (top-k)", ge=1)
    n_expert_groups: int = opt(1, "expert groups for group-limited routing", ge=1)
    n_limited_groups: int = opt(1, "groups a token may route to when n_expert_groups > 1", ge=1)
    score_func: str = opt("softmax", "router scoring function", choices=("softmax", "sigmoid"))
    route_scale: float = opt(1.0, "scale applied to the normalised top-k routing weights", gt=0)
    bias_update_speed: float = opt(0.001, "step of DeepSeek-V3's auxiliary-loss-free balancing bias update; "
                                          "0 disables it", ge=0)
    aux_loss_alpha: float = opt(0.0, "weight of the sequence-wise auxiliary balance loss; 0 disables it", ge=0)
    # misc
    norm_eps: float = opt(1e-6, "RMSNorm epsilon", gt=0)
    tie_embeddings: bool = opt(False, "share the token embedding and the output head")
    init_std: float = opt(0.02, "standard deviation of the weight initialisation", gt=0)
    # training-recipe options (bench/bench_learning.py measures them)
    zero_init_out: bool = opt(False, "initialise the output projections (attention wo, feed-forward w2) to zero, "
                                     "so every block starts as the identity")
    qk_norm: bool = opt(False, "RMSNorm each head's query and the shared RoPE key (MLA; the key/value latent is "
                               "normalised already); not expressible in HF DeepseekV3")
    logit_softcap: float = opt(0.0, "cap the output logits smoothly at +-logit_softcap (cap * tanh(z / cap)); 0 "
                                    "disables it; not expressible in HF DeepseekV3", ge=0)
    dropout: float = opt(0.0, "dropout on the attention and feed-forward outputs in training (none at inference, "
                              "so it exports)", ge=0, lt=1)

    def __post_init__(self) -> None:
        check_options(self)
        problems = []
        if self.dim % self.n_heads and self.attn_type == "mha" and not self.head_dim:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_layers > 0 and self.n_dense_layers < self.n_layers:
            if self.n_activated_experts > self.n_routed_experts:
                problems.append(f"n_activated_experts={self.n_activated_experts} exceeds "
                                f"n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % max(self.n_expert_groups, 1):
                problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by "
                                f"n_expert_groups={self.n_expert_groups}")
            elif self.n_expert_groups > 1 and not 1 <= self.n_limited_groups <= self.n_expert_groups:
                problems.append(f"n_limited_groups={self.n_limited_groups} must be between 1 and "
                                f"n_expert_groups={self.n_expert_groups}")
            elif (self.n_expert_groups > 1 and self.n_limited_groups * (self.n_routed_experts // self.n_expert_groups)
                  < self.n_activated_experts):
                problems.append(f"n_limited_groups={self.n_limited_groups} groups of "
                                f"{self.n_routed_experts // self.n_expert_groups} experts cannot hold "
                                f"n_activated_experts={self.n_activated_experts}")
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if problems:
            raise ConfigError("invalid model configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelArgs":
        """Build from a stored config, ignoring keys this version does not know (forward compatibility)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Named presets: a preset is a set of ModelArgs overrides; any field can still be overridden by its own flag.
# DeepSeek-V3's sigmoid router (so the models export to HF's DeepseekV3), with a bias step ten times DeepSeek's:
# 0.001 balances over very long runs, but in a run of a few hundred steps the router collapses onto its top-k
# experts before the bias catches up (measurements in the README's MoE bullet).
SMALL_MOE_ROUTING: dict[str, Any] = dict(score_func="sigmoid", bias_update_speed=0.01)

# From small-moe up, the latent cache (kv_lora_rank + qk_rope_head_dim numbers per token and layer) is 3/32 of the
# model width, under a tenth of the 2 x dim that multi-head attention of the same width caches (DeepSeek-V3: 576 of
# 2 x 7168). tiny keeps a wider latent (48 of 256): its cache is negligible and its quality matters more.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # trains on 2 CPU cores in minutes (2.7M parameters with a 4k vocabulary, 1.3M active per token)
    "tiny": dict(dim=128, inter_dim=384, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=4,
                 max_seq_len=256, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                 n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, **SMALL_MOE_ROUTING),
    # the tiny shape with dense feed-forward layers only
    "tiny-dense": dict(dim=128, inter_dim=384, n_layers=4, n_dense_layers=4, n_heads=4, max_seq_len=256,
                       kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16),
    # 24M parameters with a 32k vocabulary (12M active): the size benchmarked against HF transformers on CPU
    "small-moe": dict(dim=256, inter_dim=1024, moe_inter_dim=256, n_layers=4, n_dense_layers=1, n_heads=8,
                      max_seq_len=256, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, **SMALL_MOE_ROUTING),
    # 27M parameters without the embedding (35M with a 32k vocabulary): more experts, a bit deeper
    "moe-30m": dict(dim=256, inter_dim=1024, moe_inter_dim=256, n_layers=6, n_dense_layers=1, n_heads=8,
                    max_seq_len=512, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, **SMALL_MOE_ROUTING),
    # GPT-2-small class: 12 x 768, dense (101M without the embedding)
    "gpt2-small": dict(dim=768, inter_dim=2048, n_layers=12, n_dense_layers=12, n_heads=12, max_seq_len=1024,
                       q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=64),
    # GPT-2-small width with fine-grained MoE: 0.49B without the embedding (0.52B with 32k), 0.15B active
    "moe-500m": dict(dim=768, inter_dim=2048, moe_inter_dim=512, n_layers=12, n_dense_layers=1, n_heads=12,
                     max_seq_len=2048, q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=64,
                     qk_rope_head_dim=16, v_head_dim=64, n_routed_experts=32, n_shared_experts=2,
                     n_activated_experts=6, n_expert_groups=8, n_limited_groups=3, score_func="sigmoid",
                     route_scale=2.5),
    # DeepSeek-V3's proportions: 1.55B without the embedding (1.75B with Mistral's 131k vocabulary), 0.63B active
    "moe-1.5b": dict(dim=1536, inter_dim=4096, moe_inter_dim=512, n_layers=16, n_dense_layers=1, n_heads=16,
                     max_seq_len=4096, q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=128,
                     qk_rope_head_dim=32, v_head_dim=128, n_routed_experts=32, n_shared_experts=2,
                     n_activated_experts=6, n_expert_groups=8, n_limited_groups=3, score_func="sigmoid",
                     route_scale=2.5),
}


def model_args_from_preset(preset: str, **overrides: Any) -> ModelArgs:
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; choose one of: {', '.join(MODEL_PRESETS)}")
    values = {**MODEL_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelArgs(**values)


# ----------------------------------------------------------------------------------------------------------------
# Options shared by several scripts


@dataclass
class DatasetOptions(Options):
    dataset_path_huggingface: str = opt("builtin", "text source: a HF hub dataset id, a local .txt/.jsonl/"
                                                   ".parquet file or folder, or 'builtin' for the corpus "
                                                   "shipped with Python (no download)")
    dataset_sub_set: str = opt("", "HF dataset configuration (subset) name, e.g. 'sample-10BT'")
    dataset_split: str = opt("train", "dataset split to read")
    text_column: str = opt("text", "column holding the document text (jsonl/parquet/hub datasets)")
    trust_remote_code: bool = opt(False, "allow the HF dataset's own loading script to run")


@dataclass
class TokenizerOptions(Options):
    tokenizer_path: str = opt("tokenizer", "folder (or tokenizer.json) of the tokenizer trained by "
                                           "train_tokenizer.py")
    load_mistral_tokenizer: bool = opt(False, "use Mistral-Nemo's pre-trained tokenizer instead of the trained one")
    mistral_tokenizer_path: str = opt("tokenizer.json", "Mistral-Nemo's tokenizer.json (or tekken.json, or the "
                                                        "folder holding it)")


# ----------------------------------------------------------------------------------------------------------------
# One options dataclass per script


@dataclass
class TrainTokenizerConfig(DatasetOptions):
    """Options of train_tokenizer.py."""

    # the lower bound (256 byte tokens + the reserved special tokens) is checked by train_tokenizer.py, which knows
    # the special tokens
    vocab_size: int = opt(32768, "vocabulary size of the trained tokenizer, special tokens included", ge=1,
                          le=2**24)
    tokenizer_train_shard_size: int = opt(10_000_000, "characters of text to train on (streamed up to this many)", ge=1)
    min_frequency: int = opt(2, "minimum pair frequency for a merge", ge=1)
    output_path: str = opt("tokenizer", "folder to write tokenizer.json and its metadata into")
    overwrite: bool = opt(False, "replace the tokenizer already in --output_path (datasets and checkpoints made "
                                 "with it will no longer match it)")


@dataclass
class TokenizeDataConfig(DatasetOptions, TokenizerOptions):
    """Options of tokenize_data.py."""

    data_file_name: str = opt("data", "output folder for the .npy token shards")
    encoded_dataset_shard_size: int = opt(10_000_000, "tokens per shard", ge=1, le=2**31)
    val_tokens: int = opt(0, "tokens held out for validation, whole documents chosen by a seeded hash of their "
                             "position (spread over the whole source); 0 means --val_fraction of the data, at most "
                             "one shard", ge=0)
    val_fraction: float = opt(0.1, "share of the tokens held out for validation when --val_tokens is 0 (capped at "
                                   "--encoded_dataset_shard_size tokens)", gt=0, le=0.5)
    val_seed: int = opt(0, "seed of the validation document selection", ge=0, le=2**63 - 1)
    max_tokens: int = opt(0, "stop after this many tokens (0 = no limit)", ge=0)
    max_documents: int = opt(0, "stop after this many documents (0 = no limit)", ge=0)
    num_workers: int = opt(0, "encoding threads (Rust); 0 means one per CPU core this process may use", ge=0)
    overwrite: bool = opt(False, "replace the shards already in --data_file_name")
    encoder: str = opt("auto", "encoding engine: the tokenizer's own Rust encode_batch ('tokenizers'), or tiktoken "
                               "for Mistral's tekken vocabulary (same ids, checked on the first documents, several "
                               "times faster); auto uses tiktoken for Mistral's tokenizer when it is installed",
                       choices=("auto", "tokenizers", "tiktoken"))


@dataclass
class TrainConfig(TokenizerOptions):
    """Options of train.py (the architecture comes from --model plus any ModelArgs flag)."""

    model: str = opt("tiny", "model preset; every ModelArgs field can be overridden by its own flag",
                     choices=tuple(MODEL_PRESETS))
    data_file_name: str = opt("data", "folder of token shards written by tokenize_data.py")
    save_file_name: str = opt("checkpoints", "checkpoint folder (training resumes from its latest checkpoint)")
    steps: int = opt(1000, "optimizer steps", ge=1)
    total_batch_size: int = opt(16384, "tokens per optimizer step, across all ranks and micro-steps", ge=1)
    batch_size: int = opt(16, "sequences per micro-batch per rank", ge=1)
    seq_len: int = opt(0, "training sequence length; 0 means the model's max_seq_len", ge=0)
    lr: float = opt(6e-3, "peak AdamW learning rate (with --optimizer muon: of the output head, norms and router)",
                    gt=0)
    min_lr: float = opt(6e-4, "learning rate at the end of the decay (Muon groups: min_lr / lr of --muon_lr)",
                        ge=0)
    warm_up: int = opt(100, "linear warm-up steps", ge=0)
    lr_schedule: str = opt("wsd", "cosine: decay from the end of the warm-up; wsd: warmup-stable-decay, the peak "
                                     "rate until the last --decay_frac of the steps, then linear to min_lr (its "
                                     "checkpoint before the decay extends to a longer run)", choices=("cosine", "wsd"))
    decay_frac: float = opt(0.4, "fraction of --steps spent decaying with --lr_schedule wsd", gt=0, le=1)
    optimizer: str = opt("muon", "adamw: AdamW everywhere; muon: Muon for the hidden weight matrices (attention, "
                                  "feed-forward, routed experts) and AdamW (--lr) for the embedding, head, norms "
                                  "and router", choices=("adamw", "muon"))
    embed_lr: float = opt(0.015, "peak AdamW rate of the token embedding, without weight decay (0: --lr, with "
                                 "decay; an embedding tied to the head always follows --lr)", ge=0)
    head_lr: float = opt(0.0, "peak AdamW rate of the output head, with weight decay (0: --lr)", ge=0)
    muon_lr: float = opt(0.01, "peak Muon learning rate (with --muon_lr_rule original it transfers across widths)",
                         gt=0)
    muon_lr_rule: str = opt("original", "per-matrix Muon rate: original = muon_lr * sqrt(max(1, out/in)) "
                                        "(spectral: width-independent); match_rms_adamw = muon_lr * 0.2 * "
                                        "sqrt(max(out, in)) (update RMS of AdamW's)",
                            choices=("original", "match_rms_adamw"))
    muon_momentum: float = opt(0.95, "Muon momentum (Nesterov)", ge=0, lt=1)
    muon_weight_decay: float = opt(0.0, "Muon decoupled weight decay (multiplied by the Muon rate)", ge=0)
    muon_wd_per_epoch: float = opt(0.2, "Muon weight decay added for each pass over the training data done after "
                                        "the first, growing step by step (a single pass keeps --muon_weight_decay; "
                                        "a run that repeats its data needs more regularisation); train.py only",
                                   ge=0)
    keep_best: bool = opt(False, "also keep the checkpoint with the lowest validation loss in "
                                 "<save_file_name>/best (a run that overfits still ends with its best model)")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)", ge=0)
    wd_per_epoch: float = opt(0.2, "AdamW weight decay added for each pass over the training data done after the "
                                   "first, as --muon_wd_per_epoch does for Muon's, to the AdamW matrices that decay "
                                   "(with --optimizer muon the head and the router; with adamw every matrix but an "
                                   "--embed_lr embedding); train.py only", ge=0)
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = opt(1.0, "gradient norm clipping; 0 disables it", ge=0)
    eval_rate: int = opt(100, "evaluate every this many steps (0 = never)", ge=0)
    eval_steps: int = opt(20, "validation batches per evaluation", ge=0)
    save_rate: int = opt(500, "checkpoint every this many steps (and always at the end)", ge=1)
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep", ge=1)
    seed: int = opt(1337, "random seed", ge=0, le=2**63 - 1)
    dtype: str = opt("auto", "compute dtype: auto picks bf16 on GPUs that support it and fp32 elsewhere",
                     choices=("auto", "fp32", "bf16", "fp16"))
    device: str = opt("auto", "cpu, cuda, or auto")
    compile_model: bool = opt(False, "torch.compile the model")
    backend: str = opt("inductor", "torch.compile backend")
    shuffle: bool = opt(True, "shuffle the order of training windows (seeded)")
    resume: bool = opt(True, "continue from the latest checkpoint in --save_file_name when there is one")
    overwrite: bool = opt(False, "with --resume=False, replace the run already in --save_file_name (its files are "
                                 "set aside and removed once this run has saved its final checkpoint)")
    resume_from: str = opt("", "continue from this checkpoint of the run in --save_file_name instead of its newest: "
                               "<save_file_name>/stable, which a --lr_schedule wsd run keeps at the end of its "
                               "stable phase, extends a finished run with a larger --steps (the run's later "
                               "checkpoints are set aside, and removed once the run finishes)")
    init_from: str = opt("", "start from these weights: a checkpoint folder or a HF DeepseekV3 model folder")
    log_file: str = opt("", "JSONL log path; empty means <save_file_name>/log.jsonl")
    log_every: int = opt(1, "print a progress line every this many steps (the JSONL log gets every step)", ge=1)
    quiet: bool = opt(False, "print only the summary, evaluations, checkpoints and errors")
    peak_flops: float = opt(0.0, "peak FLOP/s per device for MFU; 0 means the GPU's table value (bf16/fp16) or "
                                 "the matmul rate measured at startup", ge=0)
    parallel: str = opt("ddp", "data parallelism under torchrun: ddp keeps a full copy of the model, gradients and "
                               "optimizer state on every rank; fsdp shards them across ranks (FSDP2, sharded DCP "
                               "checkpoints; needs torchrun)", choices=("ddp", "fsdp"))
    reshard_after_forward: bool = opt(True, "fsdp: free each block's gathered weights after its forward and gather "
                                            "them again for backward (less memory, one more all-gather per block)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_lr > self.lr:  # the decay would climb: the defaults' min_lr is for the default lr
            raise ConfigError(f"--min_lr {self.min_lr:g} is above --lr {self.lr:g}; pass a --min_lr at most --lr "
                              f"(the default recipe decays to a tenth: --min_lr {self.lr / 10:g})")


@dataclass
class FineTuneConfig(TrainConfig):
    """What every stage that starts from a trained model changes in TrainConfig's defaults: AdamW with a cosine
    decay at the stage's own --lr (Muon at pretraining's --muon_lr moved a fine-tuned model much too far: SFT's
    held-out answer loss 3.51 against AdamW's 3.39 after the quickstart's 150 steps)."""

    optimizer: str = redefault(TrainConfig, "optimizer", "adamw")
    lr_schedule: str = redefault(TrainConfig, "lr_schedule", "cosine")
    muon_wd_per_epoch: float = opt(0.0, "pretraining's Muon weight decay per pass over the data (train.py); a "
                                        "fine-tuning stage takes --muon_weight_decay alone, so this stays 0", ge=0)
    wd_per_epoch: float = opt(0.0, "pretraining's AdamW weight decay per pass over the data (train.py); a "
                                   "fine-tuning stage takes --weight_decay alone, so this stays 0", ge=0)

    embed_lr: float = opt(0.0, "peak AdamW rate of the token embedding (0: --lr, with decay, as every other "
                               "AdamW matrix when fine-tuning)", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, fixed in (("muon_wd_per_epoch", "muon_weight_decay"), ("wd_per_epoch", "weight_decay")):
            if getattr(self, name):  # its passes are token passes over a pretraining data folder
                raise ConfigError(f"--{name} is for pretraining (train.py); set the fine-tuning stage's weight "
                                  f"decay with --{fixed}")


@dataclass
class SFTConfig(FineTuneConfig):
    """Options of sft.py: train.py's options (the same loop) plus where the conversations come from and how
    they are cut into rows; the defaults differ where fine-tuning differs from pretraining."""

    init_from: str = opt("checkpoints", "the pretrained model: a checkpoint folder or a HF DeepseekV3 model folder")
    save_file_name: str = redefault(TrainConfig, "save_file_name", "sft_checkpoints")
    dataset_path_huggingface: str = opt("builtin", "conversations: a HF hub dataset id, a local .jsonl/.parquet "
                                                   "file or folder, or 'builtin' (chat_data.py, no download)")
    dataset_sub_set: str = opt("", "HF dataset configuration (subset) name")
    dataset_split: str = opt("train", "dataset split to read")
    trust_remote_code: bool = opt(False, "allow the HF dataset's own loading script to run")
    messages_column: str = opt("messages", "column holding a conversation as a list of {role, content}")
    prompt_column: str = opt("prompt", "without a messages column: the column of the user's message")
    response_column: str = opt("response", "without a messages column: the column of the assistant's reply")
    max_conversations: int = opt(0, "read at most this many conversations per split (0 = all)", ge=0)
    pack: bool = opt(True, "pack whole conversations into each row (otherwise one conversation per padded row)")
    overlong: str = opt("truncate", "a conversation longer than a row: truncate it, or drop it",
                        choices=("truncate", "drop"))
    steps: int = redefault(TrainConfig, "steps", 300)
    total_batch_size: int = redefault(TrainConfig, "total_batch_size", 4096)
    lr: float = redefault(TrainConfig, "lr", 3e-4)
    min_lr: float = redefault(TrainConfig, "min_lr", 3e-5)
    warm_up: int = redefault(TrainConfig, "warm_up", 20)
    eval_rate: int = opt(100, "evaluate the held-out answer loss every this many steps (0 = never)", ge=0)


@dataclass
class TaskSFTConfig(FineTuneConfig):
    """Options of tasks.py (supervised fine-tuning on a built-in task's format before rl.py)."""

    task: str = opt("add2", "built-in task: its training problems with their answers", choices=("add2", "add3",
                                                                                              "reverse"))
    eval_problems: int = opt(500, "held-out problems per evaluation (greedy exact match)", ge=1)
    lr: float = redefault(TrainConfig, "lr", 3e-3)
    min_lr: float = redefault(TrainConfig, "min_lr", 3e-3)
    warm_up: int = redefault(TrainConfig, "warm_up", 20)
    weight_decay: float = redefault(TrainConfig, "weight_decay", 0.0)
    steps: int = redefault(TrainConfig, "steps", 600)
    batch_size: int = opt(64, "problems per micro-batch per rank", ge=1)
    total_batch_size: int = opt(0, "problems per optimizer step across ranks and micro-steps; 0 means one "
                                   "micro-batch of --batch_size per rank", ge=0)
    eval_rate: int = opt(200, "evaluate held-out accuracy every this many steps (0 = never)", ge=0)


@dataclass
class DPOConfig(FineTuneConfig):
    """Options of dpo.py (preference tuning; the training options are train.py's)."""

    dataset_path_huggingface: str = opt("builtin", "preference pairs: a HF hub dataset id, a local .jsonl/.parquet "
                                                   "file or folder, or 'builtin' (pairs from the built-in addition "
                                                   "task)")
    dataset_sub_set: str = opt("", "HF dataset configuration (subset) name")
    dataset_split: str = opt("train", "dataset split to read")
    val_fraction: float = opt(0.05, "fraction of the pairs held out for evaluation (seeded)", ge=0, lt=1)
    beta: float = opt(0.1, "strength of the tie to the reference model (IPO: the regularisation tau)", gt=0)
    loss_type: str = opt("sigmoid", "preference loss", choices=("sigmoid", "ipo", "hinge", "robust"))
    label_smoothing: float = opt(0.0, "probability that a preference label is flipped: conservative DPO with "
                                      "sigmoid, robust DPO with robust", ge=0, lt=0.5)
    precompute_ref: bool = opt(False, "compute the reference log-probabilities of every pair once before "
                                      "training and free the reference model")
    lr: float = redefault(TrainConfig, "lr", 1e-5)
    min_lr: float = redefault(TrainConfig, "min_lr", 1e-6)
    weight_decay: float = redefault(TrainConfig, "weight_decay", 0.0)
    warm_up: int = redefault(TrainConfig, "warm_up", 10)
    steps: int = redefault(TrainConfig, "steps", 200)
    batch_size: int = opt(8, "preference pairs per micro-batch per rank", ge=1)
    total_batch_size: int = opt(0, "preference pairs per optimizer step across ranks and micro-steps; 0 means one "
                                   "micro-batch of --batch_size per rank", ge=0)
    eval_rate: int = opt(50, "evaluate on the held-out pairs every this many steps (0 = never)", ge=0)


@dataclass
class GRPOConfig(FineTuneConfig):
    """Options of rl.py (GRPO with verifiable rewards; the training options are train.py's)."""

    task: str = opt("add2", "built-in task used with --dataset_path_huggingface builtin: its training problems "
                            "are the prompts and its held-out test set is the evaluation",
                    choices=("add2", "add3", "reverse"))
    dataset_path_huggingface: str = opt("builtin", "prompts: 'builtin' (the --task), a local .jsonl/.parquet "
                                                   "file or folder, or a HF hub dataset id")
    dataset_sub_set: str = opt("", "HF dataset configuration (subset) name")
    dataset_split: str = opt("train", "dataset split to read")
    prompt_column: str = opt("prompt", "column holding the prompt text")
    answer_column: str = opt("answer", "column holding the reference answer passed to the reward (optional)")
    reward: str = opt("builtin", "reward function as module:function or file.py:function, called as "
                                 "f(prompt, completion, answer) -> float; builtin is exact match with the answer")
    group_size: int = opt(8, "completions sampled per prompt (G)", ge=2)
    max_new_tokens: int = opt(8, "longest completion in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature of the rollouts", gt=0)
    top_p: float = opt(1.0, "nucleus sampling of the rollouts (1 disables it)", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling of the rollouts (0 disables it)", ge=0)
    clip_eps: float = opt(0.2, "clipping range of the policy ratio", gt=0, lt=1)
    kl_coef: float = opt(0.0, "weight of the KL penalty to the reference (the --init_from weights); 0 keeps no "
                              "reference model", ge=0)
    num_iterations: int = opt(1, "optimizer steps on each rollout batch (pi_old is the policy that sampled it)",
                              ge=1)
    val_fraction: float = opt(0.02, "fraction of non-builtin prompts held out for evaluation", ge=0, lt=1)
    eval_problems: int = opt(500, "held-out prompts per evaluation (greedy decoding)", ge=1)
    lr: float = redefault(TrainConfig, "lr", 3e-4)
    warm_up: int = redefault(TrainConfig, "warm_up", 0)
    min_lr: float = redefault(TrainConfig, "min_lr", 3e-4)
    weight_decay: float = redefault(TrainConfig, "weight_decay", 0.0)
    steps: int = redefault(TrainConfig, "steps", 300)
    batch_size: int = opt(16, "prompts per micro-batch per rank (each sampled group_size times)", ge=1)
    total_batch_size: int = opt(0, "prompts per optimizer step across ranks and micro-steps; 0 means one "
                                   "micro-batch of --batch_size per rank", ge=0)
    eval_rate: int = opt(100, "evaluate held-out accuracy every this many steps (0 = never)", ge=0)


@dataclass
class GenerateConfig(TokenizerOptions):
    """Options of generate.py."""

    input_text: str = opt("Hello", "the prompt")
    input_file: str = opt("", "a file with one prompt per line (generated as one batch)")
    save_file_name: str = opt("checkpoints", "checkpoint folder (its latest checkpoint), a checkpoint, or a HF "
                                             "DeepseekV3 model folder")
    num_tokens_to_generate: int = opt(100, "new tokens per prompt", ge=1)
    temperature: float = opt(0.8, "sampling temperature; 0 means greedy", ge=0)
    top_p: float = opt(0.95, "nucleus sampling: draw only from the smallest set of tokens whose probability "
                             "reaches top_p (1 disables it)", gt=0, le=1)
    top_k: int = opt(0, "draw only from the top_k most likely tokens (0 disables it)", ge=0)
    seed: int = opt(1337, "random seed", ge=0, le=2**63 - 1)
    num_samples: int = opt(1, "continuations per prompt, generated in one batch", ge=1)
    stop_at_eos: bool = opt(True, "stop a sequence at the end-of-document token")
    max_seq_len: int = opt(0, "longest prompt + generation allowed; 0 means the model's max_seq_len", ge=0)
    dtype: str = opt("auto", "compute dtype", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = opt("auto", "cpu, cuda, or auto")
    compile_model: bool = opt(False, "torch.compile the decode step (for GPUs: on CPU the eager decode path is "
                                     "faster, see bench/bench_generate.py --compile)")
    stream: bool = opt(True, "print tokens as they are produced (single sequence only)")
    chat: bool = opt(False, "talk to the model in the terminal with the chat template (chat.py): multi-turn, "
                            "/reset and /exit")
    system_prompt: str = opt("", "with --chat: a system message that starts every conversation")


@dataclass
class ServeConfig(TokenizerOptions):
    """Options of serve.py (an OpenAI-compatible HTTP server and chat page for a checkpoint)."""

    save_file_name: str = opt("checkpoints", "checkpoint folder (its latest checkpoint), a checkpoint, or a HF "
                                             "DeepseekV3 model folder")
    host: str = opt("127.0.0.1", "address to listen on; anything but localhost needs --allow_remote")
    port: int = opt(8000, "TCP port (0 picks a free one)", ge=0, le=65535)
    allow_remote: bool = opt(False, "allow --host to be an address other machines can reach (no authentication!)")
    model_name: str = opt("", "the model id clients pass; empty means the checkpoint folder's name")
    max_batch_size: int = opt(8, "sequences decoded together (continuous batching); more requests wait", ge=1)
    max_tokens: int = opt(256, "default max_tokens of a request that gives none", ge=1)
    system_prompt: str = opt("", "a system message put before chat requests that have none")
    seed: int = opt(1337, "seed for requests that give none", ge=0, le=2**63 - 1)
    dtype: str = opt("auto", "compute dtype", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = opt("auto", "cpu, cuda, or auto")


@dataclass
class ExportConfig(TokenizerOptions):
    """Options of hf_interop.py (export a checkpoint as a Hugging Face DeepseekV3 model folder)."""

    save_file_name: str = opt("checkpoints", "checkpoint folder (its latest checkpoint) or one step folder")
    output_dir: str = opt("hf_model", "HF model folder to write (config.json, safetensors, tokenizer)")
    max_shard_size: str = opt("2GB", "split the weights into safetensors shards of at most this size (e.g. 500MB)")
    dtype: str = opt("auto", "weight dtype of the export; auto keeps the checkpoint's",
                     choices=("auto", "fp32", "bf16", "fp16"))
    save_tokenizer: bool = opt(True, "also write tokenizer.json and tokenizer_config.json (the checkpoint's "
                                     "tokenizer, checked by fingerprint)")
    overwrite: bool = opt(False, "replace --output_dir when it already holds a model")


@dataclass
class ParallelConfig(Options):
    """Options of parallel.py: consolidate a sharded (FSDP) checkpoint into model.safetensors, or print the memory
    sizing table of DDP against FSDP."""

    consolidate: str = opt("", "a step folder written by train.py --parallel fsdp: write its model.safetensors from "
                               "the DCP shards")
    sizing_table: bool = opt(False, "print the per-rank memory table (the default when --consolidate is not given)")
    readme: str = opt("", "rewrite the sizing table between the sizing-table markers of this README file")
    batch_size: int = opt(4, "sizing table: sequences per micro-batch per rank", ge=1)
    seq_len: int = opt(2048, "sizing table: tokens per sequence", ge=1)
    dtype: str = opt("bf16", "sizing table: compute dtype", choices=("fp32", "bf16", "fp16"))


@dataclass
class CheckDataConfig(TokenizerOptions):
    """Options of data_loader.py: check a folder written by tokenize_data.py: metadata, every shard's header and
    size (and checksum with --verify), and optionally that it was written with the given tokenizer."""

    data_file_name: str = opt("data", "folder of token shards written by tokenize_data.py")
    check_tokenizer: bool = opt(False, "also check the shards against the tokenizer given by --tokenizer_path / "
                                       "--load_mistral_tokenizer")
    verify: bool = opt(False, "also recompute every shard's checksum (reads all the data once)")
    seq_len: int = opt(1, "fail when a split is shorter than one sequence of this length", ge=1)


@dataclass
class InspectTokenizerConfig(TokenizerOptions):
    """Options of tokenizer.py: load a tokenizer, print its description and the tokens of --text."""

    text: str = opt("Hello world! 12345 héllo 日本語", "text to encode")


# ----------------------------------------------------------------------------------------------------------------
# Parser generation


class UserError(Exception):
    """A user mistake (bad flag, missing file, mismatched tokenizer...): reported as one line, never a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value."""


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False/1/0), got '{value}'")


class OneLineErrorParser(argparse.ArgumentParser):
    """Unknown flags and bad values exit with a single line and status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, defaults_from_preset: bool = False,
                            title: str | None = None) -> None:
    """Add one flag per dataclass field. With defaults_from_preset the flags default to None, meaning 'take the
    value from the chosen preset'; help still shows the dataclass default."""
    group = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        ftype = _field_type(cls, f)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if defaults_from_preset:
            help_text += f" (default: the preset's value; base {f.default!r})"
            default = None
        else:
            help_text += f" (default: {f.default!r})"
            default = f.default
        help_text = help_text.replace("%", "%%")
        if ftype is bool:
            group.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, default=default,
                               metavar="BOOL", help=help_text)
        else:
            group.add_argument(f"--{f.name}", type=ftype, default=default, choices=choices, help=help_text)


C = TypeVar("C")


def build_parser(cls: type, description: str, with_model_args: bool = False) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=description, formatter_class=argparse.HelpFormatter)
    add_dataclass_arguments(parser, cls)
    if with_model_args:
        add_dataclass_arguments(parser, ModelArgs, defaults_from_preset=True,
                                title="model architecture (overrides the --model preset)")
    return parser


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str = "",
                 with_model_args: bool = False) -> C | tuple[C, dict[str, Any]]:
    """Parse argv into an instance of cls. With with_model_args, also return the ModelArgs overrides that were
    given explicitly (a dict of field -> value)."""
    parser = build_parser(cls, description or (cls.__doc__ or ""), with_model_args)
    namespace = vars(parser.parse_args(argv))
    own = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in namespace.items() if k in own})
    if not with_model_args:
        return config
    overrides = {k: v for k, v in namespace.items() if k not in own and v is not None}
    return config, overrides


def fail(message: str, code: int = 1) -> typing.NoReturn:
    """Report a user mistake as one line on stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_main(main: typing.Callable[[], Any]) -> None:
    """Run a script's main(): user mistakes become a one-line error and exit status 1; Ctrl-C exits with 130."""
    try:
        main()
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


def make_writable_folder(folder: "os.PathLike[str] | str", flag: str) -> None:
    """Create an output folder and check it can be written, before any long work rather than after it; a
    problem is a UserError naming the flag to change."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} '{folder}' is a file, not a folder; choose another path")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{os.getpid()}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write to the output folder '{folder}' ({type(error).__name__}: "
                        f"{error.strerror or error}); choose a writable {flag}") from None


@contextlib.contextmanager
def remove_new_folder_on_failure(folder: "os.PathLike[str] | str") -> Iterator[None]:
    """Wrap a run that creates an output folder: when the run fails, the folder is removed again if it did not
    exist before and is still empty, so a mistake leaves nothing behind."""
    created = not os.path.exists(folder)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


# ----------------------------------------------------------------------------------------------------------------
# The README's option tables are generated from the dataclasses too: `python config.py --readme README.md`
# rewrites every block between `<!-- options: NAME -->` and `<!-- /options -->` (tests check it is current).


def _shown(value: Any) -> str:
    return '`""`' if value == "" else f"`{value}`"


def options_markdown(cls: type) -> str:
    """A markdown table of a dataclass's flags: name, default, meaning."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        if f.metadata.get("choices"):
            help_text += " (one of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
        if f.metadata.get("bounds"):
            help_text += " (" + ", ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in f.metadata["bounds"].items()) + ")"
        rows.append(f"| `--{f.name}` | {_shown(f.default)} | {help_text} |")
    return "\n".join(rows)


def presets_markdown() -> str:
    """A markdown table of the model presets: the fields any preset sets, one column per preset."""
    names = list(MODEL_PRESETS)
    models = {name: model_args_from_preset(name) for name in names}
    fields = [f.name for f in dataclasses.fields(ModelArgs)
              if any(f.name in MODEL_PRESETS[name] for name in names)]
    moe_fields = {"moe_inter_dim", "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                  "n_limited_groups", "score_func", "route_scale", "bias_update_speed", "aux_loss_alpha"}

    def shown(preset: str, name: str) -> str:
        args = models[preset]
        dense_only = args.n_dense_layers >= args.n_layers
        return "-" if dense_only and name in moe_fields else str(getattr(args, name))

    rows = ["| field | " + " | ".join(f"`{n}`" for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for name in fields:
        rows.append(f"| `{name}` | " + " | ".join(shown(n, name) for n in names) + " |")
    return "\n".join(rows)


def readme_blocks() -> dict[str, str]:
    """Every generated README block by name."""
    blocks = {"train_tokenizer.py": TrainTokenizerConfig, "tokenize_data.py": TokenizeDataConfig,
              "train.py": TrainConfig, "sft.py": SFTConfig, "model": ModelArgs, "generate.py": GenerateConfig,
              "serve.py": ServeConfig, "hf_interop.py": ExportConfig, "data_loader.py": CheckDataConfig,
              "tokenizer.py": InspectTokenizerConfig, "parallel.py": ParallelConfig, "dpo.py": DPOConfig,
              "rl.py": GRPOConfig, "tasks.py": TaskSFTConfig}
    out = {name: options_markdown(cls) for name, cls in blocks.items()}
    out["presets"] = presets_markdown()
    return out


def _readme_block(name: str, table: str) -> str:
    return f"<!-- options: {name} -->\n{table}\n<!-- /options -->"


def render_readme(text: str) -> str:
    """text with every `<!-- options: NAME -->` ... `<!-- /options -->` block replaced by the generated one."""
    import re

    blocks = readme_blocks()

    def replace(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in blocks:
            raise ConfigError(f"README block '{name}' is unknown; known: {', '.join(blocks)}")
        return _readme_block(name, blocks[name])

    return re.sub(r"<!-- options: (\S+) -->.*?<!-- /options -->", replace, text, flags=re.S)


def _main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--readme":
        from pathlib import Path

        readme = Path(sys.argv[2])
        try:
            readme.write_text(render_readme(readme.read_text(encoding="utf-8")), encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot update '{readme}' ({error.strerror or error}); pass the README's path") from None
        print(f"updated the option tables in {readme}")
    else:
        for block_name, block in readme_blocks().items():
            print(_readme_block(block_name, block) + "\n")


if __name__ == "__main__":
    run_main(_main)
