"""Does fine-tuning make a chat model? The base (pretrained) and the SFT checkpoint side by side, on the held-out
built-in questions (chat_data.py's test split: topics never trained on):

  * mean answer NLL: cross-entropy per answer token (the reply and its end-of-turn), given the question in the
    chat template; lower is better, and the SFT model must beat the base model;
  * ends with end-of-turn: the share of greedy replies that stop with the end-of-turn token within --max_tokens
    (goal: at least 90% for the SFT model).

    python bench/bench_sft.py --base quickstart_out/checkpoints --sft quickstart_out/sft_checkpoints
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chat  # noqa: E402
import chat_data  # noqa: E402
import sft  # noqa: E402
from generate import generate  # noqa: E402


def load(path: str, device: str):
    from config import GenerateConfig

    cfg = GenerateConfig(save_file_name=path, device=device, dtype="fp32")
    model, tok, meta, _ = chat.load_chat_model(cfg)
    return model, tok


def measure(model, tok, conversations, max_tokens: int, batch: int) -> dict[str, float]:
    fmt = chat.ChatFormat(tok)
    seq_len = model.args.max_seq_len
    examples, counts = sft.encode_conversations(fmt, conversations, seq_len - 1, "drop")
    inputs, targets = sft.build_rows(examples, seq_len - 1, tok.pad_id, pack=False)
    t0 = time.perf_counter()
    nll, tokens = sft.answer_nll(model, torch.from_numpy(inputs), torch.from_numpy(targets), batch)
    t1 = time.perf_counter()
    stop = fmt.stop_ids[0]
    ended, lengths = 0, []
    prompts = [fmt.prompt(c[:-1]) for c in conversations]
    prompts = [p for p in prompts if len(p) + max_tokens <= seq_len]
    for start in range(0, len(prompts), batch):
        outs = generate(model, prompts[start:start + batch], max_tokens, temperature=0.0, eos_id=stop,
                        pad_id=tok.pad_id, vocab_size=tok.vocab_size)
        ended += sum(1 for o in outs if o and o[-1] == stop)
        lengths += [len(o) for o in outs]
    t2 = time.perf_counter()
    return {"nll": nll, "nll_tokens": tokens, "ended": ended / max(len(prompts), 1), "questions": len(prompts),
            "mean_reply_tokens": sum(lengths) / max(len(lengths), 1), "dropped": counts["dropped_overlong"],
            "nll_s": t1 - t0, "gen_s": t2 - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="quickstart_out/checkpoints")
    parser.add_argument("--sft", default="quickstart_out/sft_checkpoints")
    parser.add_argument("--max_tokens", type=int, default=96)
    parser.add_argument("--questions", type=int, default=0, help="held-out questions to use (0 = all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=3, help="print this many SFT replies")
    args = parser.parse_args()
    torch.manual_seed(0)
    held_out = [row["messages"] for row in chat_data.builtin_conversations("test")]
    if args.questions:
        held_out = held_out[:args.questions]
    print(f"{len(held_out)} held-out questions | max_tokens {args.max_tokens} | device {args.device} | "
          f"threads {torch.get_num_threads()} | load {os.getloadavg()}")
    results = {}
    for name, path in (("base", args.base), ("sft", args.sft)):
        model, tok = load(path, args.device)
        results[name] = measure(model, tok, held_out, args.max_tokens, args.batch)
        if name == "sft" and args.show:
            fmt = chat.ChatFormat(tok)
            for messages in held_out[:args.show]:
                ids = generate(model, [fmt.prompt(messages[:-1])], args.max_tokens, temperature=0.0,
                               eos_id=fmt.stop_ids[0], pad_id=tok.pad_id, vocab_size=tok.vocab_size)[0]
                print(f"  Q: {messages[0]['content']}\n  A: {tok.decode(ids)!r}\n  reference: "
                      f"{messages[1]['content'][:150]!r}")
    print("\n| model | held-out answer NLL (nats/token) | greedy replies ending with end-of-turn | mean reply tokens |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} ({args.base if name == 'base' else args.sft}) | {r['nll']:.3f} ({r['nll_tokens']} tokens) | "
              f"{100 * r['ended']:.1f}% of {r['questions']} | {r['mean_reply_tokens']:.1f} |")
    base, tuned = results["base"], results["sft"]
    print(f"\nSFT / base answer NLL: {tuned['nll'] / base['nll']:.3f} (lower is better; goal < 1) | "
          f"SFT replies ending with end-of-turn: {100 * tuned['ended']:.1f}% (goal >= 90%)")
    ok = tuned["nll"] < base["nll"] and tuned["ended"] >= 0.9
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
