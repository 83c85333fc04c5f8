"""generate.py: sampling filters against explicit references, cached greedy decoding against full recomputation
(dense and MoE, a batch of left-padded prompts of different lengths), determinism, and the CLI's one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from generate import sample_next, top_k_filter, top_p_filter


pytestmark = pytest.mark.usefixtures("one_thread")


def nucleus_reference(probs: np.ndarray, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p (float64, explicit loop)."""
    order = np.argsort(-probs, kind="stable")
    total, chosen = 0.0, set()
    for idx in order:
        chosen.add(int(idx))
        total += probs[idx]
        if total >= p:
            break
    return chosen


def random_logits(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    # mix of flat and peaked distributions
    scale = rng.choice([0.5, 2.0, 5.0], size=(rows, 1))
    return rng.standard_normal((rows, vocab)) * scale


def _far_from_boundary(probs: np.ndarray, p: float, eps: float = 1e-4) -> bool:
    cum = np.cumsum(np.sort(probs)[::-1])
    return bool(np.all(np.abs(cum - p) > eps))


def nucleus_case(rng: np.random.Generator, vocab_range: tuple[int, int], p_range: tuple[float, float],
                 eps: float) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Random logits of a random width, their probabilities, a random p, and whether no prefix of the sorted
    probabilities lands within eps of p (where float32 and float64 could pick different nuclei)."""
    vocab = int(rng.integers(*vocab_range))
    p = float(rng.uniform(*p_range))
    logits = random_logits(rng, 1, vocab)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return logits, probs, p, _far_from_boundary(probs, p, eps)


def test_top_p_filter_keeps_exactly_the_nucleus():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        logits, probs, p, clear = nucleus_case(rng, (2, 60), (0.05, 0.99), 1e-4)
        if not clear:
            continue
        kept = top_p_filter(torch.tensor(logits, dtype=torch.float32)[None], p)[0]
        got = set(torch.nonzero(torch.isfinite(kept)).flatten().tolist())
        assert got == nucleus_reference(probs, p), (trial, p)
        # kept logits are unchanged
        assert torch.equal(kept[list(got)], torch.tensor(logits, dtype=torch.float32)[list(got)])
        checked += 1
    assert checked > 150


def test_top_p_edge_cases():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # a tiny p keeps only the most likely token
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[True, False, False, False]]
    # exactly reaching p: two equal halves, p = 0.5 -> one token suffices
    half = torch.tensor([[0.0, 0.0, -1e9]])
    assert torch.isfinite(top_p_filter(half, 0.5)).sum().item() == 1


def test_top_p_sampling_draws_only_from_the_nucleus_with_renormalised_frequencies():
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(0)
    n_draws = 4000
    for trial in range(12):
        logits, probs, p, clear = nucleus_case(rng, (5, 40), (0.3, 0.95), 1e-3)
        if not clear:
            continue
        allowed = nucleus_reference(probs, p)
        batch = torch.tensor(logits, dtype=torch.float32)[None].repeat(n_draws, 1)
        draws = sample_next(batch, temperature=1.0, top_p=p, generator=gen).numpy()
        assert set(draws.tolist()) <= allowed
        # frequencies follow the renormalised nucleus probabilities (5 sigma)
        idx = np.array(sorted(allowed))
        q = probs[idx] / probs[idx].sum()
        counts = np.array([(draws == i).sum() for i in idx])
        sigma = np.sqrt(n_draws * q * (1 - q)) + 1
        assert np.all(np.abs(counts - n_draws * q) < 5 * sigma), (trial, counts, n_draws * q)


def test_top_k_and_top_p_combined():
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor(random_logits(rng, 64, 50), dtype=torch.float32)
    draws = sample_next(logits.repeat(20, 1), temperature=0.7, top_k=5, top_p=0.9, generator=gen)
    top5 = torch.topk(logits, 5, dim=-1).indices.repeat(20, 1)
    assert (draws[:, None] == top5).any(-1).all()
    # top_k alone keeps exactly k tokens (distinct logits)
    kept = top_k_filter(logits, 7)
    assert (torch.isfinite(kept).sum(-1) == 7).all()


def test_temperature_zero_is_greedy_and_deterministic():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    a = sample_next(logits, temperature=0.0, top_p=0.5, top_k=3, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, temperature=0.0, top_p=0.5, top_k=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(a, b)


def test_same_seed_same_draws():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(4))
    a = sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(5))
    c = sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------------
# Cached decoding against full recomputation (small random models)


def _random_model(preset: str, vocab: int = 512, dtype=torch.float64, seed: int = 0, **overrides):
    from config import model_args_from_preset
    from model import Transformer

    torch.manual_seed(seed)
    # init_std 0.1: peaked enough logits that greedy continuations depend on the context (not one repeated token)
    args = model_args_from_preset(preset, vocab_size=vocab, init_std=0.1, **overrides)
    model = Transformer(args)
    model.init_weights()
    model.to(dtype)  # the RoPE table is not a buffer: it stays complex64 (the model rebuilds it in rope_table)
    with torch.no_grad():  # a non-zero balancing bias, so that it takes part in routing
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.05)
    return model.eval()


def _prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny"])
def test_cached_greedy_equals_full_recompute_for_a_padded_batch(preset):
    from generate import generate, generate_reference

    model = _random_model(preset)
    prompts = _prompts([5, 17, 1, 9, 24])
    got = generate(model, prompts, 20)
    want = generate_reference(model, prompts, 20)
    assert got == want
    assert all(len(r) == 20 for r in got)
    assert min(len(set(r)) for r in got) >= 5, "degenerate continuations make this test vacuous"
    # the padded batch also equals each prompt generated alone
    assert [generate(model, [p], 20)[0] for p in prompts[:3]] == got[:3]


def test_cached_sampling_equals_reference_sampling_with_the_same_generator():
    from generate import generate, generate_reference

    model = _random_model("tiny")
    prompts = _prompts([3, 11, 7], seed=1)
    kw = dict(temperature=1.0, top_p=0.9, top_k=50)
    got = generate(model, prompts, 16, generator=torch.Generator().manual_seed(7), **kw)
    want = generate_reference(model, prompts, 16, generator=torch.Generator().manual_seed(7), **kw)
    assert got == want
    again = generate(model, prompts, 16, generator=torch.Generator().manual_seed(7), **kw)
    other = generate(model, prompts, 16, generator=torch.Generator().manual_seed(8), **kw)
    assert again == got and other != got


def test_rows_stop_at_eos_and_the_loop_ends_when_all_stopped():
    from generate import generate, generate_reference

    model = _random_model("tiny", seed=2)
    prompts = _prompts([4, 10], seed=2)
    free = generate(model, prompts, 20)
    eos = free[0][5]                              # row 0 emits this token at step 5 (maybe earlier too)
    got = generate(model, prompts, 20, eos_id=eos)
    assert got == generate_reference(model, prompts, 20, eos_id=eos)
    first = free[0].index(eos)
    assert got[0] == free[0][:first + 1]
    for new, ref in zip(got, free):               # every row: its free run cut after its first eos
        assert new == (ref[:ref.index(eos) + 1] if eos in ref else ref)
    # when every row ends early, the loop stops early (fewer decode steps)
    timings: dict = {}
    generate(model, [prompts[0]], 20, eos_id=eos, timings=timings)
    assert timings["decode_steps"] == first


def test_vocab_size_restricts_sampling():
    from generate import generate

    model = _random_model("tiny-dense", seed=3)
    out = generate(model, _prompts([6, 2], seed=3), 12, temperature=1.0, vocab_size=40,
                   generator=torch.Generator().manual_seed(0))
    assert all(0 <= t < 40 for row in out for t in row)


def test_stream_printer_never_prints_partial_characters():
    import io

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from generate import StreamPrinter

    # a byte-level tokenizer with no merges: every UTF-8 byte is its own token, so multi-byte characters arrive
    # in pieces
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()

    class Tok:
        def decode(self, ids):
            return backend.decode(ids)

    text = "héllo wörld — 日本語 🎉!"
    ids = backend.encode(text).ids
    assert len(ids) > len(text)
    out = io.StringIO()
    printer = StreamPrinter(Tok(), out)
    writes = []
    for t in ids:
        before = out.getvalue()
        printer(0, torch.tensor([t]))
        writes.append(out.getvalue()[len(before):])
    printer.flush(final=True)
    assert out.getvalue() == text
    assert not any("\ufffd" in w for w in writes)


# ----------------------------------------------------------------------------------------------------------------
# The command line on a real tiny checkpoint


SENTENCES = [
    "The cat sat on the mat and looked at the quick brown fox.",
    "A function returns the value of its argument, or None when there is nothing to return.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Once upon a time there was a small model that learned to write text.",
    "Numbers such as 12345, 3.14 and 2026 appear in the text too.",
    "The quick brown fox jumps over the lazy dog; the dog does not mind.",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "Hello world! Héllo wörld, naïve café, 日本語.",
    "if x > 0 and y < 0:\n    raise ValueError('bad sign')\n",
]


def fixed_corpus(n_lines: int = 3000) -> str:
    """A fixed training text for the fixture's tokenizer (the same on every machine and commit): the sentences in
    a seeded random order."""
    import random

    rng = random.Random(0)
    return "\n".join(rng.choice(SENTENCES) for _ in range(n_lines))


def _train_tokenizer(folder, vocab_size: int, text_file):
    import train_tokenizer

    train_tokenizer.main(["--vocab_size", str(vocab_size), "--tokenizer_train_shard_size", "60000",
                          "--dataset_path_huggingface", str(text_file), "--output_path", str(folder)])
    from config import TokenizerOptions
    from tokenizer import load_tokenizer

    return load_tokenizer(TokenizerOptions(tokenizer_path=str(folder)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from checkpoint import save_checkpoint
    from config import model_args_from_preset
    from model import Transformer

    root = tmp_path_factory.mktemp("generate_cli")
    text = root / "text.txt"
    text.write_text(fixed_corpus())
    tok = _train_tokenizer(root / "tokenizer", 300, text)
    other = _train_tokenizer(root / "other_tokenizer", 320, text)
    assert other.fingerprint != tok.fingerprint
    torch.manual_seed(0)
    args = model_args_from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.1)
    model = Transformer(args)
    model.init_weights()
    from tokenizer import recorded_tokenizer

    meta = {"model_args": args.to_dict(), "train_config": {}, "tokenizer": recorded_tokenizer(tok)}
    save_checkpoint(root / "ckpt", 3, model, None, meta, {}, keep=1)
    (root / "empty").mkdir()
    return dict(root=root, tok=tok)


ENV = {"OMP_NUM_THREADS": "1"}


def _gen(script, run, *args):
    return script("generate.py", "--save_file_name", str(run["root"] / "ckpt"),
                  "--tokenizer_path", str(run["root"] / "tokenizer"), *args, cwd=run["root"], env=ENV)


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_streams_the_greedy_continuation_and_a_summary(script, tiny_run):
    from generate import generate
    from hf_interop import load_any_model

    proc = _gen(script, tiny_run, "--input_text", "The cat", "--num_tokens_to_generate", "12",
                "--temperature", "0", "--stop_at_eos", "false")
    assert proc.returncode == 0, proc.stderr
    model, _ = load_any_model(tiny_run["root"] / "ckpt")
    tok = tiny_run["tok"]
    ids = generate(model, [[tok.bos_id] + tok.encode("The cat")], 12)[0]
    expected = "The cat" + tok.decode(ids) + "\n"
    # the tiny tokenizer may emit any byte, \r included: read it as the script's text-mode stdout is read
    expected = expected.replace("\r\n", "\n").replace("\r", "\n")
    assert proc.stdout.startswith(expected)
    for field in ("prompt tokens: 3" if len(tok.encode("The cat")) == 2 else "prompt tokens:",
                  "generated tokens: 12", "prefill:", "decode:", "cache:"):
        assert field in proc.stdout, proc.stdout


def test_cli_batch_from_file_equals_single_prompts(script, tiny_run):
    prompts = ["def f", "The quick brown fox jumps", "x"]
    path = tiny_run["root"] / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n")
    proc = _gen(script, tiny_run, "--input_file", str(path), "--num_tokens_to_generate", "8", "--temperature", "0",
                "--num_samples", "2")
    assert proc.returncode == 0, proc.stderr
    # one block per sample (a generated text may hold newlines): split at the markers, not at lines
    lines = ["--- [" + b.rstrip("\n") for b in proc.stdout.split("\n\n[")[0].split("--- [")[1:]]
    assert len(lines) == 6
    single = _gen(script, tiny_run, "--input_text", prompts[1], "--num_tokens_to_generate", "8",
                  "--temperature", "0")
    text = single.stdout.split("\n\n[")[0].rstrip("\n")
    assert lines[2] == "--- [1.0] " + text and lines[3] == "--- [1.1] " + text


def test_cli_errors_are_one_line(tiny_run):
    root = tiny_run["root"]
    text = _main_error(tiny_run, "--input_text", "word " * 80, "--num_tokens_to_generate", "4")
    assert "longer than the context of 64 tokens" in text
    n_prompt = 1 + len(tiny_run["tok"].encode("Hi"))  # bos + text
    text = _main_error(tiny_run, "--input_text", "Hi", "--num_tokens_to_generate", "20", "--max_seq_len", "16")
    assert "context of 16 tokens" in text and f"at most {16 - n_prompt} new tokens fit" in text, text
    assert "empty prompt" in _main_error(tiny_run, "--input_text", "")
    assert "no checkpoint" in _main_error(tiny_run, "--save_file_name", str(root / "empty"))
    assert "fingerprint" in _main_error(tiny_run, "--tokenizer_path", str(root / "other_tokenizer"))


def test_cli_finds_the_tokenizer_the_checkpoint_records(script, tiny_run):
    """Run from a folder without a tokenizer/ and no tokenizer flag: the checkpoint's recorded file is used."""
    root = tiny_run["root"]
    args = ("--input_text", "The cat", "--num_tokens_to_generate", "6", "--temperature", "0")
    recorded = script("generate.py", "--save_file_name", str(root / "ckpt"), *args, cwd=root / "empty", env=ENV)
    assert recorded.returncode == 0, recorded.stderr
    explicit = _gen(script, tiny_run, *args)
    assert recorded.stdout.split("\n\n[")[0] == explicit.stdout.split("\n\n[")[0]


def _reference_lines(run, text: str, n_samples: int, n_new: int, **sampling) -> list[str]:
    """What the CLI prints (--stream=False) for `text`, computed in-process with generate() and a generator seeded
    as the CLI seeds it."""
    from generate import generate
    from hf_interop import load_any_model

    model, _ = load_any_model(run["root"] / "ckpt")
    tok = run["tok"]
    seed = sampling.pop("seed")
    prompt = [tok.bos_id] + tok.encode(text)
    outs = generate(model, [prompt] * n_samples, n_new, generator=torch.Generator().manual_seed(seed),
                    eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size, **sampling)
    lines = []
    for k, out in enumerate(outs):
        line = (f"--- [0.{k}] " if n_samples > 1 else "--- [0] ") + text + tok.decode(out)
        lines += line.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as text-mode stdout reads it
    return lines


def _printed_lines(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n\n[")[0].split("\n")


def test_cli_seed_and_num_samples(script, tiny_run):
    """--num_samples continuations per prompt, drawn with --seed: the same seed prints the same text, another seed
    other text, and the text is what generate() draws with a generator seeded the same way."""
    args = ("--input_text", "The cat", "--num_tokens_to_generate", "16", "--temperature", "1.0", "--top_p", "1.0",
            "--num_samples", "3", "--stream=False")
    first = _printed_lines(_gen(script, tiny_run, *args, "--seed", "5"))
    again = _printed_lines(_gen(script, tiny_run, *args, "--seed", "5"))
    other = _printed_lines(_gen(script, tiny_run, *args, "--seed", "6"))
    assert first == again and first != other
    assert first == _reference_lines(tiny_run, "The cat", 3, 16, temperature=1.0, top_p=1.0, seed=5)
    assert sum(line.startswith("--- [0.") for line in first) == 3
    samples = "\n".join(first).split("--- [0.")[1:]
    assert len(set(s[2:] for s in samples)) > 1  # the samples of one prompt differ from each other


def test_cli_top_k(script, tiny_run):
    """--top_k 1 leaves only the most likely token: at a high temperature it prints the greedy text; --top_k 3
    prints what generate() draws from the top 3."""
    args = ("--input_text", "Once upon", "--num_tokens_to_generate", "12", "--stream=False", "--seed", "3")
    greedy = _printed_lines(_gen(script, tiny_run, *args, "--temperature", "0"))
    top1 = _printed_lines(_gen(script, tiny_run, *args, "--temperature", "5", "--top_k", "1"))
    assert top1 == greedy
    top3 = _printed_lines(_gen(script, tiny_run, *args, "--temperature", "5", "--top_k", "3", "--top_p", "1"))
    assert top3 == _reference_lines(tiny_run, "Once upon", 1, 12, temperature=5.0, top_k=3, top_p=1.0, seed=3)
    assert top3 != greedy


def _main_error(run, *args: str) -> str:
    """generate.main in-process (run_main turns its UserError into the one-line error and exit status 1): the
    message, checked to be one line."""
    import generate as generate_script
    from config import UserError

    with pytest.raises(UserError) as e:
        generate_script.main(["--save_file_name", str(run["root"] / "ckpt"), "--tokenizer_path",
                              str(run["root"] / "tokenizer"), "--device", "cpu", *args])
    text = str(e.value)
    assert text and "\n" not in text, text
    return text


def test_cli_input_and_option_mistakes_are_one_line(script, tiny_run):
    root = tiny_run["root"]
    _one_line_error(_gen(script, tiny_run, "--device", "foo"), "--device", "foo")  # once a traceback
    assert "--max_seq_len must be >= 0 (got -5)" in _main_error(tiny_run, "--max_seq_len", "-5")
    assert "--temperature must be a finite number" in _main_error(tiny_run, "--temperature", "nan")
    assert "is a folder" in _main_error(tiny_run, "--input_file", str(root / "empty"))
    assert "does not exist" in _main_error(tiny_run, "--input_file", str(root / "missing.txt"))
    latin1 = root / "latin1.txt"
    latin1.write_bytes("café crème\n".encode("latin-1"))
    assert "not UTF-8" in _main_error(tiny_run, "--input_file", str(latin1))
    # a prompt longer than the context and more new tokens than the context: no negative advice
    text = _main_error(tiny_run, "--input_text", "word " * 80, "--num_tokens_to_generate", "100")
    assert "longer than the context of 64 tokens" in text and "at most 63 tokens" in text, text
    assert "-" not in text.split("at most")[1].split()[0]


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_cli_on_a_damaged_checkpoint(script, tiny_run, tmp_path):
    """A truncated newest checkpoint: generate.py warns, naming it, and uses the newest intact one; when no
    intact one is left, a one-line error."""
    import shutil

    from checkpoint import WEIGHTS_FILE, read_meta, save_checkpoint

    root = tiny_run["root"]
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    intact = read_meta(tmp_path / "ckpt" / "step_000003")
    newer = save_checkpoint(tmp_path / "ckpt", 5, _random_model("tiny", vocab=tiny_run["tok"].vocab_size, seed=9,
                                                               max_seq_len=64).float(),
                            None, {k: intact[k] for k in ("model_args", "tokenizer")}, {}, keep=2)
    _truncate(newer / WEIGHTS_FILE)
    args = ("--tokenizer_path", str(root / "tokenizer"), "--input_text", "The cat", "--num_tokens_to_generate", "8",
            "--temperature", "0", "--stream=False")
    proc = script("generate.py", "--save_file_name", str(tmp_path / "ckpt"), *args, cwd=root, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "step_000005" in proc.stderr and "damaged" in proc.stderr
    assert _printed_lines(proc) == _reference_lines(tiny_run, "The cat", 1, 8, temperature=0.0, seed=0)
    _truncate(tmp_path / "ckpt" / "step_000003" / WEIGHTS_FILE)
    _one_line_error(script("generate.py", "--save_file_name", str(tmp_path / "ckpt"), *args, cwd=root, env=ENV),
                    "every checkpoint", "damaged")
