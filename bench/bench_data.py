"""tokenize_data.py throughput beside its ceiling: the same tokenizer's own encode_batch on all cores over the same
text in memory, for our trained tokenizer and for Mistral-Nemo's (tekken_240718.json from mistral-common).

    python bench/bench_data.py                        # ~3 min on 2 idle CPU cores
    python bench/bench_data.py --repeat 1 --rounds 5 --vocab_size 8192 --no_mistral

What is timed:
  ceiling     tokenizer.encode_batch (Rust, parallel on every core, ids as lists) over the same documents, one call
              per pipeline chunk in a row: the encoding alone, without the pipelining, framing and writing (one
              call over everything is slower: a list of 10M Python ints costs more than it saves).
  pipeline    tokenize_data.tokenize_documents over the same documents (an in-memory iterator): chunked
              encode in a background thread, bos/eos framing, uint16/uint32 shards written atomically with their
              document indexes and checksums, metadata.json; i.e. everything tokenize_data.py does after reading
              the source. Run with each engine: 'tokenizers' (the tokenizer's own encode_batch) and, for
              Mistral's vocabulary, 'tiktoken' (the default there: identical ids, see tests/test_tokenize_data.py).
  tiktoken    tiktoken's own encode_ordinary_batch on all cores, per chunk (the second ceiling for the tiktoken
              engine).
  script      (informational, --script) `python tokenize_data.py` end to end on the built-in corpus: also includes Python
              start-up, loading the tokenizer and assembling the built-in corpus (parsing the stdlib), which
              the in-memory rows exclude.
Also: ShardedLoader.next_batch throughput (shuffled 16x256 batches from memory-mapped shards) beside gathering
the same windows from one in-RAM array.
After one warm-up round, each of --rounds rounds runs the ceiling and the pipeline back to back (A B A B ...); a
ratio is the median of the per-round ratios, shown with its range, tokens/s the median round. The default input
(the built-in corpus x4, ~1.7 s per run for the trained tokenizer on 2 idle cores) is long enough for the ratio to
hold within a few percent across reruns; the first version's ~0.3 s runs swung by 10%. Wall-time ratios are the
headline (the pipeline must keep every core busy); the CPU-time ratio (this process, all threads) shows the
overhead without the effect of other load. Target: pipeline/ceiling >= 0.85 for both tokenizers.
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
    if ARGS.tekken:
        return Path(ARGS.tekken)
    import mistral_common
    return Path(mistral_common.__file__).resolve().parent / "data" / "tekken_240718.json"


ARGS = argparse.Namespace(tekken="")


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, all threads, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def spread(values: list[float]) -> str:
    """median [min-max]"""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def bench_tokenizer(name: str, tok, texts: list[str], rounds: int, shard_size: int, engines: list[str],
                    workers: int) -> list[tuple]:
    """One warm-up round, then `rounds` rounds of: ceiling, the pipeline with each engine, (tiktoken's own batch
    encode), back to back. Ratios are per round (so a load spike hits both sides of a ratio alike), reported as
    the median with the range; tokens/s is the median round."""
    encoders = {e: td.make_encoder(tok, e, workers=workers) for e in engines}
    tik = td.tiktoken_encoding(tok)[0] if "tiktoken" in engines else None
    chunks = list(td.chunk_documents(iter(texts)))
    n_tokens = 0  # set by each ceiling run
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def record(key: str, dt: float, dc: float, warm_up: bool) -> None:
        if not warm_up:
            wall.setdefault(key, []).append(dt)
            cpu.setdefault(key, []).append(dc)

    for round_ in range(rounds + 1):
        warm_up = round_ == 0
        dt, dc, ids = timed(lambda: [tok.encode_batch(chunk) for chunk in chunks])
        n_tokens = sum(len(i) for chunk in ids for i in chunk) + 2 * len(texts)  # + bos/eos, as the pipeline writes
        del ids
        record("ceiling", dt, dc, warm_up)
        for engine in engines:
            out = Path(tempfile.mkdtemp(prefix="bench_data_"))
            try:
                dt, dc, meta = timed(lambda: td.tokenize_documents(iter(texts), tok, out, shard_size, progress=False,
                                                                   encode=encoders[engine]))
                assert meta["total_tokens"] == n_tokens, (meta["total_tokens"], n_tokens)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            record(engine, dt, dc, warm_up)
        if tik is not None:
            dt, dc, _ = timed(lambda: [tik.encode_ordinary_batch(chunk, num_threads=workers) for chunk in chunks])
            record("tiktoken_ceiling", dt, dc, warm_up)
        if not warm_up:
            print(f"  {name} round {round_}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items())
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)

    def ratios(a: str, b: str, table: dict[str, list[float]]) -> list[float]:
        return [x / y for x, y in zip(table[a], table[b])]

    rows = [(name, "encode_batch ceiling", n_tokens / statistics.median(wall["ceiling"]), "1", "1")]
    for engine in engines:
        rows.append((name, f"tokenize_data pipeline [{engine}]", n_tokens / statistics.median(wall[engine]),
                     spread(ratios("ceiling", engine, wall)), spread(ratios("ceiling", engine, cpu))))
    if tik is not None:
        rows.append((name, "tiktoken encode_ordinary_batch", n_tokens / statistics.median(wall["tiktoken_ceiling"]),
                     spread(ratios("ceiling", "tiktoken_ceiling", wall)),
                     spread(ratios("ceiling", "tiktoken_ceiling", cpu))))
        rows.append((name, "  pipeline [tiktoken] / tiktoken ceiling", float("nan"),
                     spread(ratios("tiktoken_ceiling", "tiktoken", wall)),
                     spread(ratios("tiktoken_ceiling", "tiktoken", cpu))))
    return rows


def bench_loader(tok, texts: list[str], batch_size: int, seq_len: int, batches: int, rounds: int) -> None:
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

        ours()  # warm-up: pages mapped, every shard's checksum checked once (the first-read cost, below)
        t_ours, t_ram = [], []
        for _ in range(rounds):
            t_ours.append(timed(ours)[0])
            t_ram.append(timed(in_ram)[0])
        n = batches * batch_size * seq_len
        median_ours, median_ram = statistics.median(t_ours), statistics.median(t_ram)
        print(f"\nloader: {batches} shuffled batches of {batch_size}x{seq_len} over {len(loader.shards)} shards, "
              f"{rounds} interleaved rounds")
        print(f"  ShardedLoader.next_batch (mmap)  {n / median_ours:14,.0f} tokens/s  "
              f"{median_ours / batches * 1e6:8.0f} us/batch")
        print(f"  in-RAM numpy gather (peer)       {n / median_ram:14,.0f} tokens/s  "
              f"{median_ram / batches * 1e6:8.0f} us/batch   ratio {spread([r / o for r, o in zip(t_ram, t_ours)])}")
        # the checksum each shard gets when a batch first reads from it (train.py pays it once per shard and run)
        times = []
        for _ in range(rounds):
            fresh = ShardedLoader(out, "train", batch_size, seq_len, vocab_size=tok.vocab_size)
            times.append(timed(fresh.verify)[0])
        dt = statistics.median(times)
        print(f"  shard checksums (crc32, all {len(loader.shards)} shards, {loader.tokens:,} tokens, page cache warm): "
              f"{dt * 1e3:.1f} ms = {loader.tokens / dt / 1e6:,.0f} M tokens/s, once per shard per run")
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
    parser.add_argument("--repeat", type=int, default=4, help="copies of the built-in corpus to encode (~2 MB each)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds after one warm-up round")
    parser.add_argument("--vocab_size", type=int, default=32768, help="vocabulary of the trained tokenizer")
    parser.add_argument("--tokenizer_path", default="", help="use this trained tokenizer instead of training one")
    parser.add_argument("--shard_size", type=int, default=1_000_000, help="tokens per shard")
    parser.add_argument("--no_mistral", action="store_true")
    parser.add_argument("--script", action="store_true", help="also time the end-to-end script runs")
    parser.add_argument("--tekken", default="", help="Mistral-Nemo's tekken.json (default: the one mistral-common "
                                                     "ships)")
    args = parser.parse_args()
    ARGS.tekken = args.tekken

    workers = td.usable_cpus()
    docs = list(corpus.builtin_corpus_documents())
    texts = docs * args.repeat
    print(f"text: built-in corpus x{args.repeat} = {len(texts):,} documents, "
          f"{sum(map(len, texts)) / 1e6:.1f} M characters; {workers} CPU cores; {args.rounds} rounds; "
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
        rows = bench_tokenizer(f"trained {trained.vocab_size}", trained, texts, args.rounds, args.shard_size,
                               ["tokenizers"], workers)
        mistral = None
        if not args.no_mistral:
            mistral = load_tokenizer(TokenizerOptions(load_mistral_tokenizer=True,
                                                      mistral_tokenizer_path=str(tekken_path())))
            rows += bench_tokenizer(f"mistral {mistral.vocab_size}", mistral, texts, args.rounds, args.shard_size,
                                    ["tokenizers", "tiktoken"], workers)

        print(f"\n{'tokenizer':<14} {'what':<42} {'tokens/s':>12} {'speed vs ceiling, wall':>24} "
              f"{'CPU-time ratio':>18}")
        for name, what, rate, ratio, cpu_ratio in rows:
            rate_text = f"{rate:,.0f}" if rate == rate else ""
            print(f"{name:<14} {what:<42} {rate_text:>12} {ratio:>24} {cpu_ratio:>18}")
        print(f"ratios: median [range] of {args.rounds} per-round ratios (wall time; CPU time of this process for "
              f"the last column); target: pipeline / ceiling >= 0.85; load average now: "
              f"{os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")

        bench_loader(trained, docs, 16, 256, 2000, args.rounds)

        if args.script:
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
