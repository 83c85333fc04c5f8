"""Generate text from a trained checkpoint with the preallocated latent (MLA) KV cache.

    python generate.py --input_text "Hello" --save_file_name checkpoints
    python generate.py --input_file prompts.txt --temperature 0 --num_tokens_to_generate 50
    python generate.py --input_text "Once" --num_samples 4 --top_p 0.9 --seed 1

Decoding is a small loop (gpt-fast style): the prompt batch (left-padded to one length, `pad[b]` slots per row) goes
through the model once (prefill, SDPA), then one token per step goes through the model's absorbed-MLA decode path,
which reads only the latent cache. Everything that can be done once is done before the loop: the token buffer holding
prompt + generation, the pad tensor, the cache, the RNG.

Testable pieces: `top_k_filter`, `top_p_filter`, `sample_next`, `generate` (cached), `generate_reference` (recomputes
the whole forward at every step, one unpadded row at a time, no cache).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from common import DTYPES, first_line, resolve_device, resolve_dtype
from config import GenerateConfig, UserError, parse_config, run_main

# ----------------------------------------------------------------------------------------------------------------
# Sampling


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (ties at the threshold are kept); the rest become -inf."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep, per row, the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token is always kept); the others become -inf. logits: [..., V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
    drop = mass_before >= top_p                        # the set already reached top_p without this token
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits [B, V] -> LongTensor [B]. temperature <= 0 is greedy (argmax); otherwise the
    logits are divided by temperature, then filtered by top_k and top_p, and one token is drawn."""
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Generation loops


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise UserError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty: give at least one token")


def _finish(rows: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Rows of new tokens -> lists, each cut after its first eos (the eos is kept)."""
    out = []
    for row in rows.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(row)
    return out


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, eos_id: int | None = None, pad_id: int = 0,
             vocab_size: int | None = None, decode_step: Callable | None = None,
             callback: Callable[[int, torch.Tensor], None] | None = None,
             timings: dict | None = None) -> list[list[int]]:
    """Sample up to max_new_tokens new tokens for each prompt (token lists of any lengths, one batch).

    One prefill pass over the left-padded prompts, then one token per step from the latent cache. With eos_id,
    a row stops at its first eos (kept in its output; later slots are ignored) and the loop ends when all rows
    stopped. vocab_size restricts sampling to the first vocab_size logits (a tokenizer smaller than the model's
    vocabulary). decode_step(tokens[B,1], start_pos, pad) -> logits replaces the model call of the decode steps
    (a compiled step). callback(i, tokens[B]) sees each new column. timings (a dict) receives prefill_s, decode_s,
    decode_steps. Returns the new tokens of each row."""
    _check_prompts(prompts)
    device, _ = model_device_dtype(model)
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    prompt_len = max(lengths)
    total = prompt_len + max_new_tokens
    # everything the loop needs, allocated once
    tokens = torch.full((batch, total), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, prompt_len - len(p):prompt_len] = torch.as_tensor(list(p), dtype=torch.long)
    tokens = tokens.to(device)
    # left padding per row; None when no row is padded (the model then needs no mask and no per-row positions)
    pad = torch.tensor([prompt_len - n for n in lengths], dtype=torch.long, device=device) \
        if min(lengths) < prompt_len else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    step = decode_step or (lambda t, start_pos, pad: model(t, start_pos=start_pos, pad=pad))
    model.setup_cache(batch, total, device=device)
    check_every = 1 if device.type == "cpu" else 8  # all-done test syncs the GPU: do it every few steps there

    if timings is not None:
        _sync(device)
        t0 = time.perf_counter()
    logits = model(tokens[:, :prompt_len], start_pos=0, pad=pad, last_only=True)[:, -1]
    steps = 0
    t1 = None
    for i in range(max_new_tokens):
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        nxt = sample_next(logits, temperature, top_p, top_k, generator)
        pos = prompt_len + i
        if eos_id is not None:
            nxt = torch.where(done, pad_id, nxt)
            done |= nxt == eos_id
        tokens[:, pos] = nxt
        if callback is not None:
            callback(i, nxt)
        if i == 0 and timings is not None:
            _sync(device)
            t1 = time.perf_counter()
        if i == max_new_tokens - 1:
            break
        if eos_id is not None and (i + 1) % check_every == 0 and bool(done.all()):
            break
        logits = step(tokens[:, pos:pos + 1], pos, pad)[:, -1]
        steps += 1
    if timings is not None:
        _sync(device)
        t2 = time.perf_counter()
        if t1 is None:  # max_new_tokens == 0
            t1 = t2
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps, batch=batch,
                       prompt_len=prompt_len)
    return _finish(tokens[:, prompt_len:prompt_len + steps + 1 if max_new_tokens else prompt_len], eos_id)


@torch.inference_mode()
def generate_reference(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       generator: torch.Generator | None = None, eos_id: int | None = None, pad_id: int = 0,
                       vocab_size: int | None = None) -> list[list[int]]:
    """The same sampling as `generate` without any cache or padding: at every step each row's whole (unpadded)
    sequence goes through the plain causal forward. Slow; for tests."""
    _check_prompts(prompts)
    device, _ = model_device_dtype(model)
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = torch.cat([model(torch.tensor([s], device=device))[:, -1] for s in seqs])
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        nxt = sample_next(logits, temperature, top_p, top_k, generator).tolist()
        for b, t in enumerate(nxt):
            if done[b]:
                t = pad_id
            elif eos_id is not None and t == eos_id:
                done[b] = True
                new[b].append(t)
            else:
                new[b].append(t)
            seqs[b].append(t)
        if all(done):
            break
    return new


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_decode_step(model: torch.nn.Module, compile_model: bool) -> Callable | None:
    """The decode step, compiled with torch.compile when asked (the position is a dynamic int: one graph)."""
    if not compile_model:
        return None

    def step(tok: torch.Tensor, start_pos: int, pad: torch.Tensor) -> torch.Tensor:
        return model(tok, start_pos=start_pos, pad=pad)

    return torch.compile(step, dynamic=True, fullgraph=False)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def read_prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.input_file:
        path = Path(cfg.input_file)
        if path.is_dir():
            raise UserError(f"--input_file {path} is a folder; give a text file with one prompt per line")
        if not path.is_file():
            raise UserError(f"--input_file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--input_file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        except OSError as e:
            raise UserError(f"cannot read --input_file {path} ({first_line(e)})") from None
        texts = [t for t in text.splitlines() if t.strip()]
        if not texts:
            raise UserError(f"--input_file {path} holds no prompt (one prompt per non-empty line)")
        return texts
    if not cfg.input_text.strip():
        raise UserError("empty prompt: give some text with --input_text (or prompts with --input_file)")
    return [cfg.input_text]


def check_length(longest: int, new_tokens: int, limit: int) -> None:
    """A UserError saying what to change when a prompt of `longest` tokens plus `new_tokens` exceeds `limit`."""
    if longest + new_tokens <= limit:
        return
    fit = limit - longest
    if fit >= 1:
        raise UserError(f"prompt of {longest} tokens + {new_tokens} new tokens is longer than the context of "
                        f"{limit} tokens: at most {fit} new tokens fit (lower --num_tokens_to_generate or shorten "
                        f"the prompt)")
    room = limit - new_tokens
    if room >= 1:
        raise UserError(f"prompt of {longest} tokens is longer than the context of {limit} tokens: shorten it to "
                        f"at most {room} tokens or lower --num_tokens_to_generate")
    raise UserError(f"prompt of {longest} tokens is longer than the context of {limit} tokens: shorten it to at "
                    f"most {limit - 1} tokens and lower --num_tokens_to_generate to fit (prompt + new tokens <= "
                    f"{limit})")


class StreamPrinter:
    """Prints a single sequence as it grows: decodes the whole generated sequence each time and prints the new
    suffix, holding back a trailing partial UTF-8 character (decoded as U+FFFD) until it is complete."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, i: int, nxt: torch.Tensor) -> None:
        self.ids.append(int(nxt[0]))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed):
            new = text[len(self.printed):]
        else:  # decoding changed earlier characters (rare): print only what is beyond the printed length
            new = text[len(self.printed):] if len(text) > len(self.printed) else ""
        if new:
            self.out.write(new)
            self.out.flush()
            self.printed += new


# ----------------------------------------------------------------------------------------------------------------
# Terminal chat (--chat): the template and the reply stream come from chat.py


def make_sampler(temperature: float, top_p: float, top_k: int, vocab_size: int,
                 generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits[..., :vocab_size], temperature, top_p, top_k, generator)

    return sample


def chat_loop(model: torch.nn.Module, tok, cfg, read: Callable[[str], str] = input, out=sys.stdout) -> None:
    """The conversation: read a line, stream the reply, repeat. /reset forgets the conversation, /exit or end of
    input ends it."""
    from chat import ChatFormat, TextStream, fit_history, stream_tokens

    fmt = ChatFormat(tok)
    device = next(model.parameters()).device
    limit = min(cfg.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    max_new = min(cfg.num_tokens_to_generate, limit - 8)
    if max_new < 1:
        raise UserError(f"the context of {limit} tokens leaves no room for a reply")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sample = make_sampler(cfg.temperature, cfg.top_p, cfg.top_k, tok.vocab_size, generator)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages = list(system)
    out.write(f"Chatting with {cfg.save_file_name} ({tok.kind} tokenizer). /reset starts over, /exit quits.\n")
    out.flush()
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            messages = list(system)
            out.write("(conversation reset)\n")
            out.flush()
            continue
        messages.append({"role": "user", "content": line})
        messages, prompt = fit_history(fmt, messages, limit - max_new)
        out.write("assistant> ")
        out.flush()
        stream = TextStream(tok)
        for token in stream_tokens(model, prompt, max_new, fmt.stop_ids, sample):
            piece = stream.add(token)
            if piece:
                out.write(piece)
                out.flush()
        out.write(stream.add(None, final=True) + "\n")
        out.flush()
        messages.append({"role": "assistant", "content": stream.text})


def main_chat(cfg) -> None:
    """generate.py --chat: load the checkpoint and talk to it in the terminal."""
    from chat import ChatFormat, load_chat_model

    torch.manual_seed(cfg.seed)
    model, tok, _, _ = load_chat_model(cfg)
    ChatFormat(tok)  # a tokenizer without chat tokens stops here, before the first prompt
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat_loop(model, tok, cfg)


def main(argv: Sequence[str] | None = None) -> None:
    cfg: GenerateConfig = parse_config(GenerateConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.chat:
        return main_chat(cfg)
    texts = read_prompts(cfg)

    import tokenizer as tokenizer_mod
    from hf_interop import load_any_model

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    # weights already in the dtype asked for stay memory-mapped; others are converted (the router stays fp32)
    model, meta = load_any_model(cfg.save_file_name, device=device, dtype=DTYPES[dtype])
    source = meta.get("hf_folder") or f"{cfg.save_file_name} (step {meta.get('step')})"
    tok = tokenizer_mod.load_recorded_tokenizer(cfg, meta.get("tokenizer"), f"the checkpoint {source}")
    model_vocab = model.args.vocab_size
    if tok.vocab_size > model_vocab:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model_vocab}: "
                        f"use the tokenizer the model was trained with")

    limit = model.args.max_seq_len
    if cfg.max_seq_len:
        if cfg.max_seq_len > model.args.max_seq_len:
            raise UserError(f"--max_seq_len {cfg.max_seq_len} is longer than the model's context "
                            f"({model.args.max_seq_len} tokens)")
        limit = cfg.max_seq_len
    encoded = [[tok.bos_id] + ids for ids in tok.encode_batch(texts)]
    check_length(max(len(p) for p in encoded), cfg.num_tokens_to_generate, limit)
    prompts = [p for p in encoded for _ in range(cfg.num_samples)]

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    streaming = cfg.stream and len(prompts) == 1
    printer = StreamPrinter(tok) if streaming else None
    if streaming:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    timings: dict = {}
    decode_step = make_decode_step(model, cfg.compile_model)
    outputs = generate(model, prompts, cfg.num_tokens_to_generate, temperature=cfg.temperature,
                       top_p=cfg.top_p, top_k=cfg.top_k, generator=generator,
                       eos_id=tok.eos_id if cfg.stop_at_eos else None, pad_id=tok.pad_id,
                       vocab_size=tok.vocab_size, decode_step=decode_step, callback=printer, timings=timings)
    if streaming:
        printer.flush(final=True)
        print()
    else:
        for i, out in enumerate(outputs):
            text = texts[i // cfg.num_samples]
            print(f"--- [{i // cfg.num_samples}.{i % cfg.num_samples}] " if cfg.num_samples > 1 else f"--- [{i}] ",
                  end="")
            print(text + tok.decode(out))

    n_prompt = sum(len(p) for p in prompts)
    n_new = sum(len(o) for o in outputs)
    prefill_tps = n_prompt / max(timings["prefill_s"], 1e-9)
    decode_tokens = timings["decode_steps"] * len(prompts)
    decode_tps = decode_tokens / timings["decode_s"] if timings["decode_s"] > 0 else float("nan")
    cache_mb = model.cache_bytes() / 2**20
    print(f"\n[{source}] prompt tokens: {n_prompt} | generated tokens: {n_new} | batch: {len(prompts)} | "
          f"prefill: {prefill_tps:,.0f} tok/s | decode: {decode_tps:,.1f} tok/s "
          f"({timings['decode_s'] * 1e3 / max(timings['decode_steps'], 1):.2f} ms/step) | "
          f"cache: {cache_mb:.2f} MB | {device.type} {dtype}"
          f"{' compiled (decode time includes the compilation)' if cfg.compile_model else ''}", flush=True)


if __name__ == "__main__":
    run_main(main)
