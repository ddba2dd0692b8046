"""`eval --background`: the background texts and the baselines fitted on their embeddings.

The background is a set of unlabeled texts embedded like the data (same model, pooling, recipe);
nothing is ever fitted on the scored pairs. Its raw embeddings give:
  - the centred variant of every filter and band (`evaluation.evaluate_all`): the band, then
    subtracting the background mean of the same filtered vectors (the affine filter y = P·x − m);
  - the baselines (`baseline_vectors`; `evaluation.baseline_results` scores them, kind "baseline"): centering alone, all-but-the-top D,
    whitening to k, PCA to k (the math is `filters.postprocess`).
For `--data lee` the default background is the 300 news documents `lee_background.cor` that ship
next to Lee in the gensim wheel.

Not handled: pre-computed background embeddings (`.npy`) in eval (fit/center accept them, see
`text.background`); weighting or sampling the background.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embfilter_cli.errors import InputDataError

LEE_BACKGROUND = "gensim/test/test_data/lee_background.cor"
DEFAULT_ABTT = (1, 2, 4, 8)
DEFAULT_WHITEN = (64, 128, 256)


@dataclass
class BackgroundTexts:
    """Unlabeled texts whose embeddings centre variants and fit the baselines."""

    source: str
    texts: list[str]
    skipped: list[int] = field(default_factory=list)  # 1-based line numbers of blank texts

    @property
    def sha256(self) -> str:
        """Fingerprint of the exact texts (the embedding cache key's data part)."""
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode("utf-8")).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Source, count and fingerprint, for the JSON document."""
        return {"source": self.source, "texts": len(self.texts), "sha256": self.sha256}


def load_background(spec: str | None, data_name: str) -> BackgroundTexts | None:
    """`--background`: a text/JSONL file (or `-`) read as `embed` reads it; for `lee` by default `lee_background.cor`.

    Each text is stripped of surrounding whitespace (as the Lee documents are). Returns None when
    there is no background (no `--background` and data other than `lee`).

    Raises:
        InputDataError: a missing file, or one with no non-empty text (the message starts with
            `--background:`).
    """
    from embfilter_cli.text.datasets import _gensim_file
    from embfilter_cli.text.texts import read_texts

    if spec is None:
        if data_name != "lee":
            return None
        spec = str(_gensim_file(LEE_BACKGROUND))
    try:
        read = read_texts(spec)
    except InputDataError as exc:
        raise InputDataError(f"--background: {exc}") from None
    return BackgroundTexts(read.source, [t.strip() for t in read.texts], read.skipped)


def baseline_vectors(
    raw: np.ndarray,
    background: np.ndarray,
    *,
    abtt: Sequence[int] = DEFAULT_ABTT,
    whiten: Sequence[int] = DEFAULT_WHITEN,
    pca: Sequence[int] = (),
    skip_impossible: Sequence[str] = (),
    note: Callable[[str], None] | None = None,
) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    """The data-driven baselines fitted on `background` (see `filters.postprocess`): (name, facts, vectors).

    An all-but-the-top or whitening dimension the background is too small for raises (it was asked
    for), unless its method ("abtt", "whiten") is in `skip_impossible` (the defaults): then it is
    skipped with a `note`. PCA dimensions come from the filters and are always skipped that way.
    """
    from embfilter_cli.filters import postprocess as pp

    axes = pp.principal_axes(background)
    out: list[tuple[str, dict[str, Any], np.ndarray]] = [("centering", {"method": "center"}, pp.center(raw, axes.mean))]

    def attempt(method: str, k: int, label: str, skip: bool, make: Callable[[], np.ndarray]) -> None:
        try:
            vectors = make()
        except InputDataError as exc:
            if not skip:
                raise
            if note is not None:
                note(f"{label} skipped: {exc}")
            return
        out.append((label, {"method": method, "components": k}, vectors))

    for k in abtt:
        attempt(
            "abtt",
            k,
            f"all-but-the-top D={k}",
            "abtt" in skip_impossible,
            functools.partial(pp.all_but_the_top, raw, axes, k),
        )
    for k in whiten:
        attempt(
            "whiten", k, f"whitening to {k}", "whiten" in skip_impossible, functools.partial(pp.whiten, raw, axes, k)
        )
    for k in dict.fromkeys(pca):  # unique, in order
        attempt("pca", k, f"PCA to {k}", True, functools.partial(pp.pca, raw, axes, k))
    return out
