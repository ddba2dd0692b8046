"""Similarity datasets for `embfilter eval`: text pairs with human scores.

Data (`load_dataset`):
  - `lee`: the Lee et al. (2005) document-similarity set shipped inside the `gensim` wheel
    (`gensim/test/test_data/lee.cor`, 50 documents read as latin-1, and `similarities0-1.txt`,
    a 50×50 matrix of mean human ratings whose upper triangle gives 1225 pairs). The files are
    found through package metadata; gensim itself is never imported.
  - a TSV file of `text1<TAB>text2<TAB>score` rows (UTF-8). An optional first row whose third
    column reads `score` is a header; blank lines are skipped; anything else malformed is an error
    naming the line.
  Texts are deduplicated, so each distinct text is embedded once.

Not handled: datasets other than Lee and TSV files.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embfilter_cli.errors import InputDataError, MissingDependencyError

LEE_FILES = ("gensim/test/test_data/lee.cor", "gensim/test/test_data/similarities0-1.txt")
GENSIM_INSTALL = "pip install gensim"  # or `pip install 'embfilter[eval]'`


@dataclass
class PairData:
    """Text pairs with human similarity scores; texts are unique and pairs index into them."""

    name: str
    texts: list[str]
    pairs: np.ndarray  # int64 (m, 2)
    scores: np.ndarray  # float64 (m,)

    @property
    def sha256(self) -> str:
        """Fingerprint of the exact texts, pairs and scores (the cache key's data part)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.texts, ensure_ascii=False).encode("utf-8"))
        digest.update(np.ascontiguousarray(self.pairs, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.scores, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Name, counts and SHA-256 of the data, for reports."""
        return {"name": self.name, "texts": len(self.texts), "pairs": len(self.pairs), "sha256": self.sha256}


def load_dataset(spec: str) -> PairData:
    """`lee` or a path to a TSV file (see module docstring)."""
    if spec == "lee":
        return load_lee()
    path = Path(spec)
    if not path.exists():
        raise InputDataError(
            f"--data {spec!r} is neither 'lee' nor an existing TSV file of text1<TAB>text2<TAB>score rows"
        )
    if not path.is_file():
        raise InputDataError(f"--data {spec!r} is a directory or special file; give a TSV file or 'lee'")
    return load_tsv(path)


def _gensim_file(relative: str) -> Path:
    """Locate a file of the installed gensim wheel without importing gensim."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("gensim")
        path = Path(str(dist.locate_file(relative)))
    except PackageNotFoundError:
        import importlib.util

        spec = importlib.util.find_spec("gensim")  # top-level lookup only: does not import gensim
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(
                f"--data lee reads the Lee corpus shipped with gensim, which is not installed; run `{GENSIM_INSTALL}` "
                "(or pip install 'embfilter[eval]')"
            ) from None
        path = Path(next(iter(spec.submodule_search_locations))).parent / relative
    if not path.is_file():
        raise MissingDependencyError(
            f"gensim is installed but {relative} is missing from it; reinstall with `{GENSIM_INSTALL} --force-reinstall`"
        )
    return path


def load_lee() -> PairData:
    """The Lee document-similarity set: 50 documents, 1225 scored pairs."""
    corpus, ratings = (_gensim_file(f) for f in LEE_FILES)
    docs = [line.strip() for line in corpus.read_text(encoding="latin-1").splitlines() if line.strip()]
    matrix = np.loadtxt(ratings)
    n = len(docs)
    if matrix.shape != (n, n):
        raise InputDataError(f"{ratings} is {matrix.shape}, expected ({n}, {n}) for the {n} documents of {corpus}")
    rows, cols = np.triu_indices(n, 1)
    return PairData("lee", docs, np.stack([rows, cols], axis=1).astype(np.int64), matrix[rows, cols].astype(np.float64))


def load_tsv(path: Path) -> PairData:
    """`text1<TAB>text2<TAB>score` rows; errors name the offending line."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputDataError(f"{path} line {line_no} is not valid UTF-8; convert the file to UTF-8") from exc
    except OSError as exc:
        raise InputDataError(f"--data {path} could not be read ({exc.strerror or exc}); check the path") from None
    index: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    scores: list[float] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise InputDataError(
                f"{path} line {number} has {len(fields)} tab-separated field(s); expected text1<TAB>text2<TAB>score"
            )
        text1, text2, score_text = fields
        if number == 1 and score_text.strip().lower() == "score":
            continue  # header row
        try:
            score = float(score_text)
        except ValueError:
            raise InputDataError(f"{path} line {number}: score {score_text.strip()!r} is not a number") from None
        if not math.isfinite(score):
            raise InputDataError(f"{path} line {number}: score {score_text.strip()!r} is not finite")
        if not text1.strip() or not text2.strip():
            raise InputDataError(f"{path} line {number} has an empty text; every pair needs two non-empty texts")
        ids = tuple(index.setdefault(t, len(index)) for t in (text1, text2))
        pairs.append(ids)  # type: ignore[arg-type]
        scores.append(score)
    if len(pairs) < 3:
        raise InputDataError(f"{path} has {len(pairs)} scored pair(s); a correlation needs at least 3")
    if len(set(scores)) < 2:
        raise InputDataError(f"{path}: every score is {scores[0]}; a correlation needs scores that vary")
    return PairData(path.name, list(index), np.asarray(pairs, dtype=np.int64), np.asarray(scores, dtype=np.float64))
