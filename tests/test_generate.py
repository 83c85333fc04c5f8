"""generate.py: sampling filters against explicit references, cached greedy decoding against full recomputation
(dense and MoE, a batch of left-padded prompts of different lengths), determinism, and the CLI's one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from generate import sample_next, top_k_filter, top_p_filter


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


def test_top_p_filter_keeps_exactly_the_nucleus():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        vocab = int(rng.integers(2, 60))
        p = float(rng.uniform(0.05, 0.99))
        logits = random_logits(rng, 1, vocab)[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if not _far_from_boundary(probs, p):
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
        vocab = int(rng.integers(5, 40))
        p = float(rng.uniform(0.3, 0.95))
        logits = random_logits(rng, 1, vocab)[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if not _far_from_boundary(probs, p, 1e-3):
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
    logits = torch.randn(16, 100)
    a = sample_next(logits, temperature=0.0, top_p=0.5, top_k=3, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, temperature=0.0, top_p=0.5, top_k=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(a, b)


def test_same_seed_same_draws():
    logits = torch.randn(8, 300)
    a = sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
