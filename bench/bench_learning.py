"""Learning efficiency: validation bits per byte reached within a fixed compute budget, for a dense GPT-2-style
baseline, today's `tiny` recipe, the default recipe and ablations, each trained with train.py's step.

    python bench/bench_learning.py                                  # epochs regime, 180 CPU-s, a/b/c, 1 seed
    python bench/bench_learning.py --regime single --budget 600 --seeds 1,2 --jobs 2 # 10 minutes of one core each
    python bench/bench_learning.py --calibrate_only --step_costs costs.json      # measure the step costs here
    python bench/bench_learning.py --step_costs costs.json --device cuda --jobs 8 # run those budgets on a GPU
    python bench/bench_learning.py --report results.jsonl                           # the table of a results file

Regimes. epochs: the built-in corpus (~2 MB of Python's docstrings and help topics), several epochs within the
budget; 10% of its documents (a seeded random choice, so the same distribution) are the validation split.
single: one pass (less than one epoch) over Python's HTML documentation as text (Debian's python3-doc package:
`apt-get install python3-doc`; its index pages, lists of names rather than text, are left out) plus the docstrings of the installed transformers, torch and numpy (~7M tokens),
2% of the documents held out.

Budget. Compute is counted in CPU seconds of one process running one thread (time.process_time): wall-clock on a
shared machine is noise. Each recipe's cost per optimizer step is measured first (a few steps after warm-up, on
the CPU, one thread) and --budget / cost gives its number of steps, so a recipe with a cheaper step gets more
steps. The training itself then runs on --device (cpu by default; on a GPU in fp32 the same steps run faster, with
the budget still the CPU cost measured or read from --step_costs). Evaluation is outside the budget.

Each run is what train.py does with the recipe's flags: the same model (ModelArgs from the preset plus the flags),
initialisation, optimizer (optim.build_optimizer), schedule (optim.set_schedule: learning rates, and the
weight decays as the data repeats), gradient clipping, MoE balancing-bias update; batches are shuffled
non-overlapping windows of the training tokens, as train.py's loader with --shuffle.
Metric: validation bits per byte = mean loss / ln 2 / (UTF-8 bytes per token of the validation split), over the
whole validation split (or, above --val_tokens, windows spread evenly over all of it), evaluated at 10 points of the run: `final` at the end, `best`
the lowest seen (what --keep_best keeps).
"""
from __future__ import annotations

import argparse
import html.parser
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import TrainConfig, model_args_from_preset  # noqa: E402
from optim import build_optimizer, passes_before, repeat_weight_decay, set_schedule  # noqa: E402

SEQ_LEN, BATCH = 128, 16             # the quickstart's batch: 2048 tokens per optimizer step
VOCAB = 4096
PYDOC_HTML = Path("/usr/share/doc/python3/html")

# a recipe: preset, ModelArgs flags, TrainConfig flags. LR search multiplies every rate of a recipe (lr and, with
# Muon, muon_lr) by the same factors, so each recipe gets the same number of runs.
BASE = dict(warm_up=30, min_lr_frac=0.1, weight_decay=0.1, wd_per_epoch=0.0, grad_clip=1.0)
# every recipe names its optimizer and schedule: TrainConfig's defaults must not leak into a recipe
MUON = dict(optimizer="muon", lr=3e-3, muon_lr=0.02, muon_wd_per_epoch=0.0)
_DEFAULTS = TrainConfig()
ADAMW = dict(optimizer="adamw")
WSD = dict(lr_schedule="wsd", decay_frac=0.2)
COSINE = dict(lr_schedule="cosine")
GPT2_ARCH = dict(attn_type="mha", tie_embeddings=True)
# (c), train.py's defaults as a recipe
DEFAULT = dict(optimizer=_DEFAULTS.optimizer, lr=_DEFAULTS.lr, muon_lr=_DEFAULTS.muon_lr,
               lr_schedule=_DEFAULTS.lr_schedule, decay_frac=_DEFAULTS.decay_frac,
               embed_x=_DEFAULTS.embed_lr / _DEFAULTS.lr, min_lr_frac=_DEFAULTS.min_lr / _DEFAULTS.lr,
               muon_weight_decay=_DEFAULTS.muon_weight_decay, muon_wd_per_epoch=_DEFAULTS.muon_wd_per_epoch,
               weight_decay=_DEFAULTS.weight_decay, wd_per_epoch=_DEFAULTS.wd_per_epoch)
# (c) as it was before AdamW's weight decay grew with the passes too: the variants measured then keep it
BEFORE_AWDP = dict(wd_per_epoch=0.0)


def adamw_x(k: float, preset: str = "tiny", model: dict | None = None, **train) -> dict:
    """The previous default (Muon + WSD 40% + emb10) with the AdamW groups at k times its rate, the embedding's
    rate unchanged."""
    return dict(preset=preset, model=model or {}, train={**MUON, "lr": MUON["lr"] * k, **WSD, "decay_frac": 0.4,
                                                         "embed_x": 10 / k, **train})


def default_with(preset: str = "tiny", model: dict | None = None, **train) -> dict:
    """(c), train.py's defaults, with another preset or some ModelArgs and TrainConfig flags changed."""
    return dict(preset=preset, model=model or {}, train={**DEFAULT, **train})


RECIPES: dict[str, dict] = {
    # (a) a plain dense GPT-2-style model from our flags: multi-head attention, dense SwiGLU, tied embeddings,
    # AdamW, cosine
    "gpt2": dict(preset="tiny-dense", model=GPT2_ARCH, train=dict(lr=2e-3, **ADAMW, **COSINE)),
    # (b) today's tiny recipe (quickstart.sh): MLA + MoE, AdamW 3e-3, cosine to 3e-4
    "tiny-today": dict(preset="tiny", model={}, train=dict(lr=3e-3, **ADAMW, **COSINE)),
    # tiny + Muon + WSD with a 20% decay
    "tiny-muon-wsd": dict(preset="tiny", model={}, train={**MUON, **WSD}),
    # ablations: c without one part, or with one option more
    "tiny-muon": dict(preset="tiny", model={}, train={**MUON, **COSINE}),
    "tiny-wsd": dict(preset="tiny", model={}, train=dict(lr=3e-3, **ADAMW, **WSD)),
    "dense-muon-wsd": dict(preset="tiny-dense", model={}, train={**MUON, **WSD}),
    "dense-adamw": dict(preset="tiny-dense", model={}, train=dict(lr=3e-3, **ADAMW, **COSINE)),
    "gpt2-muon-wsd": dict(preset="tiny-dense", model=GPT2_ARCH, train={**MUON, **WSD}),
    "tiny-muon-wsd-zero": dict(preset="tiny", model=dict(zero_init_out=True), train={**MUON, **WSD}),
    "tiny-muon-wsd-qknorm": dict(preset="tiny", model=dict(qk_norm=True), train={**MUON, **WSD}),
    "tiny-muon-wsd-softcap": dict(preset="tiny", model=dict(logit_softcap=15.0), train={**MUON, **WSD}),
    "tiny-muon-wsd-drop": dict(preset="tiny", model=dict(dropout=0.1), train={**MUON, **WSD}),
    "tiny-muon-wsd-e16": dict(preset="tiny", model=dict(n_routed_experts=16, moe_inter_dim=64),
                              train={**MUON, **WSD}),
    "tiny-muon-wsd-bias001": dict(preset="tiny", model=dict(bias_update_speed=0.001), train={**MUON, **WSD}),
    # c without the embedding's own rate: Muon + WSD with a 40% decay
    "tiny-muon-wsd40": dict(preset="tiny", model={}, train={**MUON, **WSD, "decay_frac": 0.4}),
    "tiny-muon-wsd40-drop": dict(preset="tiny", model=dict(dropout=0.1), train={**MUON, **WSD, "decay_frac": 0.4}),
    # (c) the default recipe, TrainConfig's defaults at x1: Muon, AdamW for the head/norms/router at 0.6x the Muon
    # rate, the embedding at 1.5x, WSD with a 40% decay to 10%. It is tiny-muon-wsd40-emb10-head4 at x0.5.
    "default": dict(preset="tiny", model={}, train=DEFAULT),
    # the previous default: Muon + WSD 40% + the embedding at 10x lr (emb10), every AdamW group at 0.15x Muon's rate
    **{f"tiny-muon-wsd40-emb{k}": dict(preset="tiny", model={}, train={**MUON, **WSD, "decay_frac": 0.4,
                                                                         "embed_x": k}) for k in (3, 10, 30, 100)},
    "tiny-today-emb10": dict(preset="tiny", model={}, train=dict(lr=3e-3, **ADAMW, **COSINE, embed_x=10)),
    "dense-muon-wsd40-emb10": dict(preset="tiny-dense", model={}, train={**MUON, **WSD, "decay_frac": 0.4,
                                                                         "embed_x": 10}),
    # (c) decaying to zero instead of to 10% of the peak ("straight to zero"), zero-initialised output
    # projections, a 60% decay
    "tiny-muon-wsd40-emb10-d2z": dict(preset="tiny", model={}, train={**MUON, **WSD, "decay_frac": 0.4,
                                                                        "embed_x": 10, "min_lr_frac": 0.0}),
    "tiny-muon-wsd40-emb10-zero": dict(preset="tiny", model=dict(zero_init_out=True),
                                       train={**MUON, **WSD, "decay_frac": 0.4, "embed_x": 10}),
    "tiny-muon-wsd60-emb10": dict(preset="tiny", model={}, train={**MUON, **WSD, "decay_frac": 0.6,
                                                                    "embed_x": 10}),
    # (c) with the AdamW groups (head, norms, router) at 2x / 4x / 8x the rate, Muon and the embedding as in (c)
    **{f"tiny-muon-wsd40-emb10-head{k}": adamw_x(k) for k in (2, 4, 8)},
    # at 4x with Muon at 1.4x
    "tiny-muon-wsd40-emb10-head4-muon1.4": adamw_x(4, muon_lr=MUON["muon_lr"] * 1.4),
    # norms and router at 4x, the head and the embedding at the previous rates (0.15x and 1.5x Muon's)
    "tiny-muon-wsd40-emb10-norms4": adamw_x(4, head_x=1 / 4),
    # the many-epoch remedy for the higher AdamW rate: dropout 0.1
    "tiny-muon-wsd40-emb10-head4-drop": adamw_x(4, model=dict(dropout=0.1)),
    # MoE against dense with the AdamW groups at 4x
    "dense-muon-wsd40-emb10-head4": adamw_x(4, preset="tiny-dense"),
    # (c) with regularisers for the many-epoch regime: Muon weight decay, dropout
    **{f"default-mwd{wd}": default_with(muon_weight_decay=wd, muon_wd_per_epoch=0.0, **BEFORE_AWDP)
       for wd in (0.1, 0.3, 0.6, 1.0)},
    "default-drop0.1-mwd0.1": default_with(model=dict(dropout=0.1), muon_weight_decay=0.1, muon_wd_per_epoch=0.0,
                                           **BEFORE_AWDP),
    # (c) without the weight decay that grows with the passes over the data (the previous default), and with it
    # growing at other rates
    "default-nowd": default_with(muon_wd_per_epoch=0.0, **BEFORE_AWDP),
    # (wdp0.2 was the default before AdamW's weight decay grew too)
    **{f"default-wdp{k}": default_with(muon_wd_per_epoch=k, **BEFORE_AWDP) for k in (0.1, 0.2, 0.4)},
    # dropout 0.1 on top of it (dropout from the start: it did not help, so no dropout that starts as the data
    # repeats was kept)
    "default-wdp0.2-drop0.1": default_with(model=dict(dropout=0.1), muon_wd_per_epoch=0.2, **BEFORE_AWDP),
    # the previous default (AdamW groups at 0.15x Muon's rate) with the weight decay as the data repeats
    "tiny-muon-wsd40-emb10-wdp0.2": adamw_x(1, muon_wd_per_epoch=0.2),
    # (c) with more AdamW weight decay on the head and the router (the embedding keeps none), constant: Muon's
    # grows, AdamW's stayed at 0.1. Growing as Muon's (--wd_per_epoch 0.2, now the default) won: a constant 0.3
    # taxed the single pass (1.574 against 1.562)
    **{f"default-awd{wd}": default_with(weight_decay=wd, **BEFORE_AWDP) for wd in (0.3, 1.0)},
    # MoE against dense: our dense preset with the default recipe, and with the previous default
    "dense-default": default_with(preset="tiny-dense"),
    "dense-default-wdp0.2": default_with(preset="tiny-dense", **BEFORE_AWDP),
    # (c) with QK normalisation; with 16 experts of half the width, 4 active (DeepSeekMoE's finer experts, the
    # same active parameters)
    "tiny-muon-wsd40-emb10-qknorm": dict(preset="tiny", model=dict(qk_norm=True),
                                         train={**MUON, **WSD, "decay_frac": 0.4, "embed_x": 10}),
    "tiny-muon-wsd40-emb10-e16a4": dict(preset="tiny", model=dict(n_routed_experts=16, moe_inter_dim=64,
                                                                  n_activated_experts=4),
                                        train={**MUON, **WSD, "decay_frac": 0.4, "embed_x": 10}),
    # (a) with more AdamW weight decay: the same regularisation search as (c)'s Muon weight decay
    **{f"gpt2-wd{wd}": dict(preset="tiny-dense", model=GPT2_ARCH, train=dict(lr=2e-3, **ADAMW, **COSINE,
                                                                           weight_decay=wd)) for wd in (0.3, 1.0)},
    # ... and growing as the data repeats, as (c)'s does
    "gpt2-wdp0.2": dict(preset="tiny-dense", model=GPT2_ARCH, train=dict(lr=2e-3, **ADAMW, **COSINE, wd_per_epoch=0.2)),
    "gpt2-d2z": dict(preset="tiny-dense", model=GPT2_ARCH, train=dict(lr=2e-3, **ADAMW, **COSINE, min_lr_frac=0.0)),
    # MoE against dense: our dense preset with the default recipe
    "dense-muon-wsd40": dict(preset="tiny-dense", model={}, train={**MUON, **WSD, "decay_frac": 0.4}),
}


# ----------------------------------------------------------------------------------------------------------------
# Data


class _MainText(html.parser.HTMLParser):
    """The text of a Sphinx page's main body (<div role="main">), without scripts, styles or the navigation."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0          # nesting depth inside the main div (0 = outside)
        self.skip = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            if tag == "div":
                self.depth += 1
            if tag in ("script", "style"):
                self.skip += 1
            if tag in ("p", "div", "pre", "li", "h1", "h2", "h3", "h4", "dt", "dd", "tr", "br"):
                self.parts.append("\n")
        elif tag == "div" and ("role", "main") in attrs:
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            if tag == "div":
                self.depth -= 1
            if tag in ("script", "style"):
                self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.parts).replace("¶", "").splitlines()]
        out, blank = [], False
        for line in lines:
            if line:
                out.append(line)
                blank = False
            elif not blank and out:
                out.append("")
                blank = True
        return "\n".join(out).strip()


NOT_PROSE = ("genindex", "py-modindex", "modindex", "search", "contents")


def pydoc_documents() -> list[str]:
    root = PYDOC_HTML.resolve() if PYDOC_HTML.exists() else Path("/usr/share/doc/python3-doc/html").resolve()
    files = sorted(root.rglob("*.html"))
    if not files:
        raise SystemExit("the single-pass regime needs Python's HTML documentation: apt-get install python3-doc")
    docs = []
    for f in files:
        if f.stem.startswith(NOT_PROSE):   # index pages: one of them alone was 157k tokens of "name() (in module x)"
            continue
        parser = _MainText()
        parser.feed(f.read_text(encoding="utf-8", errors="replace"))
        text = parser.text()
        if len(text) >= 200:
            docs.append(text)
    return docs


DOCSTRING_PACKAGES = ("transformers", "torch", "numpy")


def package_docstrings() -> list[str]:
    """Distinct docstrings of at least 200 characters from the installed transformers, torch and numpy sources
    (the packages this project needs), files in sorted order."""
    import importlib.util

    import corpus

    seen: dict[str, None] = {}
    for package in DOCSTRING_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for file in sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.py")):
            if "test" in file.parent.name:
                continue
            for doc in corpus.file_docstrings(file, 200):
                seen.setdefault(doc)
    return list(seen)


def prepare(regime: str, work: Path) -> dict:
    """Tokenizer (4096 BPE trained on the built-in corpus, as the quickstart) and the regime's train/val tokens,
    cached in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        import train_tokenizer

        train_tokenizer.main(["--dataset_path_huggingface", "builtin", "--vocab_size", str(VOCAB),
                              "--tokenizer_train_shard_size", "3000000", "--output_path", str(tok_dir)])
    files = {s: work / f"{regime}_{s}.npy" for s in ("train", "val")}
    meta_file = work / f"{regime}_meta.json"
    if not meta_file.exists():
        import tokenizer as tokenizer_lib
        from corpus import builtin_corpus_documents

        tok = tokenizer_lib.load_trained_tokenizer(tok_dir)
        docs = list(builtin_corpus_documents()) if regime == "epochs" else pydoc_documents() + package_docstrings()
        order = list(range(len(docs)))
        random.Random(0).shuffle(order)
        n_val = int(len(docs) * (0.1 if regime == "epochs" else 0.02))
        split = {"val": order[:n_val], "train": sorted(order[n_val:])}
        if regime == "single":  # one pass: the training documents in a random order
            split["train"] = order[n_val:]
        meta = {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint}
        for name, idx in split.items():
            texts = [docs[i] for i in idx]
            ids = tok.encode_batch(texts)
            stream = np.concatenate([np.array([tok.bos_id, *x, tok.eos_id], dtype=np.uint16) for x in ids])
            np.save(files[name], stream)
            meta[name] = {"documents": len(texts), "tokens": int(stream.size),
                          "bytes": sum(len(t.encode("utf-8")) for t in texts)}
        meta_file.write_text(json.dumps(meta, indent=1))
    meta = json.loads(meta_file.read_text())
    return {"meta": meta, "train": str(files["train"]), "val": str(files["val"])}


# ----------------------------------------------------------------------------------------------------------------
# One run


def recipe_config(name: str, lr_mult: float, steps: int, vocab: int):
    r = RECIPES[name]
    train = {**r["train"]}
    train["lr"] = train["lr"] * lr_mult
    # the embedding's rate as a multiple of lr; 0 (it follows lr) unless the recipe names one
    train["embed_lr"] = train["lr"] * train.pop("embed_x", 0)
    train["head_lr"] = train["lr"] * train.pop("head_x", 0)
    min_lr = train["lr"] * train.pop("min_lr_frac", BASE["min_lr_frac"])
    if "muon_lr" in train:
        train["muon_lr"] = train["muon_lr"] * lr_mult
    cfg = TrainConfig(steps=steps, warm_up=min(BASE["warm_up"], max(steps // 10, 1)),
                      min_lr=min_lr, weight_decay=train.pop("weight_decay", BASE["weight_decay"]),
                      wd_per_epoch=train.pop("wd_per_epoch", BASE["wd_per_epoch"]),
                      grad_clip=BASE["grad_clip"], batch_size=BATCH, total_batch_size=BATCH * SEQ_LEN, seq_len=SEQ_LEN,
                      **train)
    args = model_args_from_preset(r["preset"], vocab_size=vocab, **r["model"])
    return cfg, args


def build(cfg, args, device: torch.device, seed: int):
    from train import build_model

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = build_model(args, device)
    model.train()
    return model, build_optimizer(model, cfg, device)


def train_step(model, optimizer, cfg, step: int, x: torch.Tensor, y: torch.Tensor, train_tokens: int = 0) -> float:
    """train.py's optimizer step (one micro-batch: grad_accum is 1 at this batch size)."""
    set_schedule(optimizer, step, cfg, train_tokens)
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_balance_bias()
    return loss.item()


class Windows:
    """Shuffled non-overlapping windows of seq_len + 1 tokens; a new seeded order every epoch."""

    def __init__(self, tokens: np.ndarray, seed: int, shuffle: bool) -> None:
        self.tokens, self.seed, self.shuffle = tokens, seed, shuffle
        self.n = (len(tokens) - 1) // SEQ_LEN
        self.epoch, self.pos, self.order = 0, 0, self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(BATCH):
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            start = int(self.order[self.pos]) * SEQ_LEN
            rows.append(self.tokens[start:start + SEQ_LEN + 1].astype(np.int64))
            self.pos += 1
        xy = torch.from_numpy(np.stack(rows)).to(device)
        return xy[:, :-1], xy[:, 1:]


def val_windows(val: np.ndarray, max_tokens: int) -> np.ndarray:
    """[n, SEQ_LEN + 1] windows of the validation split: all of them, or at most max_tokens // SEQ_LEN spread evenly
    over the whole split (a token-weighted sample of every document, never one long document's prefix)."""
    n = (len(val) - 1) // SEQ_LEN
    picked = np.unique(np.linspace(0, n - 1, min(n, max(1, max_tokens // SEQ_LEN))).round().astype(np.int64))
    return np.stack([val[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1] for i in picked]).astype(np.int64)


@torch.no_grad()
def val_bpb(model, windows: np.ndarray, bytes_per_token: float, device) -> float:
    """Mean loss over the windows / ln 2 / the whole split's bytes per token: the windows are an even sample of the
    split's tokens, so this estimates the split's bits over its bytes."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), 32):
        xy = torch.from_numpy(windows[start:start + 32]).to(device)
        loss = model(xy[:, :-1], xy[:, 1:])
        total += loss.item() * xy[:, 1:].numel()
        count += xy[:, 1:].numel()
    model.train()
    return total / count / math.log(2) / bytes_per_token


def step_costs(names: list[str], vocab: int, train_tokens: np.ndarray, rounds: int = 10, skip: int = 3
               ) -> dict[str, float]:
    """CPU seconds (one thread, process_time) of one optimizer step of each recipe: all recipes are stepped in
    alternating rounds (so machine load hits them alike), median over the rounds after warm-up."""
    torch.set_num_threads(1)
    runs = {}
    for name in names:
        cfg, args = recipe_config(name, 1.0, 1000, vocab)
        runs[name] = (cfg, *build(cfg, args, torch.device("cpu"), 0))
    data = Windows(train_tokens, 0, True)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(1, rounds + 1):
        x, y = data.batch("cpu")
        for name, (cfg, model, optimizer) in runs.items():
            t0 = time.process_time()
            train_step(model, optimizer, cfg, step, x, y)
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(t[skip:]) for name, t in times.items()}


def run_one(job: dict) -> dict:
    """Train one (recipe, lr multiplier, seed) for the budget's steps; returns the results row (with `error` and
    NaN results when the run failed, so that one failure does not end the others)."""
    try:
        return _run_one(job)
    except Exception as error:  # noqa: BLE001 - reported in the row
        return {**{k: job[k] for k in ("regime", "budget", "recipe", "lr_mult", "seed", "steps", "step_cost")},
                "lr": float("nan"), "muon_lr": None, "final_bpb": float("nan"), "best_bpb": float("nan"),
                "best_step": 0, "curve": [], "train_loss": float("nan"), "epochs": 0.0, "cpu_s": 0.0,
                "wall_s": 0.0, "device": job["device"], "error": f"{type(error).__name__}: {error}"}


def _run_one(job: dict) -> dict:
    torch.set_num_threads(job.get("threads", 1))
    device = torch.device(job["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 as on the CPU
        torch.backends.cudnn.allow_tf32 = False
    train_tokens = np.load(job["train"])
    val = val_windows(np.load(job["val"]), job["val_tokens"])
    cfg, args = recipe_config(job["recipe"], job["lr_mult"], job["steps"], job["vocab"])
    passes = passes_before(cfg.steps + 1, cfg, len(train_tokens))
    model, optimizer = build(cfg, args, device, job["seed"])
    data = Windows(train_tokens, job["seed"], shuffle=job.get("shuffle", True))
    evals = sorted({max(1, round(job["steps"] * k / 10)) for k in range(1, 11)})
    curve, loss, cpu, t_wall = [], float("nan"), 0.0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = data.batch(device)
        c0 = time.process_time()
        loss = train_step(model, optimizer, cfg, step, x, y, len(train_tokens))
        cpu += time.process_time() - c0
        if not math.isfinite(loss):
            break
        if step in evals:
            curve.append((step, val_bpb(model, val, job["bytes_per_token"], device)))
    final = curve[-1][1] if curve and curve[-1][0] == cfg.steps else float("nan")
    last = passes_before(cfg.steps, cfg, len(train_tokens))    # the passes made before the last step
    best = min((b for _, b in curve), default=float("nan"))
    return {**{k: job[k] for k in ("regime", "budget", "recipe", "lr_mult", "seed", "steps", "step_cost")},
            "lr": cfg.lr, "muon_lr": cfg.muon_lr if cfg.optimizer == "muon" else None, "final_bpb": final,
            "best_bpb": best, "best_step": min(curve, key=lambda c: c[1])[0] if curve else 0, "curve": curve,
            "train_loss": loss, "epochs": passes, "cpu_s": cpu,
            "wall_s": time.perf_counter() - t_wall, "device": job["device"], "shuffle": job.get("shuffle", True),
            "final_muon_weight_decay": (repeat_weight_decay(cfg, last) if cfg.optimizer == "muon" else None),
            "final_weight_decay": repeat_weight_decay(cfg, last, muon=False)}


# ----------------------------------------------------------------------------------------------------------------
# Report


def report(rows: list[dict]) -> str:
    """Per regime and budget: each recipe's best LR multiplier (by mean final bpb over seeds), its final and best
    bpb (mean over seeds, +- spread), and the ratio to the gpt2 baseline."""
    out = []
    keys = sorted({(r["regime"], r["budget"]) for r in rows})
    for regime, budget in keys:
        sel = [r for r in rows if r["regime"] == regime and r["budget"] == budget]
        table = {}
        for name in dict.fromkeys(r["recipe"] for r in sel):
            runs = [r for r in sel if r["recipe"] == name]
            by_mult = {}
            for r in runs:
                by_mult.setdefault(r["lr_mult"], []).append(r)
            scored = {m: statistics.mean(x["final_bpb"] if math.isfinite(x["final_bpb"]) else 99 for x in rs)
                      for m, rs in by_mult.items()}
            m = min(scored, key=scored.get)
            rs = by_mult[m]
            table[name] = dict(mult=m, n_lr=len(by_mult), n_runs=len(runs), seeds=len(rs), lr=rs[0]["lr"],
                               muon_lr=rs[0]["muon_lr"], final=statistics.mean(x["final_bpb"] for x in rs),
                               best=statistics.mean(x["best_bpb"] for x in rs),
                               spread=(max(x["final_bpb"] for x in rs) - min(x["final_bpb"] for x in rs)),
                               steps=rs[0]["steps"], epochs=rs[0]["epochs"], cost=rs[0]["step_cost"])
        base = table.get("gpt2", {}).get("final")
        out.append(f"\n## regime {regime}, budget {budget:g} CPU-s (one thread)\n")
        out.append("| recipe | LRs tried | runs | best lr (muon_lr) | steps | epochs | s/step | final bpb | "
                   "best bpb | vs gpt2 |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, t in sorted(table.items(), key=lambda kv: kv[1]["final"]):
            lr = f"{t['lr']:.2g}" + (f" ({t['muon_lr']:.2g})" if t["muon_lr"] else "")
            ratio = f"{t['final'] / base - 1:+.1%}" if base else "-"
            spread = f" ±{t['spread'] / 2:.3f}" if t["seeds"] > 1 else ""
            out.append(f"| {name} | {t['n_lr']} | {t['n_runs']} | {lr} | {t['steps']} | {t['epochs']:.2f} | "
                       f"{t['cost']:.3f} | {t['final']:.4f}{spread} | {t['best']:.4f} | {ratio} |")
    return "\n".join(out)


def above(minimum: float, kind: type = float, inclusive: bool = False):
    """An argparse type: a number of `kind` above `minimum` (or at least it), else a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if not (value >= minimum if inclusive else value > minimum) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", default="epochs", choices=("epochs", "single"))
    parser.add_argument("--budget", type=above(0), nargs="+", default=[180.0], help="CPU seconds per run (one thread)")
    parser.add_argument("--recipes", default="gpt2,tiny-today,default")
    parser.add_argument("--lr_mults", default="1", help="LR search: multipliers of each recipe's rates")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=above(1, int, inclusive=True), default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--val_tokens", type=above(1, int, inclusive=True), default=131072)
    parser.add_argument("--work_dir", default=str(ROOT / "bench_learning_data"))
    parser.add_argument("--out", default="", help="append each run's results as a JSON line here")
    parser.add_argument("--step_costs", default="", help="JSON of CPU seconds per step per recipe: read when it "
                                                         "exists, else measured here and written")
    parser.add_argument("--calibrate_only", action="store_true")
    parser.add_argument("--then_budget", type=above(0, inclusive=True), default=0, help="after the runs: run --then_recipes at this "
                        "budget with each one's best LR multiplier of the first runs (and half of it), --then_seeds")
    parser.add_argument("--then_recipes", default="gpt2,tiny-today,default")
    parser.add_argument("--then_seeds", default="1,2")
    parser.add_argument("--report", default="", help="print the table of this results file and exit")
    parser.add_argument("--jobs_file", default="", help="JSON list of [regime, budget, recipe, lr_mult, seed] "
                                                        "instead of the product of the flags")
    opts = parser.parse_args()
    if opts.report:
        print(report([json.loads(line) for line in Path(opts.report).read_text().splitlines() if line.strip()]))
        return

    if opts.jobs_file:
        plan = [tuple(j) for j in json.loads(Path(opts.jobs_file).read_text())]
    else:
        plan = [(opts.regime, b, name, float(m), int(s)) for b in opts.budget for name in opts.recipes.split(",")
                for m in opts.lr_mults.split(",") for s in opts.seeds.split(",")]
    unknown = sorted({p[2] for p in plan} - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    work = Path(opts.work_dir)
    data = {regime: prepare(regime, work) for regime in sorted({p[0] for p in plan})}
    vocab = next(iter(data.values()))["meta"]["vocab_size"]

    costs = {}
    cost_file = Path(opts.step_costs) if opts.step_costs else None
    if cost_file is not None and cost_file.exists():
        costs = json.loads(cost_file.read_text())
    missing = sorted({p[2] for p in plan} - set(costs))
    if missing:
        any_train = np.load(next(iter(data.values()))["train"])
        print(f"measuring the step cost of {len(missing)} recipes (one thread, alternating rounds); load average "
              f"{os.getloadavg()}", flush=True)
        costs.update(step_costs(missing, vocab, any_train))
        for name in missing:
            print(f"step cost {name}: {costs[name]:.3f} CPU-s", flush=True)
        if cost_file is not None:
            cost_file.write_text(json.dumps(costs, indent=1, sort_keys=True))
    if opts.calibrate_only:
        return

    rows = run_plan(plan, data, costs, vocab, opts)
    if opts.then_budget:
        best = {}
        for regime, name in {(r["regime"], r["recipe"]) for r in rows}:
            mine = [r for r in rows if r["regime"] == regime and r["recipe"] == name]
            best[regime, name] = min(mine, key=lambda r: r["final_bpb"] if math.isfinite(r["final_bpb"]) else 99)
        then = []
        for (regime, name), r in sorted(best.items()):
            if name not in opts.then_recipes.split(","):
                continue
            seeds = [int(x) for x in opts.then_seeds.split(",")]
            then += [(regime, opts.then_budget, name, r["lr_mult"], s) for s in seeds]
            then += [(regime, opts.then_budget, name, r["lr_mult"] / 2, seeds[0])]
        rows += run_plan(then, data, costs, vocab, opts)
    print(report(rows))
    print(f"load average at the end {os.getloadavg()}")


def run_plan(plan, data, costs, vocab, opts) -> list[dict]:
    jobs = []
    for regime, budget, name, mult, seed in plan:
        d = data[regime]
        meta = d["meta"]
        val_tokens = min(opts.val_tokens, meta["val"]["tokens"] - 1)
        jobs.append(dict(regime=regime, budget=budget, recipe=name, lr_mult=mult, seed=seed,
                         steps=max(1, int(budget / costs[name])), step_cost=costs[name], device=opts.device,
                         train=d["train"], val=d["val"], val_tokens=val_tokens, vocab=vocab,
                         bytes_per_token=meta["val"]["bytes"] / meta["val"]["tokens"]))
    print(f"{len(jobs)} runs, {opts.jobs} at a time on {opts.device}; load average {os.getloadavg()}", flush=True)
    rows = []
    out = open(opts.out, "a", buffering=1) if opts.out else None
    if opts.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(opts.jobs) as pool:
            for row in pool.imap_unordered(run_one, jobs):
                rows.append(row)
                _emit(row, out)
    else:
        for job in jobs:
            row = run_one(job)
            rows.append(row)
            _emit(row, out)
    if out is not None:
        out.close()
    return rows


def _emit(row: dict, out) -> None:
    print(f"{row['regime']} {row['budget']:g} {row['recipe']} x{row['lr_mult']:g} seed {row['seed']}: "
          f"{row['steps']} steps, final {row['final_bpb']:.4f} best {row['best_bpb']:.4f} bpb "
          f"({row['cpu_s']:.0f} CPU-s, {row['wall_s']:.0f} s){' ' + row['error'] if 'error' in row else ''}",
          flush=True)
    if out is not None:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
