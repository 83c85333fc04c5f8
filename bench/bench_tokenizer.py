"""Tokenizer benchmark: training throughput of our trainer, and compression + encode speed of our trained 32k
vocabulary beside Mistral-Nemo's 131k tokenizer, all in one run on the built-in corpus (offline).

    python bench/bench_tokenizer.py                    # ~1 min on 2 CPU cores
    python bench/bench_tokenizer.py --vocab_size 8192 --min_seconds 0.5

Our tokenizer trains on the first 90% of the built-in corpus's documents. Compression (UTF-8 bytes per token,
higher is better) is measured on two texts: the held-out last 10% of the built-in corpus (the same kind of text
as the training data: in-domain for ours, so it favours ours), and text from elsewhere that neither tokenizer was
fitted to here: the package descriptions (README prose, examples, licences) in the METADATA files of the
installed Python packages, which the built-in corpus does not include. Against Mistral-Nemo's general-purpose
vocabulary only the second comparison is fair. Mistral-Nemo's tokenizer is read from the tekken_240718.json that
mistral-common ships (converted by tokenizer.tekken_to_hf; tests/test_tokenizer.py checks it gives exactly
mistral_common's ids). Encode throughput is measured on the held-out built-in text.

Peers: training, beside our GPT-4-regex trainer, the `tokenizers` library's stock ByteLevelBPETokenizer (GPT-2
regex) on the same text and vocab size; encoding, beside our Rust `encode_batch` (parallel), mistral_common's own
Tekkenizer.encode (tiktoken) one document at a time, as the scripts would otherwise call it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tokenizers  # noqa: E402

import tokenizer as tk  # noqa: E402
from corpus import builtin_corpus_documents  # noqa: E402
from train_tokenizer import TRAINED_SPECIAL_TOKENS, train_on_documents  # noqa: E402


def utf8_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def best_time(fn: Callable[[], object], min_seconds: float, max_repeats: int = 20) -> float:
    """Fastest of repeated runs (at least one, and until min_seconds have been spent): the least noisy figure."""
    best, spent, repeats = float("inf"), 0.0, 0
    while repeats < 1 or (spent < min_seconds and repeats < max_repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def package_descriptions(min_chars: int = 200) -> list[str]:
    """Text from outside the built-in corpus: the long descriptions (the body after the headers) of the METADATA
    files of the installed packages, in sorted order."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/METADATA")):
        text = path.read_text(encoding="utf-8", errors="replace")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if len(body) >= min_chars:
            docs.append(body)
    return docs


def train_stock_bytelevel(texts: list[str], vocab_size: int, min_frequency: int) -> None:
    """The peer trainer: tokenizers' ready-made byte-level BPE (GPT-2 split regex), same specials and size."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    peer = ByteLevelBPETokenizer()
    peer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                             special_tokens=list(TRAINED_SPECIAL_TOKENS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_size", type=int, default=32768, help="vocabulary size of our trained tokenizer")
    parser.add_argument("--min_frequency", type=int, default=1,
                        help="1 (not the script's 2) so 1.9 MB of text can fill a 32k vocabulary")
    parser.add_argument("--train_repeats", type=int, default=5,
                        help="interleaved training rounds (ours, peer); the speed ratio is the median per round")
    parser.add_argument("--held_out", type=float, default=0.1, help="fraction of documents held out (the last)")
    parser.add_argument("--min_seconds", type=float, default=1.0, help="time spent per encode measurement")
    args = parser.parse_args()

    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    documents = list(builtin_corpus_documents())
    split = int(len(documents) * (1 - args.held_out))
    train_docs, test_docs = documents[:split], documents[split:]
    train_mb, test_bytes = utf8_bytes(train_docs) / 1e6, utf8_bytes(test_docs)
    print(f"built-in corpus: {len(train_docs)} training documents ({train_mb:.2f} MB), {len(test_docs)} held-out "
          f"documents ({test_bytes / 1e6:.2f} MB); {os.cpu_count()} CPU cores, {platform.processor() or '?'}, "
          f"tokenizers {tokenizers.__version__}, mistral-common {mistral_common.__version__}\n")

    # training throughput: interleaved rounds (ours, then the peer), the ratio per round (a load spike hits both)
    # (wall time, and CPU time of this process over all threads: steadier when other work shares the cores)
    ours_times, peer_times, ours_cpu, peer_cpu = [], [], [], []
    for _ in range(args.train_repeats):
        start, cpu = time.perf_counter(), time.process_time()
        backend, _ = train_on_documents(train_docs, args.vocab_size, args.min_frequency)
        ours_times.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        train_stock_bytelevel(train_docs, args.vocab_size, args.min_frequency)
        peer_times.append(time.perf_counter() - start)
        peer_cpu.append(time.process_time() - cpu)
    ours_train_s, peer_train_s = statistics.median(ours_times), statistics.median(peer_times)
    speed = [p / o for o, p in zip(ours_times, peer_times)]
    cpu_speed = [p / o for o, p in zip(ours_cpu, peer_cpu)]
    ours = tk.Tokenizer(backend, kind="trained", bos_id=1, eos_id=2, pad_id=0)

    tekken_path = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    nemo = tk.load_mistral_tokenizer(tekken_path)
    reference = Tekkenizer.from_file(tekken_path)

    rows: list[tuple[str, str, str]] = [
        ("train: ours (GPT-4 regex, Rust BpeTrainer)", f"{train_mb / ours_train_s:.2f} MB/s",
         f"{ours_train_s:.2f} s, vocab {ours.vocab_size} (asked {args.vocab_size})"),
        ("train: peer tokenizers ByteLevelBPETokenizer", f"{train_mb / peer_train_s:.2f} MB/s",
         f"{peer_train_s:.2f} s; ours/peer speed {statistics.median(speed):.2f}x "
         f"[{min(speed):.2f}-{max(speed):.2f}] over {len(speed)} rounds; by CPU time "
         f"{statistics.median(cpu_speed):.2f}x [{min(cpu_speed):.2f}-{max(cpu_speed):.2f}]"),
    ]

    # compression: in-domain held-out text, then text from elsewhere
    foreign = package_descriptions()
    for label, docs in (("held-out built-in (in-domain for ours)", test_docs),
                        (f"elsewhere: {len(foreign)} package descriptions", foreign)):
        n_bytes = utf8_bytes(docs)
        ours_tokens = sum(map(len, ours.encode_batch(docs)))
        nemo_tokens = sum(map(len, nemo.encode_batch(docs)))
        reference_tokens = sum(len(reference.encode(t, bos=False, eos=False)) for t in docs)
        assert reference_tokens == nemo_tokens, "our Nemo conversion disagrees with mistral_common"
        rows += [
            (f"bytes/token, {label}: ours {ours.vocab_size}", f"{n_bytes / ours_tokens:.3f}",
             f"{ours_tokens} tokens, {n_bytes / 1e6:.2f} MB"),
            (f"bytes/token, {label}: Mistral-Nemo {nemo.vocab_size}", f"{n_bytes / nemo_tokens:.3f}",
             f"{nemo_tokens} tokens; bytes/token ours/Nemo {nemo_tokens / ours_tokens:.3f}"),
        ]

    # encode throughput on held-out text
    timings = {
        f"encode_batch: ours {ours.vocab_size}": best_time(lambda: ours.encode_batch(test_docs),
                                                                    args.min_seconds),
        f"encode_batch: Mistral-Nemo {nemo.vocab_size} (ours)":
            best_time(lambda: nemo.encode_batch(test_docs), args.min_seconds),
        "encode loop: mistral_common Tekkenizer (tiktoken)":
            best_time(lambda: [reference.encode(t, bos=False, eos=False) for t in test_docs], args.min_seconds),
    }
    nemo_ours_s = timings[f"encode_batch: Mistral-Nemo {nemo.vocab_size} (ours)"]
    for name, seconds in timings.items():
        rows.append((name, f"{test_bytes / 1e6 / seconds:.2f} MB/s",
                     f"{seconds * 1e3:.0f} ms per pass; speed vs our Nemo encode_batch {nemo_ours_s / seconds:.2f}x"))

    print(f"(load average {os.getloadavg()[0]:.1f} over 1 min, {os.getloadavg()[1]:.1f} over 5 min)")
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>12}  notes")
    print("-" * (width + 50))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    main()
