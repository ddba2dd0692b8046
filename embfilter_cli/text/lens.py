"""Logit-lens arithmetic: the top tokens a hidden-space vector writes through W_U.

For vectors x (columns of X, d×n) the logits are W_U·x (V per vector). Only the top k are ever
kept: W_U is streamed in row chunks, each chunk's top k are merged into a running top k, so the
full V×n logit matrix never exists (W_U may be a memory-mapped bf16 tensor with 150k+ rows).
Rows at or past `valid_rows` (padding rows that no tokenizer emits) are never candidates.

Uses: a pooled text embedding before and after a filter (after = W_U·Pᵀ·(P·e − m): the filter's
output, centred when the filter has a mean m, written back in hidden space; without a mean this is
W_U·Pᵀ·P·e, the part of e the filter keeps), and singular directions at both signs (+v and −v,
since the sign of a singular vector is arbitrary). `zipf_summary` averages word frequencies of
the top tokens of groups of directions.

Not handled: logit soft-capping or biases of special heads (Gemma-2's final soft-cap is monotone,
so it does not change which tokens are on top; an lm_head bias would).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 24  # W_U elements upcast at once (64 MiB of float32)


@dataclass
class TopK:
    """The k largest logits per vector: ids and values, (n, k) each, best first."""

    indices: np.ndarray  # int64
    values: np.ndarray  # float32


def top_tokens(
    matrix: torch.Tensor,
    vectors: np.ndarray | torch.Tensor,
    k: int,
    *,
    valid_rows: int | None = None,
    largest: bool = True,
    chunk_rows: int | None = None,
) -> TopK:
    """Top-k (or bottom-k) of W_U·x for each row x of `vectors` (n, d), streamed over W_U rows.

    Args:
        matrix: W_U, (V, d), any floating dtype; upcast to float32 one chunk at a time.
        vectors: (n, d) or (d,) hidden-space vectors.
        k: tokens per vector (clipped to the number of candidate rows).
        valid_rows: only rows [0, valid_rows) are candidates (masks padding rows).
        largest: False returns the most negative logits instead (i.e. the top tokens of −x,
            with their logits still reported for +x).
        chunk_rows: rows per chunk; default keeps a chunk near CHUNK_ELEMENTS elements.
    """
    return _stream_topk(matrix, vectors, k, valid_rows, chunk_rows, (largest,))[0]


def _stream_topk(
    matrix: torch.Tensor,
    vectors: np.ndarray | torch.Tensor,
    k: int,
    valid_rows: int | None,
    chunk_rows: int | None,
    modes: tuple[bool, ...],
) -> list[TopK]:
    """One pass over W_U keeping a running top-k per mode (True = largest, False = smallest)."""
    x = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    x = x.to(torch.float32)
    if x.ndim == 1:
        x = x[None, :]
    rows, d = matrix.shape
    if x.shape[1] != d:
        raise ValueError(f"vectors have dimension {x.shape[1]} but W_U has {d} columns")
    limit = rows if valid_rows is None else max(0, min(rows, valid_rows))
    k = min(k, limit)
    n = x.shape[0]
    if k <= 0 or n == 0:
        k = max(k, 0)
        return [TopK(np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)) for _ in modes]
    step = chunk_rows or max(1024, CHUNK_ELEMENTS // max(d, 1))
    xt = x.T.contiguous()  # (d, n)
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(modes)
    with torch.no_grad():
        for row0 in range(0, limit, step):
            row1 = min(limit, row0 + step)
            logits = matrix[row0:row1].to(torch.float32) @ xt  # (c, n): only this chunk's logits exist
            for m, largest in enumerate(modes):
                vals, idx = torch.topk(logits, min(k, row1 - row0), dim=0, largest=largest)
                idx = idx + row0
                prev = best[m]
                if prev is not None:
                    vals, idx = torch.cat([prev[0], vals], 0), torch.cat([prev[1], idx], 0)
                    vals, pos = torch.topk(vals, k, dim=0, largest=largest)
                    idx = torch.gather(idx, 0, pos)
                best[m] = (vals, idx)
    out = []
    for entry in best:
        assert entry is not None
        vals, idx = entry
        out.append(TopK(idx.T.contiguous().numpy().astype(np.int64), vals.T.contiguous().numpy()))
    return out


def filtered_in_hidden_space(
    embeddings: np.ndarray, projection: np.ndarray, mean: np.ndarray | None = None
) -> np.ndarray:
    """Pᵀ·(P·e − m) for each row e: the filter's output expressed back in the hidden space.

    Without a mean this is Pᵀ·P·e, what the filter keeps of e. With a mean m (a centred filter,
    y = P·x − m) the background's mean is taken out too: since logits are linear, the lens of the
    result is W_U·Pᵀ·P·e − W_U·Pᵀ·m, the text's kept logits minus those of the average background
    text, so it shows what sets this text apart rather than what every text shares.

    Works for both artifact kinds: a reduced P (k×d, orthonormal rows) and a d×d projector
    I − V_e V_eᵀ (symmetric and idempotent, so PᵀP = P, and Pᵀ·m = m for a mean of projected vectors).
    """
    p = np.asarray(projection, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    if e.shape[-1] != p.shape[1]:
        raise ValueError(f"embeddings have dimension {e.shape[-1]} but the projection expects {p.shape[1]}")
    y = e @ p.T
    if mean is not None:
        y = y - np.asarray(mean, dtype=np.float64)
    return y @ p


@dataclass
class LensResult:
    """Top tokens of W_U·e before and (optionally) after a filter, for n embeddings."""

    before: TopK
    after: TopK | None


def lens_embeddings(
    matrix: torch.Tensor,
    embeddings: np.ndarray,
    k: int,
    *,
    projection: np.ndarray | None = None,
    mean: np.ndarray | None = None,
    valid_rows: int | None = None,
) -> LensResult:
    """The logit lens on pooled embeddings (n, d), and on their filtered version when given P (and m)."""
    before = top_tokens(matrix, embeddings, k, valid_rows=valid_rows)
    after = None
    if projection is not None:
        kept = filtered_in_hidden_space(embeddings, projection, mean).astype(np.float32)
        after = top_tokens(matrix, kept, k, valid_rows=valid_rows)
    return LensResult(before, after)


@dataclass
class DirectionTokens:
    """Top tokens of W_U·v (positive) and of W_U·(−v) (negative) for n directions."""

    positive: TopK
    negative: TopK  # values reported as logits of −v, so they are positive too


def direction_tokens(
    matrix: torch.Tensor, directions: np.ndarray, k: int, *, valid_rows: int | None = None
) -> DirectionTokens:
    """Both signs of each direction (rows of `directions`, (n, d))."""
    pos, neg = _stream_topk(matrix, directions, k, valid_rows, None, (True, False))
    return DirectionTokens(pos, TopK(neg.indices, -neg.values))


def evenly_spaced(indices: Sequence[int], limit: int) -> list[int]:
    """At most `limit` of `indices`, evenly spread and always including the first and last."""
    items = list(indices)
    if limit <= 0 or len(items) <= limit:
        return items
    if limit == 1:
        return [items[0]]
    picks = np.round(np.linspace(0, len(items) - 1, limit)).astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


@dataclass
class ZipfStats:
    """Word frequency of a set of tokens: how many are words, and their mean Zipf value."""

    tokens: int
    words: int
    mean_zipf: float | None  # over the words; None when there are none

    def as_dict(self) -> dict[str, float | int | None]:
        """The statistics as a JSON-ready dict (means rounded to 4 digits)."""
        return {
            "tokens": self.tokens,
            "words": self.words,
            "mean_zipf": None if self.mean_zipf is None else round(self.mean_zipf, 4),
        }


def zipf_stats(
    token_ids: Iterable[int], word_of: Callable[[int], str | None], zipf: Callable[[str], float]
) -> ZipfStats:
    """Mean Zipf frequency over the tokens that are words (non-words are counted, not averaged).

    A word missing from the frequency list counts as 0.0 (wordfreq's convention): a fragment
    such as `ization` is a real, rare string, and leaving it out would flatter the average.
    """
    values: list[float] = []
    total = 0
    for token_id in token_ids:
        total += 1
        word = word_of(int(token_id))
        if word is not None:
            values.append(float(zipf(word)))
    return ZipfStats(total, len(values), float(np.mean(values)) if values else None)


def summarize_directions(per_direction: Sequence[tuple[ZipfStats, ZipfStats]]) -> dict[str, float | int | None]:
    """Band-group summary from each direction's (positive-sign, negative-sign) Zipf stats.

    `mean_zipf` pools the word tokens of both signs. Because the sign of a singular vector is
    arbitrary, `mean_zipf_frequent_sign` is also given: per direction the mean Zipf of whichever
    sign writes more frequent words, averaged over directions (a direction whose top tokens are
    all non-words is left out of it).
    """
    tokens = sum(p.tokens + n.tokens for p, n in per_direction)
    words = sum(p.words + n.words for p, n in per_direction)
    total = sum((p.mean_zipf or 0.0) * p.words + (n.mean_zipf or 0.0) * n.words for p, n in per_direction)
    sides = [
        max(z for z in (p.mean_zipf, n.mean_zipf) if z is not None)
        for p, n in per_direction
        if p.mean_zipf is not None or n.mean_zipf is not None
    ]
    return {
        "tokens": tokens,
        "words": words,
        "mean_zipf": round(total / words, 4) if words else None,
        "mean_zipf_frequent_sign": round(float(np.mean(sides)), 4) if sides else None,
    }
