"""`Encoder`: texts in, `embfilter embed`'s vectors out, with a sentence-transformers-style `encode`.

`embfilter embed` builds one and calls `encode`, so the command and the library give the same vectors.
The encoder also answers the methods LangChain's `Embeddings` and sentence-transformers callers use
(`embed_documents`, `embed_query`, `get_sentence_embedding_dimension`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.api.hooks import Hooks, hooks_or_default

if TYPE_CHECKING:
    from embfilter_cli.api.filter import Filter
    from embfilter_cli.filters.artifact import FilterArtifact


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; a zero row stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    norms[norms == 0] = 1.0
    return (vectors / norms).astype(np.float32)


class Encoder:
    """An LLM that embeds texts exactly like `embfilter embed`: pooled hidden states, then the filter (P·x − m),
    then optional L2 normalisation.

    Args:
        model: alias, Hub id, model folder or .gguf file; None is the built-in SmolLM2-135M-Instruct GGUF.
        pooling: "mean" or "last", as `embed --pooling`.
        recipe: a recipe name or a template with `{text}`, as `embed --recipe`.
        filter: a `Filter`, a filter artifact or its path; refused when it was fitted on another model or
            centred on vectors of another pooling/recipe (the same checks and messages as `embed --filter`).
        normalize: L2-normalise every vector.
        device, dtype, batch_size, max_length, revision: as `embed`'s options.
        use_cache: load a GGUF model from its cached conversion (False: `embed --no-cache`).
        hooks: where log lines, warnings and progress go (default: the "embfilter" logger, no bars).

    Example:
        >>> import embfilter_cli
        >>> enc = embfilter_cli.Encoder(filter=embfilter_cli.fit(rank=64, bottom=16), normalize=True)
        >>> v = enc.encode(["The cat sat on the mat.", "Stocks fell."])
        >>> v.shape, v.dtype.name, round(float((v[0] ** 2).sum()), 4)
        ((2, 496), 'float32', 1.0)
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        pooling: str = "mean",
        recipe: str = "none",
        filter: Filter | FilterArtifact | str | os.PathLike[str] | None = None,  # noqa: A002 (embed's --filter)
        normalize: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_length: int = 512,
        revision: str | None = None,
        use_cache: bool = True,
        hooks: Hooks | None = None,
    ) -> None:
        import time

        from embfilter_cli.model.locate import resolve_model
        from embfilter_cli.text.embedding import load_encoder_at
        from embfilter_cli.text.recipes import check_pooling, resolve_recipe

        self.hooks = hooks_or_default(hooks)
        check_pooling(pooling)
        rec = resolve_recipe(recipe)  # a bad template fails before anything is loaded
        if batch_size < 1:
            from embfilter_cli.errors import InputDataError

            raise InputDataError(f"--batch-size must be at least 1, got {batch_size}")
        self.pooling, self.recipe, self.normalize = pooling, recipe, normalize
        self.batch_size, self.max_length = batch_size, max_length
        self.location = resolve_model(model, revision=revision)
        self.artifact = _as_artifact(filter)
        if self.artifact is not None:
            from embfilter_cli.filters.centering import check_centering_use
            from embfilter_cli.model.head import read_head_for_filter

            name = str(self.artifact.path or "the filter")
            check_centering_use(self.artifact.centering, pooling, rec.name, rec.template, name)
            read_head_for_filter(self.location, self.artifact)  # refuses a filter fitted on another model
        self.hooks.info(f"Loading {self.location.source} ({self.location.kind.replace('_', ' ')})…")
        start = time.perf_counter()
        self.model = load_encoder_at(
            self.location, device=device, dtype=dtype, revision=revision, use_cache=use_cache, notify=self.hooks.notice
        )
        self.hooks.info(
            f"Loaded in {time.perf_counter() - start:.1f}s: hidden size {self.model.hidden_size}, {self.model.device}, "
            f"{str(self.model.dtype).replace('torch.', '')}"
        )

    @property
    def dimension(self) -> int:
        """The length of the vectors `encode` returns (the filter's output dim, else the hidden size)."""
        return self.artifact.output_dim if self.artifact is not None else int(self.model.hidden_size)

    def get_sentence_embedding_dimension(self) -> int:
        """`dimension`, under sentence-transformers' name."""
        return self.dimension

    @property
    def last_truncated(self) -> int:
        """How many texts the latest `encode` call had to cut to `max_length` tokens."""
        return int(self.model.last_truncated)

    def encode(
        self,
        sentences: str | list[str],
        batch_size: int | None = None,
        normalize_embeddings: bool | None = None,
        **_ignored: Any,
    ) -> np.ndarray:
        """Embed texts: (n, dim) float32 for a list, (dim,) for one string; equal to `embfilter embed`'s rows.

        `batch_size` and `normalize_embeddings` override the encoder's for this call. Other keyword
        arguments sentence-transformers callers pass (`show_progress_bar`, `convert_to_numpy`, ...) are
        accepted and ignored: the result is always a numpy array.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        h = self.hooks
        with h.bar("Embedding", len(texts)) as progress:
            vectors = self.model.embed(
                texts,
                pooling=self.pooling,
                recipe=self.recipe,
                batch_size=batch_size or self.batch_size,
                max_length=self.max_length,
                progress=progress,
            )
        if self.model.last_truncated:
            h.warn(
                f"{self.model.last_truncated} text(s) exceeded --max-length "
                f"{self.model.effective_max_length(self.max_length)} tokens and were cut (the template was kept)"
            )
        if self.artifact is not None:
            vectors = self.artifact.apply(vectors).astype(np.float32)
        if self.normalize if normalize_embeddings is None else normalize_embeddings:
            vectors = l2_normalize(vectors)
        return vectors[0] if single else vectors

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """LangChain's `Embeddings.embed_documents`: `encode(texts)` as lists of floats."""
        return [row.tolist() for row in self.encode(list(texts))]

    def embed_query(self, text: str) -> list[float]:
        """LangChain's `Embeddings.embed_query`: `encode(text)` as a list of floats."""
        return [float(v) for v in self.encode(text)]

    def __repr__(self) -> str:
        """One line: model, pooling, recipe, filter, dimension."""
        what = f"filter {self.artifact.path or '(unsaved)'}" if self.artifact is not None else "no filter"
        norm = ", normalized" if self.normalize else ""
        return (
            f"Encoder({self.location.source}, {self.pooling} pooling, recipe {self.recipe}, {what}, "
            f"{self.dimension} dims{norm})"
        )


def _as_artifact(filter_: Any) -> FilterArtifact | None:
    """A `Filter`, an artifact or a path (loaded with `load`'s checks) as the artifact; None stays None."""
    if filter_ is None:
        return None
    from embfilter_cli.api.filter import Filter, load
    from embfilter_cli.filters.artifact import FilterArtifact

    if isinstance(filter_, Filter):
        return filter_.artifact
    if isinstance(filter_, FilterArtifact):
        return filter_
    return load(filter_).artifact


__all__ = ["Encoder", "l2_normalize"]
