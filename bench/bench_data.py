"""tokenize_data.py throughput beside its ceiling: the same tokenizer's own encode_batch on all cores over the same
text in memory, for our trained tokenizer and for Mistral-Nemo's (tekken_240718.json from mistral-common).

    python bench/bench_data.py                        # ~2 min on 2 CPU cores
    python bench/bench_data.py --repeat 1 --trials 3 --vocab_size 8192 --no_script

What is timed:
  ceiling     tokenizer.encode_batch (Rust, parallel on every core, ids as lists) over the same documents, the
              faster (per trial) of one call over everything and one call per pipeline chunk in a row.
  pipeline    tokenize_data.tokenize_documents over the same documents (an in-memory iterator): chunked
              encode in a background thread, bos/eos framing, uint16/uint32 shards written atomically with their
              document indexes and checksums, metadata.json; i.e. everything tokenize_data.py does after reading
              the source. Run with each engine: 'tokenizers' (the tokenizer's own encode_batch) and, for
              Mistral's vocabulary, 'tiktoken' (the default there: identical ids, see tests/test_data.py).
  tiktoken    tiktoken's own encode_ordinary_batch on all cores (the second ceiling for the tiktoken engine).
  script      (informational) `python tokenize_data.py` end to end on the built-in corpus: also includes Python
              start-up, loading the tokenizer and assembling the built-in corpus (parsing the stdlib), which
              the in-memory rows exclude.
Also: ShardedLoader.next_batch throughput (shuffled 16x256 batches from memory-mapped shards) beside gathering
the same windows from one in-RAM array.
Trials alternate ceiling and pipeline runs; the ratio is the median of per-trial ratios (robust to other load on
the machine), tokens/s the best trial. Target: pipeline/ceiling >= 0.85 for both tokenizers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import corpus  # noqa: E402
import tokenize_data as td  # noqa: E402
from config import TokenizerOptions  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def tekken_path() -> Path:
    import mistral_common
    return Path(mistral_common.__file__).resolve().parent / "data" / "tekken_240718.json"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_tokenizer(name: str, tok, texts: list[str], trials: int, shard_size: int, engines: list[str],
                    workers: int) -> list[tuple]:
    rows = []
    n_tokens = None
    ceiling_times, pipe_times = [], {e: [] for e in engines}
    encoders = {e: td.make_encoder(tok, e, workers=workers) for e in engines}
    tik = None
    if "tiktoken" in engines:
        tik, offset = td.tiktoken_encoding(tok)
        tik_times = []
    chunks = list(td.chunk_documents(iter(texts)))
    one_call_times, chunked_times = [], []
    for trial in range(trials):
        dt, ids = timed(lambda: tok.encode_batch(texts))
        n_tokens = sum(map(len, ids)) + 2 * len(texts)  # + bos/eos, as the pipeline writes them
        del ids
        one_call_times.append(dt)
        dt, _ = timed(lambda: [tok.encode_batch(chunk) for chunk in chunks])
        chunked_times.append(dt)
        ceiling_times.append(min(one_call_times[-1], chunked_times[-1]))
        for engine in engines:
            out = Path(tempfile.mkdtemp(prefix="bench_data_"))
            try:
                dt, meta = timed(lambda: td.tokenize_documents(iter(texts), tok, out, shard_size, progress=False,
                                                               encode=encoders[engine]))
                assert meta["total_tokens"] == n_tokens, (meta["total_tokens"], n_tokens)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            pipe_times[engine].append(dt)
        if tik is not None:
            dt, _ = timed(lambda: tik.encode_ordinary_batch(texts, num_threads=workers))
            tik_times.append(dt)
    rows.append((name, "encode_batch, one call", n_tokens / min(one_call_times),
                 statistics.median(c / t for c, t in zip(ceiling_times, one_call_times))))
    rows.append((name, f"encode_batch, {len(chunks)} chunks in a row", n_tokens / min(chunked_times),
                 statistics.median(c / t for c, t in zip(ceiling_times, chunked_times))))
    for engine in engines:
        ratios = [c / p for c, p in zip(ceiling_times, pipe_times[engine])]
        rows.append((name, f"tokenize_data pipeline [{engine}]", n_tokens / min(pipe_times[engine]),
                     statistics.median(ratios)))
    if tik is not None:
        ratios = [c / t for c, t in zip(ceiling_times, tik_times)]
        rows.append((name, "tiktoken encode_ordinary_batch", n_tokens / min(tik_times), statistics.median(ratios)))
        ratios = [t / p for t, p in zip(tik_times, pipe_times["tiktoken"])]
        rows.append((name, "  pipeline [tiktoken] / tiktoken ceiling", float("nan"), statistics.median(ratios)))
    return rows


def bench_loader(tok, texts: list[str], batch_size: int, seq_len: int, batches: int) -> None:
    """ShardedLoader.next_batch (memory-mapped shards, shuffled windows) beside the same windows gathered from
    one in-RAM numpy array (the peer: what a loader that reads everything into memory would do)."""
    import numpy as np
    import torch

    from data_loader import ShardedLoader
    out = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        td.tokenize_documents(iter(texts), tok, out, 100_000, progress=False)
        loader = ShardedLoader(out, "train", batch_size, seq_len, shuffle=True, seed=0,
                               vocab_size=tok.vocab_size, tokenizer_fingerprint=tok.fingerprint)
        stream = np.concatenate([np.load(out / s["file"]) for s in loader.shards])
        positions = [loader.window_index(p) for p in range(batches * batch_size)]

        def in_ram() -> None:
            for b in range(batches):
                rows = np.stack([stream[w * seq_len: w * seq_len + seq_len + 1]
                                 for w in positions[b * batch_size:(b + 1) * batch_size]]).astype(np.int64)
                torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

        def ours() -> None:
            loader.reset()
            for _ in range(batches):
                loader.next_batch()

        t_ours = min(timed(ours)[0] for _ in range(3))
        t_ram = min(timed(in_ram)[0] for _ in range(3))
        n = batches * batch_size * seq_len
        print(f"\nloader: {batches} shuffled batches of {batch_size}x{seq_len} over {len(loader.shards)} shards")
        print(f"  ShardedLoader.next_batch (mmap)  {n / t_ours:14,.0f} tokens/s  {t_ours / batches * 1e6:8.0f} us/batch")
        print(f"  in-RAM numpy gather (peer)       {n / t_ram:14,.0f} tokens/s  {t_ram / batches * 1e6:8.0f} us/batch"
              f"   ratio {t_ram / t_ours:.2f}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def script_run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "tokenize_data.py"), *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return wall, "failed: " + result.stderr.strip()[-200:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("wrote")]
    return wall, summary[-1].split("; ")[-1] if summary else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="copies of the built-in corpus to encode (~2 MB each)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=32768, help="vocabulary of the trained tokenizer")
    parser.add_argument("--tokenizer_path", default="", help="use this trained tokenizer instead of training one")
    parser.add_argument("--shard_size", type=int, default=1_000_000, help="tokens per shard")
    parser.add_argument("--no_mistral", action="store_true")
    parser.add_argument("--no_script", action="store_true", help="skip the end-to-end script runs")
    args = parser.parse_args()

    workers = os.cpu_count() or 1
    docs = list(corpus.builtin_corpus_documents())
    texts = docs * args.repeat
    print(f"text: built-in corpus x{args.repeat} = {len(texts):,} documents, "
          f"{sum(map(len, texts)) / 1e6:.1f} M characters; {workers} CPU cores; {args.trials} trials; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_tok_"))
    try:
        tok_path = args.tokenizer_path
        if not tok_path:
            import train_tokenizer
            tok_path = str(tmp / "tokenizer")
            t0 = time.perf_counter()
            train_tokenizer.main(["--vocab_size", str(args.vocab_size), "--output_path", tok_path])
            print(f"(trained a {args.vocab_size} tokenizer in {time.perf_counter() - t0:.1f} s)")
        trained = load_tokenizer(TokenizerOptions(tokenizer_path=tok_path))
        rows = bench_tokenizer(f"trained {trained.vocab_size}", trained, texts, args.trials, args.shard_size,
                               ["tokenizers"], workers)
        mistral = None
        if not args.no_mistral:
            mistral = load_tokenizer(TokenizerOptions(load_mistral_tokenizer=True,
                                                      mistral_tokenizer_path=str(tekken_path())))
            rows += bench_tokenizer(f"mistral {mistral.vocab_size}", mistral, texts, args.trials, args.shard_size,
                                    ["tokenizers", "tiktoken"], workers)

        print(f"\n{'tokenizer':<14} {'what':<42} {'tokens/s':>12} {'x ceiling':>10}")
        for name, what, rate, ratio in rows:
            rate_text = f"{rate:,.0f}" if rate == rate else ""
            print(f"{name:<14} {what:<42} {rate_text:>12} {ratio:>10.2f}")
        print(f"target: tokenize_data pipeline / ceiling >= 0.85 (load average now: {os.getloadavg()[0]:.1f}; "
              f"other load on the machine makes single trials noisy)")

        bench_loader(trained, docs, 16, 256, 300)

        if not args.no_script:
            print("\nend to end (python tokenize_data.py on the built-in corpus, wall time incl. start-up, "
                  "tokenizer load and corpus assembly):")
            runs = [("trained", ["--tokenizer_path", tok_path])]
            if mistral is not None:
                runs += [(f"mistral [{e}]", ["--load_mistral_tokenizer", "--mistral_tokenizer_path",
                                             str(tekken_path()), "--encoder", e]) for e in ("tokenizers", "tiktoken")]
            for name, extra in runs:
                wall, summary = script_run([*extra, "--data_file_name", str(tmp / "data"), "--overwrite"])
                print(f"  {name:<22} {wall:6.1f} s wall; the script's own figure: {summary}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
