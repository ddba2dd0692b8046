"""Self-centring choices on Lee (issue 17): which self-generated background makes the best mean?

Usage: nice python -m bench.bench_self_center [--work DIR] [--threads N] [--table-only]

Runs the built-in SmolLM2-135M once: embeds the 50 Lee documents (mean pooling; last token with
the PromptEOL recipe), samples texts with `text.self_samples.sample_token_ids` for each arm and
seed, embeds them with the same pooling/recipe, and prints Spearman on Lee for the default
`--band auto` filter centred on each candidate mean (mean over seeds, then min–max). Every model
output is kept under --work, so an interrupted run resumes and `--table-only` reprints the table
from what is there. Arms (all from one model load):

  A  bos    T=1.0  96 samples × 64 tokens, seed 0 (the issue's sampler). Each sample has its own
     generator, so A splits into 4 independent disjoint draws of 24. Derived from A without new
     samples: the 16-token prefixes, 64- and 16-token texts mixed, a mix with one-token vocabulary
     texts, projecting off the mean direction instead of subtracting it;
  B  bos    T=0.7  24 × 64, seeds 0-2     C  "<|endoftext|>" start  T=1.0  24 × 64, seeds 0-2
     (compare with A's draws of 24).

Not measured here (quoted from /work/shared/EMBEDFILTER.md): the lee_background in-domain mean.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ARMS = {  # name: (start, temperature, count, new_tokens)
    "A": ("bos", 1.0, 96, 64),
    "B": ("bos", 0.7, 24, 64),
    "C": ("<|endoftext|>", 1.0, 24, 64),
}
SEEDS = (0, 1, 2)
RECIPES = (("mean", "none"), ("last", "prompteol"))
VOCAB_TEXTS = 512


class Work:
    """The bench's model, data and on-disk results (every expensive output is saved as it is made)."""

    def __init__(self, folder: Path, threads: int, table_only: bool) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.table_only = table_only
        self.threads = threads
        self._lm = self._encoder = None

    def model(self):
        if self._lm is None:
            import torch

            from embfilter_cli.model.locate import resolve_model
            from embfilter_cli.text.self_samples import load_generator_at

            torch.set_num_threads(self.threads)
            self._lm, self._encoder = load_generator_at(resolve_model(None), device="cpu", dtype="float32")
        return self._lm, self._encoder

    def cached(self, name: str, make):
        path = self.folder / name
        if path.exists():
            return np.load(path) if name.endswith(".npy") else json.loads(path.read_text())
        if self.table_only:
            return None
        started = time.perf_counter()
        value = make()
        tmp = path.with_suffix(".tmp")
        if name.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, value)
        else:
            tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
        print(f"  {name}: {time.perf_counter() - started:.0f}s", flush=True)
        return value

    def embed(self, name: str, texts: list[str], pooling: str, recipe: str) -> np.ndarray | None:
        def make() -> np.ndarray:
            return self.model()[1].embed(texts, pooling=pooling, recipe=recipe, batch_size=16, max_length=512)

        return self.cached(f"{name}-{pooling}-{recipe}.npy", make)

    def samples(self, arm: str, seed: int) -> list[list[int]] | None:
        from embfilter_cli.text.self_samples import SelfSampling, sample_token_ids, start_ids, stop_ids

        start, temperature, count, tokens = ARMS[arm]

        def make() -> list[list[int]]:
            lm, encoder = self.model()
            tok = encoder.tokenizer
            first = start_ids(tok, "bos", "model") if start == "bos" else tok(start)["input_ids"]
            sampling = SelfSampling(count=count, new_tokens=tokens, temperature=temperature, seed=seed)
            return sample_token_ids(lm, first, sampling, vocab_size=len(tok), stops=stop_ids(tok, lm))

        return self.cached(f"ids-{arm}-{seed}.json", make)


def texts_of(work: Work, ids: list[list[int]], keep: int | None = None) -> list[str]:
    from embfilter_cli.text.self_samples import decode_samples

    return decode_samples(work.model()[1].tokenizer, [s[:keep] if keep else s for s in ids])


def spearman_of(lee: np.ndarray, projection: np.ndarray, data, mean=None, mode="subtract") -> float:
    from embfilter_cli.text.evaluation import score_vectors

    y = lee.astype(np.float64) @ projection.T
    if mean is not None:
        if mode == "subtract":
            y = y - mean
        else:  # project off the mean's direction
            unit = mean / np.linalg.norm(mean)
            y = y - np.outer(y @ unit, unit)
    return score_vectors(y, data)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/embfilter-bench-self"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    from bench._common import describe_machine
    from embfilter_cli.filters.band_auto import auto_band
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.text.cache import Cache, cached_head_spectrum
    from embfilter_cli.text.datasets import load_dataset

    work = Work(args.work, args.threads, args.table_only)
    data = load_dataset("lee")
    _, spectrum, _ = cached_head_spectrum(resolve_model(None), Cache())
    assert spectrum is not None
    band = auto_band(spectrum.singular_values).band
    projection = spectrum.vectors[:, band.start : band.stop].T.astype(np.float64)
    print(describe_machine(), f"torch threads {args.threads}", time.strftime("%Y-%m-%d"), flush=True)
    lee = {r: work.embed("lee", data.texts, *r) for r in RECIPES}
    # Order: the main arm first, so a short run already answers the main questions. A has one seed:
    # its 96 independent samples split into disjoint draws (see print_table).
    jobs = [("A", 0)] + [(a, s) for s in SEEDS for a in ("B", "C")]
    vectors: dict[tuple[str, int, str, tuple[str, str]], np.ndarray | None] = {}
    for arm, seed in jobs:
        ids = work.samples(arm, seed)
        if ids is None:
            continue
        variants = {"": None, "-16tok": 16} if arm == "A" else {"": None}
        for suffix, keep in variants.items():
            texts = texts_of(work, ids, keep)
            for r in RECIPES:
                vectors[(arm + suffix, seed, "", r)] = work.embed(f"self-{arm}{suffix}-{seed}", texts, *r)
    rng = np.random.default_rng(0)
    vocab_ids = sorted(rng.choice(np.arange(3, 49152), size=VOCAB_TEXTS, replace=False).tolist())
    vocab: list[str] | None = None
    for r in RECIPES:
        name = f"vocab-{r[0]}-{r[1]}.npy"
        if (args.work / name).exists() or not args.table_only:
            if vocab is None:
                tok = work.model()[1].tokenizer
                vocab = [t for t in (tok.decode([i]) for i in vocab_ids) if t.strip()]
            vectors[("vocab", 0, "", r)] = work.embed("vocab", vocab, *r)
    print_table(vectors, lee, projection, data)


def print_table(vectors, lee, projection, data) -> None:
    """One row per candidate mean: Spearman on Lee per recipe, mean over draws and (min–max, n draws).

    The samples of one seed are independent (each has its own generator), so A's 96 samples split
    into 4 disjoint draws of 24: the comparator for B and C (3 seeds × 24 each).
    """
    rows: list[tuple[str, dict[tuple[str, str], list[float]]]] = []

    def filtered(arm: str, seed: int, r) -> np.ndarray | None:
        v = vectors.get((arm, seed, "", r))
        return None if v is None else v.astype(np.float64) @ projection.T

    def draws(arm: str, r, size: int | None) -> list[np.ndarray]:
        if arm in ("A", "A-16tok"):
            y = filtered(arm, 0, r)
            if y is None:
                return []
            size = size or len(y)
            return [y[i * size : (i + 1) * size] for i in range(len(y) // size)]
        return [y for seed in SEEDS if (y := filtered(arm, seed, r)) is not None]

    def add(label: str, arm: str, size: int | None = None, mode: str = "subtract", how=None) -> None:
        scores: dict[tuple[str, str], list[float]] = {}
        for r in RECIPES:
            for y in draws(arm, r, size):
                mean = how(y, r) if how else y.mean(axis=0)
                if mean is not None and lee[r] is not None:
                    scores.setdefault(r, []).append(spearman_of(lee[r], projection, data, mean, mode))
        rows.append((label, scores))

    def with_short(y: np.ndarray, r) -> np.ndarray | None:
        short = filtered("A-16tok", 0, r)  # the same samples' 16-token prefixes (equal-size draws)
        if short is None:
            return None
        rows = [i for i in range(len(short)) if any(np.array_equal(y[0], row) for row in [filtered("A", 0, r)[i]])]
        start = rows[0] if rows else 0
        return 0.5 * y.mean(axis=0) + 0.5 * short[start : start + len(y)].mean(axis=0)

    def mixed(y: np.ndarray, r, share: float = 0.5) -> np.ndarray | None:
        v = vectors.get(("vocab", 0, "", r))
        return None if v is None else (1 - share) * y.mean(axis=0) + share * (v @ projection.T).mean(axis=0)

    add("A: BOS, T=1, 96 × 64 tokens (issue's sampler)", "A")
    add("A, 96, 16-token prefixes", "A-16tok")
    add("A, 96, project off the mean direction", "A", mode="project")
    add("A, 96, 64-token texts and their 16-token prefixes (50/50)", "A", how=with_short)
    add("A, 96, + one-token vocabulary texts (50/50)", "A", how=mixed)
    add("vocabulary texts alone (512 one-token)", "A", how=lambda y, r: mixed(y, r, 1.0))
    add("A, 24 samples (4 disjoint draws)", "A", 24)
    add("A, 24, 16-token prefixes", "A-16tok", 24)
    add("A, 24, project off the mean direction", "A", 24, mode="project")
    add("A, 24, 64-token texts and their 16-token prefixes (50/50)", "A", 24, how=with_short)
    add("B: BOS, T=0.7, 24 × 64 (3 seeds)", "B")
    add("C: <|endoftext|> start, T=1, 24 × 64 (3 seeds)", "C")
    header = " | ".join(f"{p} / {rec}" for p, rec in RECIPES)
    print(f"\n| mean subtracted after --band auto | {header} |\n|---|" + "---|" * len(RECIPES))
    base = " | ".join(f"{spearman_of(lee[r], projection, data):.3f}" if lee[r] is not None else "–" for r in RECIPES)
    print(f"| none (default filter) | {base} |")
    for label, scores in rows:
        cells = []
        for r in RECIPES:
            s = scores.get(r, [])
            cells.append(
                "–"
                if not s
                else f"{np.mean(s):.3f} ({min(s):.3f}–{max(s):.3f}, n={len(s)})"
                if len(s) > 1
                else f"{s[0]:.3f}"
            )
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
