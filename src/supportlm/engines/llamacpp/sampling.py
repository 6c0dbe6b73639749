"""Sampling on llama.cpp's logits, as transformers' logits processors and warpers do it.

Decoding follows the transformers engine (greedy at temperature 0, repetition penalty over prompt
and reply, temperature + top-p otherwise), so both backends pick the same tokens.
"""

from __future__ import annotations

import numpy as np

#: Candidates kept before the nucleus cut; a full sort of the vocabulary costs milliseconds.
_TOP_P_CANDIDATES = 256


def apply_repetition_penalty(logits: np.ndarray, token_ids: np.ndarray, penalty: float) -> None:
    """transformers' `RepetitionPenaltyLogitsProcessor`, in place, over prompt and reply ids."""
    if penalty == 1.0 or token_ids.size == 0:
        return
    scores = logits[token_ids]
    logits[token_ids] = np.where(scores < 0, scores * penalty, scores / penalty)


def sample_top_p(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """Temperature then nucleus (top-p) sampling, as transformers' warpers do it."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    k = min(_TOP_P_CANDIDATES, probs.size)
    candidates = np.argpartition(probs, -k)[-k:]
    if probs[candidates].sum() < top_p:  # a flat distribution: the nucleus needs the full sort
        candidates = np.arange(probs.size)
    order = candidates[np.argsort(probs[candidates])[::-1]]
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]  # always at least one token
    kept = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=kept))
