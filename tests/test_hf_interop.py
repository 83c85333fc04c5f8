"""HF interoperability: our model against transformers' DeepseekV3 as the oracle.

Random tiny configurations (full-rank and low-rank queries, dense-only and MoE, group-limited routing, a random
non-zero router bias, shared experts or none, tied embeddings) are exported to a HF folder; transformers loads it
with no missing/unexpected weights and must produce the same logits (1e-4, float32) and the same greedy tokens as
our model. Export -> import is bit-identical; folders transformers itself wrote (per-expert or fused experts,
rope_interleave true or false) import to the same function; options HF cannot express stop with a UserError.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch

import transformers  # noqa: F401  (a required test dependency: the oracle)

import checkpoint  # noqa: E402
import hf_interop as hfi  # noqa: E402
import tokenizer as tk  # noqa: E402
from config import ModelArgs, UserError  # noqa: E402
from generate import generate  # noqa: E402
from tests import chat_fixtures  # noqa: E402
from tests.conftest import run_script  # noqa: E402
from tests.stage_fixtures import make_tokenizer  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# helpers


def random_args(seed: int, **features) -> ModelArgs:
    """A random tiny configuration; `features` pin what the test is about."""
    rng = random.Random(seed)
    n_heads = rng.choice([1, 2, 4])
    n_groups = features.pop("n_expert_groups", 1)
    per_group = rng.choice([2, 3])
    values = dict(
        vocab_size=rng.randint(60, 160), dim=rng.choice([16, 24, 32]), inter_dim=rng.choice([24, 40, 64]),
        moe_inter_dim=rng.choice([8, 12, 16]), n_layers=rng.randint(2, 3), n_dense_layers=1, n_heads=n_heads,
        max_seq_len=64, q_lora_rank=0, kv_lora_rank=rng.choice([8, 12]), qk_nope_head_dim=rng.choice([4, 8]),
        qk_rope_head_dim=rng.choice([2, 4, 8]), v_head_dim=rng.choice([4, 6, 8]),
        rope_theta=rng.choice([10000.0, 500.0]), n_routed_experts=n_groups * per_group * rng.choice([1, 2]),
        n_shared_experts=rng.choice([1, 2]), n_activated_experts=2, n_expert_groups=n_groups,
        n_limited_groups=max(1, n_groups // 2), score_func="sigmoid", route_scale=rng.choice([1.0, 2.5]),
        bias_update_speed=rng.choice([0.001, 0.01]), init_std=0.02,
    )
    values.update(features)
    return ModelArgs(**values)


# random weights with a random non-zero router bias (exported where transformers uses it)
random_model = functools.partial(chat_fixtures.random_model, router_bias=0.2)


def load_hf(folder: Path) -> torch.nn.Module:
    """transformers' model from a folder, asserting that every weight matched (none missing, unexpected or
    mismatched) and that nothing was logged about weights."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert isinstance(model, DeepseekV3ForCausalLM)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info[key])
    assert not [r for r in records if "weight" in r.lower() or "key" in r.lower()], records
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int, eos_id: int | None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id) + 1]
    return new


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


CASES = {
    # name: (seed, features)
    "full_q_moe": (1, dict(q_lora_rank=0)),
    "lora_q_moe_groups": (2, dict(q_lora_rank=12, n_expert_groups=4, n_layers=3)),
    "dense_only_softmax": (3, dict(n_dense_layers=3, n_layers=3, score_func="softmax", q_lora_rank=8)),
    "all_moe_no_shared_tied": (4, dict(n_dense_layers=0, n_shared_experts=0, tie_embeddings=True,
                                       n_expert_groups=2, n_activated_experts=3)),
}


# ----------------------------------------------------------------------------------------------------------------
# our model == transformers' model


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' zero-width shared MLP
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_logits_and_greedy_tokens(case, tmp_path):
    seed, features = CASES[case]
    args = random_args(seed, **features)
    model = random_model(args, seed)
    folder = hfi.write_hf_folder(tmp_path / "hf", args, model.state_dict())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["q_lora_rank"] is None) == (args.q_lora_rank == 0)
    hf = load_hf(folder)
    assert hf.config.first_k_dense_replace == min(args.n_dense_layers, args.n_layers)

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (3, 17), generator=g)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.abs().max() > 1.0  # logits spread out: the comparison is not trivially small numbers
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    # greedy decoding: ours batched (left-padded prompts, latent cache) vs transformers one prompt at a time
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 2)]
    n_new = 12
    mine = generate(model, prompts, n_new, temperature=0.0, eos_id=2, pad_id=0)
    for prompt, got in zip(prompts, mine):
        assert got == hf_greedy(hf, prompt, n_new, eos_id=2)


def test_routing_really_depends_on_the_router_bias(tmp_path):
    """The bias is exported where transformers uses it: zeroing it on one side changes the model."""
    args = random_args(5, n_expert_groups=2)
    model = random_model(args, 5)
    folder = hfi.write_hf_folder(tmp_path / "hf", args, model.state_dict())
    hf = load_hf(folder)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=ATOL, rtol=0)
        for moe in model.moe_layers():
            moe.gate.bias.zero_()
        assert (model(tokens) - hf(tokens).logits).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_and_config_mappings_are_exact_inverses(case):
    seed, features = CASES[case]
    args = random_args(seed, **features)
    model = random_model(args, seed)
    sd = model.state_dict()
    hf_sd = hfi.to_hf_state_dict(sd, args)
    back = hfi.from_hf_state_dict(hf_sd, args)
    if args.tie_embeddings:
        assert "lm_head.weight" not in hf_sd
        back["head.weight"] = back["embed.weight"]
    assert_state_dicts_identical(sd, back)
    assert hfi.from_hf_config(hfi.to_hf_config(args)) == args


def save_tiny_checkpoint(root: Path, args: ModelArgs, tok: tk.Tokenizer | None, seed: int = 0) -> Path:
    model = random_model(args, seed)
    meta = {"model_args": args.to_dict(), "tokenizer": tok.describe() if tok else None, "train_config": {}}
    return checkpoint.save_checkpoint(root, 7, model, None, meta, {}, keep=1)


def test_export_import_round_trip_is_bit_identical_and_sharded(tmp_path):
    args = random_args(11, q_lora_rank=8, n_expert_groups=2, tie_embeddings=True)
    step = save_tiny_checkpoint(tmp_path / "ckpt", args, None, seed=11)
    original = checkpoint.load_weights(step / checkpoint.WEIGHTS_FILE)
    out = hfi.export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((out / hfi.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / hfi.SAFE_WEIGHTS).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # the temporary folder is gone
    load_hf(out)  # transformers reads the sharded folder without complaints

    model, meta = hfi.load_hf_model(out)
    assert ModelArgs.from_dict(meta["model_args"]) == args  # incl. fields HF has no name for
    assert_state_dicts_identical(original, model.state_dict())
    assert model.head.weight is model.embed.weight  # still tied, for further training
    # the loader of generate.py and train.py --init_from goes through the same path
    model2, meta2 = hfi.load_any_model(out)
    assert_state_dicts_identical(original, model2.state_dict())
    # exporting again refuses to overwrite unless asked, and then replaces the folder atomically
    with pytest.raises(UserError, match="already exists"):
        hfi.export_hf(tmp_path / "ckpt", out)
    hfi.export_hf(tmp_path / "ckpt", out, overwrite=True)
    assert (out / hfi.SAFE_WEIGHTS).is_file() and not (out / hfi.SAFE_INDEX).exists()


def test_bf16_export_keeps_the_router_in_fp32_like_transformers(tmp_path):
    args = random_args(12, n_expert_groups=2)
    model = random_model(args, 12)
    folder = hfi.write_hf_folder(tmp_path / "hf", args, model.state_dict(), dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(folder / hfi.SAFE_WEIGHTS), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if ".mlp.gate." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if ".mlp.gate." not in k} == {"BF16"}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    load_hf(folder)  # no warnings in its own dtype
    # the same bf16-rounded weights computed in fp32 on both sides agree tightly
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = hfi.load_hf_model(folder, dtype=torch.float32)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=0)
    native, _ = hfi.load_hf_model(folder)  # as stored: bf16 weights, fp32 router (weight and balancing bias)
    assert native.embed.weight.dtype == torch.bfloat16
    assert native.layers[1].ffn.gate.weight.dtype == native.layers[1].ffn.gate.bias.dtype == torch.float32
    with torch.no_grad():
        assert native(tokens).dtype == torch.bfloat16


def test_bf16_folder_with_fp32_router_loads_the_router_unrounded(tmp_path):
    """transformers (and our --dtype bf16 export) keep the router fp32 in a bf16 folder. Loaded natively, our
    model keeps it so: upcast to fp32 (exact for the bf16 weights) it computes what transformers computes from the
    folder in fp32, to 1e-4 and greedy token for token. A router rounded to bf16 on load is off by ~3e-3."""
    args = random_args(13, n_expert_groups=2)
    folder = hfi.write_hf_folder(tmp_path / "hf", args, random_model(args, 13).state_dict(), dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = hfi.load_any_model(folder)
    assert ours.embed.weight.dtype == torch.bfloat16
    for moe, layer in zip(ours.moe_layers(), hf.model.layers[args.n_dense_layers:]):
        assert moe.gate.weight.dtype == moe.gate.bias.dtype == torch.float32
        assert torch.equal(moe.gate.weight, layer.mlp.gate.weight)  # the file's fp32 values, not rounded
    ours.float()
    g = torch.Generator().manual_seed(13)
    tokens = torch.randint(0, args.vocab_size, (4, 24), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=0)
    for n in (3, 5, 8, 11, 6, 9):
        prompt = torch.randint(3, args.vocab_size, (n,), generator=g).tolist()
        assert generate(ours, [prompt], 12)[0] == hf_greedy(hf, prompt, 12, eos_id=None)


def test_bf16_model_routes_like_transformers_router(tmp_path):
    """In a bf16 model with an fp32 router, our Gate scores experts from the bf16 activations in fp32 as
    transformers' DeepseekV3TopkRouter does: the same experts and weights for the same inputs."""
    args = random_args(14, n_expert_groups=2, n_activated_experts=3)
    folder = hfi.write_hf_folder(tmp_path / "hf", args, random_model(args, 14).state_dict(), dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours, _ = hfi.load_any_model(folder)
    x = torch.randn(64, args.dim, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    for moe, layer in zip(ours.moe_layers(), hf.model.layers[args.n_dense_layers:]):
        assert layer.mlp.gate.weight.dtype == torch.float32
        with torch.no_grad():
            weights, indices, _ = moe.gate(x)
            _, hf_weights, hf_indices = layer.mlp.gate(x)
        order, hf_order = indices.argsort(-1), hf_indices.argsort(-1)
        assert torch.equal(indices.gather(1, order), hf_indices.gather(1, hf_order))
        torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order).to(weights.dtype))


def test_checkpoint_loaded_in_bf16_equals_its_bf16_export(tmp_path):
    """load_any_model(checkpoint, dtype=bf16) keeps the router fp32 like the bf16 export does: both load to the
    same tensors."""
    args = random_args(15, n_expert_groups=2)
    save_tiny_checkpoint(tmp_path / "ckpt", args, None, seed=15)
    hfi.export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.bfloat16)
    from_checkpoint, _ = hfi.load_any_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    from_folder, _ = hfi.load_any_model(tmp_path / "hf")
    assert_state_dicts_identical(from_checkpoint.state_dict(), from_folder.state_dict())
    assert from_checkpoint.layers[1].ffn.gate.weight.dtype == torch.float32

# ----------------------------------------------------------------------------------------------------------------
# import of folders transformers wrote


def hf_config_for(args: ModelArgs, **overrides) -> DeepseekV3Config:
    values = {k: v for k, v in hfi.to_hf_config(args).items() if k not in ("architectures", "model_type",
                                                                           hfi.TOOLKIT_KEY, "rope_scaling")}
    values.update(overrides)
    return DeepseekV3Config(**values)


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_import_of_a_folder_transformers_wrote(rope_interleave, tmp_path):
    args = random_args(21, q_lora_rank=6, n_expert_groups=2)
    torch.manual_seed(21)
    hf = DeepseekV3ForCausalLM(hf_config_for(args, rope_interleave=rope_interleave)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 1.5 / math.sqrt(p.shape[-1]))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn_like(b))
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, args.vocab_size, (2, 15), generator=torch.Generator().manual_seed(1))
    model, meta = hfi.load_hf_model(tmp_path / "hf")
    assert meta["tokenizer"] is None
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(model(tokens), expected, atol=ATOL, rtol=0)
        # transformers' in-memory layout (fused gate_up_proj experts) maps to the same weights
        sd = hfi.from_hf_state_dict(hf.state_dict(), args, rope_interleave=rope_interleave)
        assert_state_dicts_identical(sd, {k: v for k, v in model.state_dict().items()})


# ----------------------------------------------------------------------------------------------------------------
# what the HF architecture cannot express


@pytest.mark.parametrize("override, option", [
    (dict(attn_type="mha"), "attn_type"),
    (dict(sliding_window=8), "sliding_window"),
    (dict(score_func="softmax"), "score_func"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2), "n_expert_groups"),
])
def test_unsupported_options_raise_user_error_naming_them(override, option, tmp_path):
    args = random_args(31, **override)
    with pytest.raises(UserError, match=option):
        hfi.to_hf_config(args)
    with pytest.raises(UserError, match=option):
        hfi.write_hf_folder(tmp_path / "hf", args, {})
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("override, needle", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "yarn"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
    (dict(model_type="llama"), "model_type"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
])
def test_hf_configs_we_cannot_reproduce_raise_user_error(override, needle):
    config = {**hfi.to_hf_config(random_args(32)), **override}
    config.pop(hfi.TOOLKIT_KEY)
    with pytest.raises(UserError, match=needle):
        hfi.from_hf_config(config)


def test_incomplete_hf_folder_raises_user_error(tmp_path):
    args = random_args(33)
    hf_sd = hfi.to_hf_state_dict(random_model(args, 33).state_dict(), args)
    # a router without correction bias (a model never balanced that way) is the same as a zero bias
    hf_sd.pop("model.layers.1.mlp.gate.e_score_correction_bias")
    sd = hfi.from_hf_state_dict(hf_sd, args)
    assert torch.equal(sd["layers.1.ffn.gate.bias"], torch.zeros(args.n_routed_experts))
    hf_sd.pop("model.layers.1.self_attn.kv_b_proj.weight")
    with pytest.raises(UserError, match="kv_b_proj"):
        hfi.from_hf_state_dict(hf_sd, args)


# ----------------------------------------------------------------------------------------------------------------
# the command line, with the tokenizer


@pytest.mark.slow
def test_trained_model_exports_and_transformers_generates_from_it(tmp_path, capsys, monkeypatch):
    """The quickstart's pipeline in miniature (tokenizer -> shards -> train.py, tiny preset with DeepSeek-V3's
    sigmoid router), then the export CLI: transformers loads the folder and its tokenizer and generates the same
    greedy tokens as our model; generate.py and train.py --init_from take the folder as is."""
    tok = make_tokenizer(tmp_path / "tokenizer")
    tok_args = ["--tokenizer_path", str(tmp_path / "tokenizer")]
    result = run_script("tokenize_data.py", *tok_args, "--data_file_name", str(tmp_path / "data"),
                        "--max_tokens", "30000", "--encoded_dataset_shard_size", "10000", timeout=300)
    assert result.returncode == 0, result.stderr
    train_args = [*tok_args, "--data_file_name", str(tmp_path / "data"), "--steps", "3", "--seq_len", "32",
                  "--batch_size", "4", "--total_batch_size", "128", "--eval_rate", "0", "--warm_up", "1",
                  "--save_rate", "3", "--device", "cpu"]
    import train  # in-process: each extra interpreter costs seconds of imports

    train.main(["--model", "tiny", "--score_func", "sigmoid", "--save_file_name", str(tmp_path / "ckpt"),
                *train_args])
    out = tmp_path / "hf_model"
    result = run_script("hf_interop.py", "--save_file_name", str(tmp_path / "ckpt"), "--output_dir", str(out),
                        *tok_args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    hf = load_hf(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "The function returns"
    assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text)  # documents start with bos
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.generation_config.eos_token_id == tok.eos_id
    ids = hf_tok(text, return_tensors="pt")
    theirs = hf.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()

    model, meta = hfi.load_any_model(out)  # import goes back through hf_interop
    assert meta["tokenizer"] == {**tok.describe(), "path": str((out / "tokenizer.json").resolve())}
    assert hfi.load_folder_tokenizer(out).describe() == tok.describe()  # parsed again: the same identity
    trained = checkpoint.load_weights(checkpoint.resolve_checkpoint(tmp_path / "ckpt") / checkpoint.WEIGHTS_FILE)
    assert_state_dicts_identical(trained, model.state_dict())
    ours = generate(model, [[tok.bos_id] + tok.encode(text)], 12, temperature=0.0, eos_id=tok.eos_id)[0]
    assert ours == theirs[:len(ours)] and (len(ours) == 12 or ours[-1] == tok.eos_id)
    assert hf_tok.decode(theirs, skip_special_tokens=True) == tok.decode(theirs)

    # generate.py and train.py --init_from accept the folder (its own tokenizer.json)
    import generate as generate_script

    capsys.readouterr()
    generate_script.main(["--save_file_name", str(out), "--tokenizer_path", str(out), "--input_text", text,
                          "--num_tokens_to_generate", "12", "--temperature", "0", "--stream=False", "--device", "cpu"])
    assert hf_tok.decode(ours, skip_special_tokens=True) in capsys.readouterr().out
    train.main(["--init_from", str(out), "--save_file_name", str(tmp_path / "ckpt2"), *train_args])
    assert ModelArgs.from_dict(checkpoint.read_meta(checkpoint.resolve_checkpoint(tmp_path / "ckpt2"))
                               ["model_args"]) == ModelArgs.from_dict(checkpoint.read_meta(
                                   checkpoint.resolve_checkpoint(tmp_path / "ckpt"))["model_args"])
    # so do the fine-tuning stages: the folder's tokenizer.json, without a tokenizer flag
    from config import SFTConfig

    monkeypatch.chdir(tmp_path)  # no tokenizer/ here that the default --tokenizer_path would find first
    sft_cfg = SFTConfig(init_from=str(out), save_file_name=str(tmp_path / "sft"))
    assert train.load_stage_tokenizer(sft_cfg).describe() == tok.describe()
    with pytest.raises(UserError, match="--init_from .* does not exist"):
        train.load_stage_tokenizer(SFTConfig(init_from=str(tmp_path / "nowhere")))

    # exporting into an existing folder, or a model HF cannot express, is a one-line error
    with pytest.raises(UserError, match="already exists"):
        hfi.main(["--save_file_name", str(tmp_path / "ckpt"), "--output_dir", str(out), *tok_args])
    save_tiny_checkpoint(tmp_path / "softmax", random_args(42, score_func="softmax"), None)
    with pytest.raises(UserError, match="score_func=softmax"):
        hfi.main(["--save_file_name", str(tmp_path / "softmax"), "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()

@pytest.mark.slow
def test_export_with_mistral_tokenizer_picked_from_the_checkpoint(tmp_path, capsys):
    """A checkpoint trained with Mistral-Nemo's tokenizer exports it (the CLI picks the kind the checkpoint
    records); transformers' tokenizer then encodes like ours, with bos first, and the ids match."""
    import mistral_common  # a required test dependency (requirements-dev.txt)
    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    tok = tk.load_mistral_tokenizer(tekken)
    tok.backend.save(str(tmp_path / "mistral.json"))  # the same tokenizer, quicker to load than tekken.json
    args = random_args(51, vocab_size=tok.vocab_size, dim=8, n_heads=1, n_layers=2, n_dense_layers=2)
    save_tiny_checkpoint(tmp_path / "ckpt", args, tok, seed=51)
    hfi.main(["--save_file_name", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "hf"),
              "--mistral_tokenizer_path", str(tmp_path / "mistral.json")])
    assert "exported" in capsys.readouterr().out
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world! Café 12345 日本語\n  def f(x): return x"
    assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hfi.folder_tokenizer_meta(tmp_path / "hf") == tok.describe()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, tok.pad_id)


# ----------------------------------------------------------------------------------------------------------------
# HF folders that are not what they seem: a one-line error naming the problem, nothing loaded


def one_line(error: BaseException, *needles: str) -> None:
    assert isinstance(error, UserError), repr(error)
    text = str(error)
    assert text and "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def hf_folder_with_config(folder: Path, config: dict | str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v2"])
def test_a_folder_of_another_architecture_names_its_model_type(model_type, tmp_path):
    config = {**hfi.to_hf_config(random_args(40)), "model_type": model_type}
    folder = hf_folder_with_config(tmp_path / "hf", config)
    with pytest.raises(UserError) as e:
        hfi.load_any_model(folder)
    one_line(e.value, "only 'deepseek_v3'", f'"{model_type}"')


@pytest.mark.parametrize("text", ['{"model_type": "deepseek_v3", "hidden', "[1, 2]", "\xff\xfe"])
def test_a_damaged_config_json_is_reported_as_unreadable(text, tmp_path):
    folder = hf_folder_with_config(tmp_path / "hf", text)
    with pytest.raises(UserError) as e:
        hfi.load_any_model(folder)
    one_line(e.value, "config", "unreadable")


@pytest.mark.parametrize("change, key", [
    (dict(kv_lora_rank=None), "kv_lora_rank"),
    (dict(hidden_size="big"), "hidden_size"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(vocab_size=True), "vocab_size"),
    (dict(rope_parameters="default"), "rope_parameters"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(qk_rope_head_dim=-4), "qk_rope_head_dim"),
])
def test_missing_or_malformed_config_keys_are_named(change, key, tmp_path):
    config = hfi.to_hf_config(random_args(41))
    config.pop(hfi.TOOLKIT_KEY)
    for k, v in change.items():
        if v is None:
            config.pop(k)
        else:
            config[k] = v
    with pytest.raises(UserError) as e:
        hfi.from_hf_config(config)
    one_line(e.value, key)
    with pytest.raises(UserError) as e:
        hfi.load_any_model(hf_folder_with_config(tmp_path / "hf", config))
    one_line(e.value, key)


class _Payload:
    """Unpickling this creates the file it names: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_bin_only_folder_is_never_unpickled_and_the_hint_works_with_transformers_5(tmp_path):
    import pickle

    folder = hf_folder_with_config(tmp_path / "hf", hfi.to_hf_config(random_args(42)))
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError) as e:
        hfi.load_any_model(folder)
    one_line(e.value, ".bin", "save_pretrained(", "safetensors")
    assert "safe_serialization" not in str(e.value)  # transformers 5 has no such argument
    assert not marker.exists()
    import inspect

    assert "safe_serialization" not in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def test_generate_cli_on_folders_that_are_not_deepseek_v3(tmp_path):
    """What a user sees: one line on stderr, exit status 1."""
    llama = hf_folder_with_config(tmp_path / "llama", {**hfi.to_hf_config(random_args(43)), "model_type": "llama"})
    broken = hf_folder_with_config(tmp_path / "broken", '{"model_type": "deepseek_v3", ')
    for folder, needles in ((llama, ("only 'deepseek_v3'", '"llama"')), (broken, ("unreadable",))):
        result = run_script("generate.py", "--save_file_name", str(folder), "--device", "cpu", cwd=tmp_path,
                            timeout=300)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "no checkpoint" not in lines[0], result.stderr
        for needle in needles:
            assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------------------------
# the export's command line: --max_shard_size, --dtype, --save_tokenizer


def dtypes_of(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def test_export_cli_shards_dtype_and_tokenizer_options(tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tokenizer")
    args = random_args(44, n_expert_groups=2, vocab_size=tok.vocab_size)
    save_tiny_checkpoint(tmp_path / "ckpt", args, tok, seed=44)
    common = ["--save_file_name", str(tmp_path / "ckpt"), "--tokenizer_path", str(tmp_path / "tokenizer")]

    hfi.main([*common, "--output_dir", str(tmp_path / "sharded"), "--max_shard_size", "20KB", "--dtype", "bf16"])
    out = tmp_path / "sharded"
    index = json.loads((out / hfi.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert all((out / s).stat().st_size <= 20_000 + 10_000 for s in shards)  # a shard: <= the limit + its header
    dtypes = dtypes_of(out)
    assert set(dtypes) == set(index["weight_map"])
    assert {d for k, d in dtypes.items() if ".mlp.gate." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if ".mlp.gate." not in k} == {"BF16"}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()  # the default
    hf = load_hf(out)  # transformers reads the index and every shard, nothing missing or unexpected
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [tok.bos_id] + tok.encode("Hello world")

    hfi.main([*common, "--output_dir", str(tmp_path / "plain"), "--save_tokenizer=False", "--dtype", "fp16"])
    out = tmp_path / "plain"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", hfi.SAFE_WEIGHTS]
    assert {d for k, d in dtypes_of(out).items() if ".mlp.gate." not in k} == {"F16"}
    assert "exported" in capsys.readouterr().out
    with pytest.raises(UserError) as e:
        hfi.main([*common, "--output_dir", str(tmp_path / "x"), "--max_shard_size", "lots"])
    one_line(e.value, "lots")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# output paths, a full disk, a kill: a one-line error, the old output intact, nothing left behind


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def exported(tmp_path):
    """A checkpoint and an earlier export of it (the output a failed export must leave intact)."""
    args = random_args(45, n_expert_groups=2)
    save_tiny_checkpoint(tmp_path / "ckpt", args, None, seed=45)
    (tmp_path / "out").mkdir()
    old = hfi.export_hf(tmp_path / "ckpt", tmp_path / "out" / "hf", max_shard_size="30KB")
    return dict(ckpt=tmp_path / "ckpt", out=old, old=folder_bytes(old))


def _export_cli(*args: str, preexec=None, code: str = ""):
    """The export CLI in a fresh interpreter; `code` runs first (to plant a kill)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    program = f"import sys; sys.path.insert(0, {str(root)!r})\n{code}\nimport hf_interop, config\n" \
              f"config.run_main(lambda: hf_interop.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _assert_one_line_failure(result, *needles):
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_to_a_read_only_location_or_onto_a_file(exported, tmp_path):
    read_only = Path("/sys") / f"hf_export_test_{tmp_path.name}"  # sysfs refuses new folders, even to root
    with pytest.raises(UserError) as e:
        hfi.main(["--save_file_name", str(exported["ckpt"]), "--output_dir", str(read_only), "--save_tokenizer=False"])
    one_line(e.value, str(read_only), "--output_dir")
    assert not read_only.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for target in (a_file, a_file / "hf"):
        with pytest.raises(UserError) as e:
            hfi.main(["--save_file_name", str(exported["ckpt"]), "--output_dir", str(target), "--overwrite",
                      "--save_tokenizer=False"])
        one_line(e.value, "--output_dir")
    assert a_file.read_text() == "keep me"


def test_export_on_a_full_disk_keeps_the_old_output(exported):
    import resource
    import signal

    def small_disk():  # files may not grow past 40 kB: a write beyond fails like a full disk (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))

    result = _export_cli("--save_file_name", str(exported["ckpt"]), "--output_dir", str(exported["out"]),
                         "--overwrite", "--save_tokenizer=False", "--max_shard_size", "1GB", preexec=small_disk)
    _assert_one_line_failure(result, "cannot write", "--output_dir")
    assert folder_bytes(exported["out"]) == exported["old"]
    assert litter(exported["out"].parent) == []


KILL_AFTER_WEIGHTS = """
import os, signal, hf_interop
real = hf_interop.save_hf_weights
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
hf_interop.save_hf_weights = save_then_die
"""

KILL_DURING_THE_SWAP = """
import os, signal
real = os.replace
def replace(src, dst):
    if os.path.basename(str(src)).startswith(".tmp_hf_"):  # the new folder's rename, after the old one moved aside
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
"""


def test_a_killed_export_leaves_the_old_output_and_nothing_that_blocks_the_rerun(exported):
    args = ["--save_file_name", str(exported["ckpt"]), "--output_dir", str(exported["out"]), "--overwrite",
            "--save_tokenizer=False"]
    result = _export_cli(*args, code=KILL_AFTER_WEIGHTS)
    assert result.returncode == -9, result.stderr
    assert folder_bytes(exported["out"]) == exported["old"]  # no partial folder under the final name
    assert litter(exported["out"].parent)  # the killed export's temporary folder...
    hfi.main([*args, "--max_shard_size", "30KB"])  # ...is cleaned by the rerun, which succeeds
    assert litter(exported["out"].parent) == []
    assert folder_bytes(exported["out"]) == exported["old"]  # the same export again: the same bytes


def test_a_kill_between_the_renames_loses_nothing(exported):
    args = ["--save_file_name", str(exported["ckpt"]), "--output_dir", str(exported["out"]), "--save_tokenizer=False"]
    result = _export_cli(*args, "--overwrite", code=KILL_DURING_THE_SWAP)
    assert result.returncode == -9, result.stderr
    assert not exported["out"].exists()  # killed after moving the old folder aside
    with pytest.raises(UserError, match="already exists"):  # the next run puts the old folder back first
        hfi.main(args)
    assert folder_bytes(exported["out"]) == exported["old"]
    assert litter(exported["out"].parent) == []


# ----------------------------------------------------------------------------------------------------------------
# a damaged checkpoint


def test_export_of_a_damaged_checkpoint(tmp_path, capsys):
    """A truncated newest checkpoint is named in a warning and the newest intact one exported; a truncated step
    folder given by name, or a run folder with no intact one left, is an error (one line in the CLI), and no
    output is left behind."""
    args = random_args(46)
    older = save_tiny_checkpoint(tmp_path / "ckpt", args, None, seed=46)
    model = random_model(args, 47)
    meta = {"model_args": args.to_dict(), "tokenizer": None, "train_config": {}}
    newer = checkpoint.save_checkpoint(tmp_path / "ckpt", 9, model, None, meta, {}, keep=2)
    weights = newer / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    hfi.main(["--save_file_name", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "hf"),
              "--save_tokenizer=False"])
    assert "step_000009" in capsys.readouterr().err
    exported, _ = hfi.load_any_model(tmp_path / "hf")
    assert_state_dicts_identical(exported.state_dict(), checkpoint.load_weights(older / checkpoint.WEIGHTS_FILE))

    with pytest.raises(UserError) as e:
        hfi.main(["--save_file_name", str(newer), "--output_dir", str(tmp_path / "x"), "--save_tokenizer=False"])
    one_line(e.value, "damaged", "step_000009")
    weights = older / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = _export_cli("--save_file_name", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "x"),
                         "--save_tokenizer=False")
    _assert_one_line_failure(result, "every checkpoint", "damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
