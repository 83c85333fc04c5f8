"""The shared configuration: generated parsers, honest booleans, --help for every script, the built-in corpus."""
from __future__ import annotations

import dataclasses

import pytest

from config import (MODEL_PRESETS, CheckDataConfig, DPOConfig, ExportConfig, GenerateConfig, GRPOConfig,
                    InspectTokenizerConfig, ModelArgs, TaskSFTConfig, TokenizeDataConfig, TrainConfig,
                    TrainTokenizerConfig, model_args_from_preset, parse_config)
from corpus import builtin_corpus_documents, iter_documents

SCRIPTS = {
    "train_tokenizer.py": (TrainTokenizerConfig, False),
    "tokenize_data.py": (TokenizeDataConfig, False),
    "train.py": (TrainConfig, True),
    "generate.py": (GenerateConfig, False),
    "hf_interop.py": (ExportConfig, False),
    "data_loader.py": (CheckDataConfig, False),
    "tokenizer.py": (InspectTokenizerConfig, False),
    "dpo.py": (DPOConfig, True),
    "rl.py": (GRPOConfig, True),
    "tasks.py": (TaskSFTConfig, True),
}

# The flags the original toolkit's README documents: they must exist under these exact names.
DOCUMENTED_FLAGS = {
    "train_tokenizer.py": "dataset_path_huggingface dataset_sub_set tokenizer_train_shard_size trust_remote_code",
    "tokenize_data.py": "dataset_path_huggingface dataset_sub_set data_file_name encoded_dataset_shard_size "
                        "load_mistral_tokenizer",
    "train.py": "steps eval_rate eval_steps save_rate warm_up total_batch_size batch_size seed lr min_lr "
                "weight_decay beta1 beta2 backend save_file_name data_file_name compile_model load_mistral_tokenizer",
    "generate.py": "input_text num_tokens_to_generate temperature top_p save_file_name load_mistral_tokenizer",
}


@pytest.mark.parametrize("text, expected", [("--load_mistral_tokenizer=False", False),
                                            ("--load_mistral_tokenizer=True", True),
                                            ("--load_mistral_tokenizer", True),
                                            ("--load_mistral_tokenizer=0", False),
                                            ("--load_mistral_tokenizer=1", True)])
def test_boolean_flags_mean_what_they_say(text: str, expected: bool) -> None:
    for cls in (TokenizeDataConfig, GenerateConfig):
        assert parse_config(cls, [text]).load_mistral_tokenizer is expected
    config, _ = parse_config(TrainConfig, [text], with_model_args=True)
    assert config.load_mistral_tokenizer is expected


def test_boolean_default_is_false() -> None:
    assert parse_config(TokenizeDataConfig, []).load_mistral_tokenizer is False


def test_bad_values_and_unknown_flags_exit_with_one_line(capsys) -> None:
    for argv in (["--load_mistral_tokenizer=maybe"], ["--no_such_flag"], ["--encoded_dataset_shard_size", "x"]):
        with pytest.raises(SystemExit) as excinfo:
            parse_config(TokenizeDataConfig, argv)
        assert excinfo.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err


def test_model_overrides_apply_on_top_of_preset() -> None:
    config, overrides = parse_config(TrainConfig, ["--model", "tiny", "--dim", "64", "--tie_embeddings"],
                                     with_model_args=True)
    args = model_args_from_preset(config.model, **overrides)
    assert args.dim == 64 and args.tie_embeddings is True
    assert args.n_layers == MODEL_PRESETS["tiny"]["n_layers"]


@pytest.mark.parametrize("overrides, needle", [
    (dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=3), "cannot hold"),
    (dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=5), "between 1 and"),
    (dict(n_routed_experts=8, n_expert_groups=3), "not divisible"),
    (dict(n_routed_experts=4, n_activated_experts=5), "exceeds"),
])
def test_impossible_routing_is_a_config_error(overrides: dict, needle: str) -> None:
    from config import ConfigError
    with pytest.raises(ConfigError, match=needle):
        ModelArgs(**overrides)


@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
def test_help_lists_every_option_with_default(script_name: str, script) -> None:
    result = script(script_name, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    cls, with_model = SCRIPTS[script_name]
    fields = list(dataclasses.fields(cls)) + (list(dataclasses.fields(ModelArgs)) if with_model else [])
    for f in fields:
        assert f"--{f.name}" in help_text, f"{script_name} --help lacks --{f.name}"
    assert help_text.count("(default:") >= len(fields)
    for flag in DOCUMENTED_FLAGS.get(script_name, "").split():
        assert f"--{flag}" in help_text


def test_builtin_corpus_loads_offline_with_more_than_a_megabyte() -> None:
    documents = list(iter_documents(TrainTokenizerConfig(dataset_path_huggingface="builtin")))
    assert documents == list(builtin_corpus_documents())
    total = sum(len(d.encode("utf-8")) for d in documents)
    assert total > 1_000_000
    assert all(isinstance(d, str) and d for d in documents)


def test_local_text_and_jsonl_sources(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n", encoding="utf-8")
    text_docs = list(iter_documents(TrainTokenizerConfig(dataset_path_huggingface=str(tmp_path / "a.txt"))))
    assert "".join(text_docs).replace("\n", "") == "first paragraphstill firstsecond paragraph"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "héllo"}\n{"text": "wörld"}\n', encoding="utf-8")
    assert list(iter_documents(TrainTokenizerConfig(dataset_path_huggingface=str(jsonl)))) == ["héllo", "wörld"]


def test_readme_option_tables_are_current() -> None:
    """The README's option tables are generated from the dataclasses; a stale table fails here."""
    from config import readme_blocks, render_readme
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme) == readme, "README.md is stale: run `python config.py --readme README.md`"
    for name in readme_blocks():
        assert f"<!-- options: {name} -->" in readme
    for script_name, (cls, _) in SCRIPTS.items():  # every option of every script, with its default, in its table
        section = readme.split(f"<!-- options: {script_name} -->")[1].split("<!-- /options -->")[0]
        for f in dataclasses.fields(cls):
            assert f"| `--{f.name}` |" in section


def test_unreachable_hub_is_a_one_line_error(script, tmp_path) -> None:
    """The hub is unreachable here (tests run offline): the real hub-loading path must fail with one line."""
    result = script("train_tokenizer.py", "--dataset_path_huggingface", "someone/no-such-dataset",
                    "--output_path", str(tmp_path / "tok"), timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not read dataset 'someone/no-such-dataset'"), lines
    assert not (tmp_path / "tok").exists()


# ----------------------------------------------------------------------------------------------------------------
# Range checks: declared once with each option, applied to every script that builds the options


@pytest.mark.parametrize("script_name, argv, needle", [
    ("train.py", ["--save_rate", "0"], "--save_rate must be >= 1"),
    ("train.py", ["--lr", "-1"], "--lr must be > 0"),
    ("train.py", ["--lr", "5e-4"], "--min_lr 0.0006 is above --lr 0.0005"),
    ("train.py", ["--lr", "nan"], "--lr must be a finite number"),
    ("train.py", ["--muon_wd_per_epoch", "-0.1"], "--muon_wd_per_epoch must be >= 0"),
    ("dpo.py", ["--muon_wd_per_epoch", "0.1"], "--muon_wd_per_epoch is for pretraining (train.py)"),
    ("train.py", ["--wd_per_epoch", "-0.1"], "--wd_per_epoch must be >= 0"),
    ("rl.py", ["--wd_per_epoch", "0.1"], "--wd_per_epoch is for pretraining (train.py)"),
    ("train.py", ["--beta1", "1.5"], "--beta1 must be >= 0 and < 1"),
    ("train.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("train.py", ["--n_heads", "0"], "--n_heads must be >= 1"),
    ("train.py", ["--dim", "-1"], "--dim must be >= 1"),
    ("train.py", ["--vocab_size", "2000000000"], "--vocab_size must be"),
    ("train.py", ["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    ("train.py", ["--warm_up", "-5"], "--warm_up must be >= 0"),
    ("train.py", ["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    ("train.py", ["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    ("generate.py", ["--temperature", "nan"], "--temperature must be a finite number"),
    ("generate.py", ["--max_seq_len", "-5"], "--max_seq_len must be >= 0"),
    ("generate.py", ["--top_p", "0"], "--top_p must be > 0"),
    ("train_tokenizer.py", ["--min_frequency", "-3"], "--min_frequency must be >= 1"),
    ("tokenize_data.py", ["--encoded_dataset_shard_size", "1000000000000"], "--encoded_dataset_shard_size must be"),
])
def test_out_of_range_options_are_one_line_errors(script_name: str, argv: list[str], needle: str) -> None:
    from config import ConfigError

    cls, with_model = SCRIPTS[script_name]
    with pytest.raises(ConfigError) as e:
        parse_config(cls, argv, with_model_args=with_model) if not with_model else \
            model_args_from_preset("tiny", **parse_config(cls, argv, with_model_args=True)[1])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_out_of_range_option_at_the_command_line(script) -> None:
    r = script("train.py", "--save_rate", "0")
    assert r.returncode == 1 and r.stderr.strip() == "error: --save_rate must be >= 1 (got 0)", r.stderr


def test_every_declared_bound_rejects_its_edge() -> None:
    """Each bound declared with opt() refuses the first value outside it (an independent walk over the fields)."""
    from config import ConfigError, CheckDataConfig, ExportConfig

    for cls in (TrainConfig, GenerateConfig, TokenizeDataConfig, TrainTokenizerConfig, ExportConfig, CheckDataConfig,
                ModelArgs):
        for f in dataclasses.fields(cls):
            bounds = f.metadata.get("bounds") or {}
            for kind, bound in bounds.items():
                step = 1 if f.type in (int, "int") or isinstance(f.default, int) else 1e-9 * max(1, abs(bound))
                bad = {"ge": bound - step, "gt": bound, "le": bound + step, "lt": bound}[kind]
                value = int(bad) if isinstance(f.default, int) and not isinstance(f.default, bool) else bad
                with pytest.raises(ConfigError, match=f"--{f.name} must be"):
                    cls(**{f.name: value})
